"""The embedded default: a tiny TUNA trained on the synthetic shapes world on 2 CPU cores (`make demo`).

Why the pixel variant (TUNA-2: patch embedding over pixels, x0 prediction) and not a tiny VAE: the
shapes are flat colours on black at 32x32, so pixel patches are already a compact, lossless token grid;
a VAE would need its own training stage, would cap image quality at its reconstruction error, and would
cost encoder/decoder compute on every step of a 2-core budget. It trains with TUNA-2's JiT objective
(`FlowConfig.tuna2`: x0 prediction, velocity-weighted loss), with a noisier t (below).
Why 16x16 patches (2x2 = 4 tokens an image): the shapes world puts its objects on a 2x2 grid, so each
object is whole in one image token (`unimm_jax.data.shapes` has the measurement against the 3x3 world with
8x8 patches: single-object generation 0.20 -> 0.78, shape answers 0.42 -> 0.70 at the same compute), and
x0 prediction copes with wide patches (JiT's point). On this budget the number of images seen is what
limits learning: text conditioning of generation only appears after about 1000 steps even on t2i alone
(measured on the 3x3 world: the flow loss at t = 0.2 with the right caption 0.039 vs 0.047 with a wrong one
after 1000 steps; no gap after 400).
Why untied embeddings and flow_weight 3 (measured by `make demo` on clean clones, one per config, ShapesEval,
50 items a category): tied, the CE on words that are interchangeable in their context ("at the top / bottom", "a red /
blue") pulls their input embeddings together (cosine of "left" and "right" 0.94 after 3200 steps; 1.00 after
1000 steps of t2i + text), so generation cannot read the words it is conditioned on; and with the CE weighed as
much as the flow loss, captions barely move the x0 prediction (t2i + text, 1000 steps: swapping the colour
word moves it 0.008 at CE weight 1, 0.075 at 0.2). Untied alone: generation overall 0.43 -> 0.47, within
noise. Untied and flow_weight 3: generation 0.43 -> 0.62 (single objects 0.78 -> 0.90, colours 0.78 -> 0.96,
two objects 0.32 -> 0.64), colour answers 0.66 -> 1.00, editing 0.045 -> 0.065. Untied and ntp_weight 0.2
(TUNA's) scored the same on generation but position answers fell to chance (0.26).
Why learned row/column tables on the image tokens (`patch_positions`, not in TUNA-2) and a noisier training t
(t ~ sigmoid(N(-1.2, 1.3)), JiT's is N(-0.8, 0.8)): the object's cell is decided in the first, noisiest sampling
steps, where an image token is near-pure noise and knows its cell only through the LLM's 1D RoPE; JiT's t is
below 0.1 4% of the time, so the loss hardly pays for reading the cell word there. Either change alone left
placement at chance (tables: 0.32; noisier t with tables at std 0.02, drowned in the noise embedding: 0.26);
together, placement 0.26 -> 0.98, generation overall 0.62 -> 0.65, shape answers 0.68 -> 0.90, position answers
0.56 -> 0.88, editing 0.065 -> 0.25, colour answers 1.00 -> 0.76 (seed 0; seed 1 placed 0.88 and answered
colours 0.82, shapes 0.72; docs/demo.md).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from configs import common
from unimm_jax.data import shapes
from unimm_jax.models import qwen, tuna
from unimm_jax.models.tuna_head import TunaHeadConfig
from unimm_jax.training import tuna_objective as obj

VARIANTS = {
    # sized for `make demo` to train in < 15 minutes on 2 cores: 3200 steps took 715-820 s at 0.22-0.26 s a
    # step on earlier days (README has today's run). Measured on the 3x3 world with 8x8 patches: 3600 steps
    # scored the same as 3200; 4 rows x 3600 steps beat 8 rows x 1800 (generation overall 0.18 vs 0.12,
    # understanding 0.54 either way); EMA weights and bigger shapes changed nothing beyond run-to-run noise.
    "tiny": dict(embed=128, depth=4, steps=3200, batch_size=4),
    "smoke": dict(embed=64, depth=1, steps=4, batch_size=2),   # the test of scripts/demo.py
}
IMAGE_SIZE, SEQ_LEN = 32, 256
PATCH = IMAGE_SIZE // shapes.GRID  # one grid cell, one image token: 16 px
# A span is <boi> + time slot + GRID^2 image tokens + <eoi>, so no row can hold more spans than this.
MAX_SPANS = SEQ_LEN // ((IMAGE_SIZE // PATCH) ** 2 + 3)


def model_config(embed: int, depth: int) -> tuna.TunaConfig:
  # untied: see the module docstring (tied, CE makes "top" and "bottom" one input embedding)
  llm = qwen.QwenConfig(vocab=64, embed=embed, mlp=3 * embed, depth=depth, heads=4, kv_heads=2, head_dim=embed // 4,
                        tie_embeddings=False)   # the shapes tokenizer has 62 tokens
  head = TunaHeadConfig(embed=embed, mlp=3 * embed, depth=2, heads=4, kv_heads=2, head_dim=embed // 4,
                        out_features=PATCH * PATCH * 3)
  # patch_positions: one learned row and column embedding per cell of the grid (module docstring)
  return tuna.TunaConfig(llm=llm, head=head, encoder="patch", space="pixel", channels=3, patch=PATCH, prediction="x0",
                         patch_positions=IMAGE_SIZE // PATCH)


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  v = common.pick(VARIANTS, arg, "configs/tuna_tiny.py")
  c = common.train_defaults()
  c.task = "tuna"
  c.model = ml_collections.ConfigDict(model_config(v["embed"], v["depth"]).to_dict())
  # TUNA weighs CE by 0.2 and the flow loss by 1; here the flow loss gets 3x the CE instead (module docstring:
  # TUNA's 0.2 left position answers at chance), and the understanding stream a bigger share than TUNA's 0.2.
  # t is noisier than JiT's N(-0.8, 0.8) so that generation learns to place objects (module docstring).
  c.flow = ml_collections.ConfigDict(dataclasses.asdict(
      obj.FlowConfig.tuna2(ntp_weight=1.0, flow_weight=3.0, t_mean=-1.2, t_std=1.3)))
  c.data.update(dict(
      name="shapes_tuna", seq_len=SEQ_LEN, max_spans=MAX_SPANS, images_per_row=8, image_size=IMAGE_SIZE, seed=0,
      num_records=10_000, caption_dropout=0.1, weights=dict(t2i=0.5, edit=0.12, mmu=0.3, text=0.08),
      # Off: a t2i-only warm-up of 1000 (1600) steps raised generation position 0.04 -> 0.14 (0.18) but lowered
      # understanding 0.80 -> 0.65 (0.60) and did not teach the cells (placement 0.30 / 0.24; docs/demo.md).
      warmup=dict(steps=0, weights=dict(t2i=1.0, edit=0.0, mmu=0.0, text=0.0)),
      # name="tuna_streams" trains on your own data instead (data/README.md, section 7):
      # --config.data.name=tuna_streams --config.data.sources.t2i=jsonl:/path/captions.jsonl
      sources=dict(t2i="", edit="", mmu="", text=""), tokenizer="", chat_template=False))
  c.batch_size = v["batch_size"]
  c.steps = v["steps"]
  c.optim.update(lr=3e-3, warmup_steps=50, schedule="cosine", end_lr_frac=0.1, weight_decay=0.01, ema_decay=0.0)
  c.mesh.ici = (1, 1, 1)
  c.checkpoint.update(every=500, keep=2)
  c.log_every = 50
  # guidance swept on a finished run (ShapesEval generation overall, 50 items a category): 1.5 .35, 2 .41,
  # 3 .43, 5 .37, 9 .31; single objects .60 / .70 / .78 / .64 / .54 at 1.5 / 2 / 3 / 5 / 9, so 3.
  c.sample = ml_collections.ConfigDict(dict(steps=20, guidance=3.0, shift=3.0, eval_per_category=50))
  return c
