"""The embedded default: a tiny TUNA trained on the synthetic shapes world on 2 CPU cores (`make demo`).

Why the pixel variant (TUNA-2: patch embedding over pixels, x0 prediction) and not a tiny VAE: the
shapes are flat colours on black at 32x32, so pixel patches are already a compact, lossless token grid;
a VAE would need its own training stage, would cap image quality at its reconstruction error, and would
cost encoder/decoder compute on every step of a 2-core budget. It trains with TUNA-2's JiT objective
(`FlowConfig.tuna2`: x0 prediction, velocity-weighted loss, t ~ sigmoid(N(-0.8, 0.8))).
Why 8x8 patches (4x4 = 16 tokens an image) and not 4x4 (64 tokens): x0 prediction copes with wide
patches (JiT's point), and a row of 256 tokens then holds about 8 images instead of 3. On this budget
the number of images seen is what limits learning: text conditioning of generation only appears after
about 1000 steps even on t2i alone (measured: the flow loss at t = 0.2 with the right caption 0.039 vs
0.047 with a wrong one after 1000 steps; no gap after 400); at 1200 steps 8x8 patches also lifted
understanding from 0.41 to 0.57 (overall accuracy, same mix).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from configs import common
from unimm_jax.models import qwen, tuna
from unimm_jax.models.tuna_head import TunaHeadConfig
from unimm_jax.training import tuna_objective as obj

VARIANTS = {
    # sized for `make demo` to train in < 15 minutes on 2 cores: 3200 steps took 820 s at 0.26 s a step
    # (the same machine ran 0.22-0.24 s a step on other days; 3600 steps scored the same). 4 rows x 3600 steps
    # beat 8 rows x 1800 (same images, a little less time): generation overall 0.18 vs 0.12, understanding
    # 0.54 either way; a 64x64 world (16x16 patches), EMA weights and bigger shapes (0.62-0.8 of a cell
    # instead of 0.5-0.72) changed nothing beyond run-to-run noise.
    "tiny": dict(embed=128, depth=4, steps=3200, batch_size=4),
    "smoke": dict(embed=64, depth=1, steps=4, batch_size=2),   # the test of scripts/demo.py
}
IMAGE_SIZE, PATCH, SEQ_LEN = 32, 8, 256
# A span is <boi> + time slot + (32/8)^2 image tokens + <eoi>, so no row can hold more spans than this.
MAX_SPANS = SEQ_LEN // ((IMAGE_SIZE // PATCH) ** 2 + 3)


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
  c.flow = ml_collections.ConfigDict(dataclasses.asdict(obj.FlowConfig.tuna2(ntp_weight=1.0)))
  c.data = ml_collections.ConfigDict(dict(
      name="shapes_tuna", seq_len=SEQ_LEN, max_spans=MAX_SPANS, images_per_row=8, image_size=IMAGE_SIZE, seed=0,
      num_records=10_000, caption_dropout=0.1, weights=dict(t2i=0.5, edit=0.12, mmu=0.3, text=0.08),
      # name="tuna_streams" trains on your own data instead (data/README.md, section 7):
      # --config.data.name=tuna_streams --config.data.sources.t2i=jsonl:/path/captions.jsonl
      sources=dict(t2i="", edit="", mmu="", text=""), tokenizer="", chat_template=False))
  c.batch_size = v["batch_size"]
  c.steps = v["steps"]
  c.optim.update(lr=3e-3, warmup_steps=50, schedule="cosine", end_lr_frac=0.1, weight_decay=0.01, ema_decay=0.0)
  c.mesh.ici = (1, 1, 1)
  c.checkpoint.update(every=500, keep=2)
  c.log_every = 50
  # guidance swept on a finished run (ShapesEval generation overall): 1.5 .15, 3 .19, 5 .22, 6 .25, 9 .24,
  # 12 .24; above 6 single objects drop (extra shapes appear), so 5.
  c.sample = ml_collections.ConfigDict(dict(steps=20, guidance=5.0, shift=3.0, eval_per_category=50))
  return c
