"""OpenUni training configs (task "openuni"): `configs/openuni.py:VARIANT`, stage with --config.stage=pretrain|finetune.

Model sizes are `unimm_jax.models.openuni` (b512, l512, l1024 as released; `tiny` for CPU). Training settings as the
original (reference openuni.md f): pretrain lr 1e-4 for 100k steps, finetune lr 1e-5 for 10k; AdamW (0.9, 0.95),
weight decay 0.05 on >= 2-D params (norms and biases excluded), clip 1.0, 1% linear warmup + cosine; caption
dropout 10%. The tiny variant trains on the shapes world's t2i stream.

The tiny pretrain stage's loss stays flat, and that is the setup, not a bug: it freezes a randomly initialised SANA
(the release pretrains against SANA-0.6B / 1.6B weights) whose time-embedding modulation starts at zero, so its
velocity is near zero and barely reads the caption. Measured at init on one batch of 32 (same eps and sigma):
E[v^2] 0.008 vs E[target^2] 1.95; loss 1.9163 with the model's prompt_embeds, 1.9164 with zeros, 1.9163 with
N(0, 1) or 10x the embeddings, and 1.9146 with the prompt_embeds themselves optimised (64 Adam steps). Nothing the
queries, connector or projector output can do moves it; finetune (SANA trained) falls, and pretrain learns once
SANA is a trained one (init_from a finetuned or converted release).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from configs import common
from unimm_jax.data import openuni_data
from unimm_jax.models import openuni

STAGES = {"pretrain": dict(lr=1e-4, steps=100_000), "finetune": dict(lr=1e-5, steps=10_000)}
VARIANTS = {
    # the released image sizes; tiny: the 32 px shapes world, small enough to learn on 2 CPU cores
    "tiny": dict(image_size=32, seq_len=40, batch_size=8, steps=300, lr=1e-3, log_every=10, checkpoint_every=100),
    "b512": dict(image_size=512, seq_len=128, batch_size=256),
    "l512": dict(image_size=512, seq_len=128, batch_size=256),
    "l1024": dict(image_size=1024, seq_len=128, batch_size=256),
}


def model_config(arg: str) -> openuni.OpenUniConfig:
  common.pick(VARIANTS, arg, "configs/openuni.py")
  cfg = openuni.variant(arg)
  if arg == "tiny":   # the shapes tokenizer's <IMG_CONTEXT> (the releases keep InternVL3's 151667)
    cfg = dataclasses.replace(cfg, lmm=dataclasses.replace(cfg.lmm, image_token_id=openuni_data.image_token_id()))
  return cfg


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  v = common.pick(VARIANTS, arg, "configs/openuni.py")
  c = common.train_defaults()
  c.task = "openuni"
  c.stage = "pretrain"
  c.model = ml_collections.ConfigDict(model_config(arg).to_dict())
  c.data.update(dict(name="shapes_openuni", seq_len=v["seq_len"], image_size=v["image_size"], num_records=10_000,
                     seed=0, caption_dropout=0.1))
  c.batch_size = v["batch_size"]
  steps = v.get("steps", STAGES["pretrain"]["steps"])
  c.steps = steps
  c.optim.update(lr=v.get("lr", STAGES["pretrain"]["lr"]), warmup_steps=max(1, steps // 100), schedule="cosine",
                 end_lr_frac=0.0, b1=0.9, b2=0.95, weight_decay=0.05, clip_norm=1.0, ema_decay=0.0)
  c.checkpoint.every = v.get("checkpoint_every", c.checkpoint.every)
  c.log_every = v.get("log_every", c.log_every)
  if arg == "tiny":   # data parallel: fsdp would replicate most of the tiny DC-AE's small kernels anyway
    c.mesh.ici = (-1, 1, 1)
  return c
