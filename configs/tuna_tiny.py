"""The embedded default: a tiny TUNA trained on the synthetic shapes world on 2 CPU cores (`make demo`).

The choices below, each with a one-line reason; docs/demo.md has the runs behind every one of them.
- TUNA-2's pixel variant (patch embedding, x0 prediction, JiT objective), not a tiny VAE: flat colours on black at
  32x32 are already a compact, lossless token grid, and a VAE would need its own stage and cost every step.
- 16-px patches: one object of the 2x2 shapes world is one image token.
- Untied embeddings and flow_weight 3: tied, the CE merges the input embeddings of interchangeable words ("top" /
  "bottom"), and a CE as heavy as the flow loss leaves captions unread by generation.
- Learned row/column tables on the image tokens (`patch_positions`, not in TUNA-2) and a noisier training t: the
  cell is decided in the noisiest sampling steps, where a token knows its cell only through these tables and the
  loss must pay for reading the cell word; either change alone left placement at chance.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from configs import common
from unimm_jax.data import shapes
from unimm_jax.models import qwen, tuna
from unimm_jax.training import tuna_objective as obj

VARIANTS = {
    # sized for `make demo` to train in < 15 minutes on 2 cores (docs/demo.md has the step times and the sweeps)
    "tiny": dict(embed=128, depth=4, steps=3200, batch_size=4),
    "smoke": dict(embed=64, depth=1, steps=4, batch_size=2),   # the test of scripts/demo.py
    # the shapes world's clips (a moving object, data/shapes.py): text-to-video and video questions only
    "video": dict(embed=128, depth=4, steps=1200, batch_size=4, video=True),
}
IMAGE_SIZE, SEQ_LEN = 32, 256
PATCH = IMAGE_SIZE // shapes.GRID  # one grid cell, one image token: 16 px
# A span is <boi> + time slot + GRID^2 image tokens + <eoi>, so no row can hold more spans than this.
MAX_SPANS = SEQ_LEN // ((IMAGE_SIZE // PATCH) ** 2 + 3)


def model_config(embed: int, depth: int, vocab: int = 64) -> tuna.TunaConfig:
  llm = qwen.QwenConfig(vocab=vocab, embed=embed, mlp=3 * embed, depth=depth, heads=4, kv_heads=2, head_dim=embed // 4,
                        tie_embeddings=False)   # the shapes tokenizer has 62 tokens; untied (module docstring)
  # patch_positions: one learned row and column embedding per cell of the grid (module docstring)
  return tuna.TunaConfig.sized(llm, 2, 4, 2, head_dim=embed // 4, encoder="patch", space="pixel", channels=3,
                               patch=PATCH, prediction="x0", patch_positions=IMAGE_SIZE // PATCH)


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  v = common.pick(VARIANTS, arg, "configs/tuna_tiny.py")
  c = common.train_defaults()
  c.task = "tuna"
  # the video tokenizer adds the clips' words and the video tokens: 70 tokens
  c.model = ml_collections.ConfigDict(model_config(v["embed"], v["depth"], 72 if v.get("video") else 64).to_dict())
  # flow loss 3x the CE (TUNA: 1 and 0.2), a bigger understanding share, t noisier than JiT's (module docstring)
  c.flow = ml_collections.ConfigDict(dataclasses.asdict(
      obj.FlowConfig.tuna2(ntp_weight=1.0, flow_weight=3.0, t_mean=-1.2, t_std=1.3)))
  c.data.update(dict(
      name="shapes_tuna", seq_len=SEQ_LEN, max_spans=MAX_SPANS, images_per_row=8, image_size=IMAGE_SIZE, seed=0,
      num_records=10_000, caption_dropout=0.1, weights=dict(t2i=0.5, edit=0.12, mmu=0.3, text=0.08),
      # off: a t2i-only warm-up cost understanding more than it gained generation (docs/demo.md)
      warmup=dict(steps=0, weights=dict(t2i=1.0, edit=0.0, mmu=0.0, text=0.0)),
      # name="tuna_streams" trains on your own data instead (data/README.md, section 7):
      # --config.data.name=tuna_streams --config.data.sources.t2i=jsonl:/path/captions.jsonl
      sources=dict(t2i="", edit="", mmu="", text=""), tokenizer="", chat_template=False,
      # understanding CE on answer + eos only, as before the reference's <boi> / <eoi> targets became an option
      mmu_vision_labels=False))
  if v.get("video"):
    # 5 frames (1 + 4k) spread over each clip, between the video tokens
    # (assigned, not updated: an update would merge in the image streams' weights)
    c.data.weights = ml_collections.ConfigDict(dict(t2v=0.5, vmmu=0.5))
    c.data.warmup = ml_collections.ConfigDict(dict(steps=0, weights=dict(t2v=1.0, vmmu=0.0)))
    c.data.update(dict(video=dict(frames=shapes.CLIP_FRAMES, fps=0.0), video_markers=True))
    c.data.sources.update(dict(t2v="", vmmu=""))
  c.batch_size = v["batch_size"]
  c.steps = v["steps"]
  c.optim.update(lr=3e-3, warmup_steps=50, schedule="cosine", end_lr_frac=0.1, weight_decay=0.01, ema_decay=0.0)
  c.mesh.ici = (1, 1, 1)
  c.checkpoint.update(every=500, keep=2)
  c.log_every = 50
  # guidance 3 scored best of 1.5 / 2 / 3 / 5 / 9 on a finished run (docs/demo.md)
  c.sample = ml_collections.ConfigDict(dict(steps=20, guidance=3.0, shift=3.0, eval_per_category=50))
  return c
