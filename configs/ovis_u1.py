"""Ovis-U1 (task "ovis_u1", training/ovis_u1_task.py): `configs/ovis_u1.py:VARIANT` with VARIANT tiny | 3b, the stage
with --config.stage=refiner_decoder|decoder|edit|understanding; and the sampling settings of the release's test scripts
(test_txt_to_img.py, test_img_edit.py, test_img_to_txt.py of AIDC-AI/Ovis-U1).

Sizes come from the model's constructors (`OvisU1Config.tiny` / `.ovis_u1_3b`, named by `preset`); this file holds
only the choices around them. Sampling: the release samples 1024^2 in bf16 with 50 Euler steps, text CFG 5 (edit:
text 6, image 1.5), seed 42; the tiny variant is the fixture model at fixture sizes.
Training: the paper's stage 0 (refiner + decoder, text-to-image) runs 500 steps of batch 1024 at lr 1e-4; the other
stages' settings are not published, nor the optimizer or the loss details (training/ovis_u1_task.py states our
reading). The visual tokenizer's pixel budget is the release's preprocessor_config.json (tiny: the fixture's).
The tiny variant trains on the shapes world (32 px) on CPU.
"""

from __future__ import annotations

import ml_collections

from configs import common
from unimm_jax.models.ovis_u1 import OvisU1Config

SAMPLING = dict(steps=50, guidance=5.0, edit_guidance=6.0, image_guidance=1.5, size=(1024, 1024), seed=42,
                max_new_tokens=1024)
VARIANTS = {
    "tiny": dict(preset="tiny", dtype="float32", sampling=dict(SAMPLING, steps=4, size=(48, 64), max_new_tokens=8),
                 image_size=32, seq_len=64, min_pixels=3136, max_pixels=12544, batch_size=8, steps=300, lr=1e-3,
                 log_every=10, checkpoint_every=100),
    "3b": dict(preset="ovis_u1_3b", dtype="bfloat16", sampling=SAMPLING, image_size=1024, seq_len=512,
               min_pixels=200704, max_pixels=3211264, batch_size=1024, steps=500, lr=1e-4, log_every=10,
               checkpoint_every=100),
}
# our choices (the release publishes none): the unconditional branch of text CFG is the null prompt "Generate an
# image.", so training swaps it in this often; u of the noise level drawn uniformly, then the sampler's shift
OBJECTIVE = dict(cond_dropout=0.1, sigma="uniform")


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  v = common.pick(VARIANTS, arg, "configs/ovis_u1.py")
  c = common.train_defaults()
  c.family = "ovis_u1"
  c.preset = v["preset"]
  c.dtype = v["dtype"]
  c.sampling = ml_collections.ConfigDict(dict(v["sampling"]))
  c.task = "ovis_u1"
  c.stage = "refiner_decoder"
  c.model = ml_collections.ConfigDict(getattr(OvisU1Config, v["preset"])().to_dict())
  c.ovis = ml_collections.ConfigDict(dict(OBJECTIVE))
  c.data.update(dict(name="shapes_ovis", seq_len=v["seq_len"], image_size=v["image_size"], num_records=10_000,
                     seed=0, min_pixels=v["min_pixels"], max_pixels=v["max_pixels"]))
  c.batch_size = v["batch_size"]
  c.steps = v["steps"]
  c.optim.update(lr=v["lr"], warmup_steps=max(1, v["steps"] // 100), schedule="cosine", end_lr_frac=0.0,
                 b1=0.9, b2=0.95, weight_decay=0.01, clip_norm=1.0, ema_decay=0.0)
  c.checkpoint.every = v["checkpoint_every"]
  c.log_every = v["log_every"]
  if arg == "tiny":   # data parallel: the tiny VAE's and towers' small kernels would mostly replicate under fsdp
    c.mesh.ici = (-1, 1, 1)
  return c
