"""The embedded default: a tiny TUNA trained on the synthetic shapes world on 2 CPU cores (`make demo`).

Why the pixel variant (TUNA-2: patch embedding over pixels, x0 prediction) and not a tiny VAE: the
shapes are flat colours on black at 32x32, so 4x4 pixel patches (8x8 = 64 image tokens) are already a
compact, lossless token grid; a VAE would need its own training stage, would cap image quality at its
reconstruction error, and would cost encoder/decoder compute on every step of a 2-core budget.
x0 prediction suits flat-colour targets (the model predicts the clean patch; v = (x1 - x_t) / (1 - t)).
"""

from __future__ import annotations

import ml_collections

from configs import common
from unimm_jax.models import qwen, tuna
from unimm_jax.models.tuna_head import TunaHeadConfig

VARIANTS = {
    # embed, depth, steps: sized for `make demo` on 2 cores (1038 s measured on a shared machine)
    "tiny": dict(embed=128, depth=4, steps=1200, batch_size=8),
    "smoke": dict(embed=64, depth=1, steps=4, batch_size=2),   # the test of scripts/demo.py
}
IMAGE_SIZE, PATCH = 32, 4


def model_config(embed: int, depth: int) -> tuna.TunaConfig:
  llm = qwen.QwenConfig(vocab=64, embed=embed, mlp=3 * embed, depth=depth, heads=4, kv_heads=2, head_dim=embed // 4,
                        tie_embeddings=True)   # the shapes tokenizer has 63 tokens
  head = TunaHeadConfig(embed=embed, mlp=3 * embed, depth=2, heads=4, kv_heads=2, head_dim=embed // 4,
                        out_features=PATCH * PATCH * 3)
  return tuna.TunaConfig(llm=llm, head=head, encoder="patch", space="pixel", channels=3, patch=PATCH, prediction="x0")


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  v = common.pick(VARIANTS, arg, "configs/tuna_tiny.py")
  c = common.train_defaults()
  c.task = "tuna"
  c.model = ml_collections.ConfigDict(model_config(v["embed"], v["depth"]).to_dict())
  # TUNA weighs CE by 0.2; at this size and budget understanding only learns with full weight, and the
  # understanding stream gets a bigger share than TUNA's 0.2 for the same reason.
  c.flow = ml_collections.ConfigDict(dict(flow_weight=1.0, ntp_weight=1.0, shift_seq_len=1024, base_shift=0.5,
                                          max_shift=1.15))
  c.data = ml_collections.ConfigDict(dict(
      name="shapes_tuna", seq_len=256, max_spans=8, images_per_row=3, image_size=IMAGE_SIZE, seed=0,
      num_records=10_000, caption_dropout=0.1, weights=dict(t2i=0.4, edit=0.15, mmu=0.35, text=0.1)))
  c.batch_size = v["batch_size"]
  c.steps = v["steps"]
  c.optim.update(lr=2e-3, warmup_steps=50, schedule="cosine", end_lr_frac=0.1, weight_decay=0.01, ema_decay=0.0)
  c.mesh.ici = (1, 1, 1)
  c.checkpoint.update(every=500, keep=2)
  c.log_every = 50
  c.sample = ml_collections.ConfigDict(dict(steps=20, guidance=3.0, shift=3.0, eval_per_category=50))
  return c
