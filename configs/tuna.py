"""TUNA training configs (task "tuna"). Model sizes are `unimm_jax.models.tuna.VARIANTS` (the released 2b / 7b,
the pixel TUNA-2 `tuna2_7b`, a CPU-sized TUNA-2 `tiny`); this file adds what training needs."""

from __future__ import annotations

import dataclasses

import ml_collections

from configs import common
from unimm_jax.models import tuna
from unimm_jax.training import tuna_objective as obj

# Rows of the reference's 512^2 bucket (1024 latent tokens + text), as tuna-2 configs/train/train.yaml.
VARIANTS = {
    "tiny": dict(seq_len=256, max_spans=4, batch_size=8, steps=300, checkpoint_every=100, log_every=10,
                 optim=dict(lr=2e-3, warmup_steps=20, ema_decay=0.0), mmu_vision_labels=False),
    "2b": dict(seq_len=1152, max_spans=2, batch_size=256, mmu_vision_labels=False),
    "7b": dict(seq_len=1152, max_spans=2, batch_size=256, mmu_vision_labels=False),
    "tuna2_7b": dict(seq_len=1152, max_spans=2, batch_size=256, mmu_vision_labels=False),
}


def model_config(arg: str) -> tuna.TunaConfig:
  common.pick(VARIANTS, arg, "configs/tuna.py")
  return tuna.variant(arg)


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  v = common.pick(VARIANTS, arg, "configs/tuna.py")
  model = model_config(arg)
  c = common.train_defaults()
  c.task = "tuna"
  c.model = ml_collections.ConfigDict(model.to_dict())
  # TUNA: lognorm t shifted for 1024 tokens; TUNA-2 (x0 in pixel space): JiT's t and velocity-weighted loss
  flow = obj.FlowConfig.tuna2() if model.prediction == "x0" else obj.FlowConfig()
  c.flow = ml_collections.ConfigDict(dataclasses.asdict(dataclasses.replace(flow, ntp_weight=0.2)))
  c.data.update(dict(name="shapes_tuna", seq_len=v["seq_len"], max_spans=v["max_spans"],
                     images_per_row=1, seed=0, weights=dict(t2i=0.5, edit=0.2, mmu=0.2, text=0.1)))
  # Understanding CE on answer + eos only (our choice before the option; the embedded default's numbers depend on
  # it); True also targets <|vision_start|> / <|vision_end|> as the reference's tokenize_utils. A variant added
  # without this key gets the reference's (data/tuna_data.py).
  c.data.mmu_vision_labels = v.get("mmu_vision_labels", True)
  c.batch_size = v["batch_size"]
  # TUNA: AdamW lr 2e-5, wd 0.01, 1k warmup, EMA 0.9999 (REFERENCE.md); the tiny model learns faster
  c.optim.update(lr=2e-5, weight_decay=0.01, warmup_steps=1000, ema_decay=0.9999)
  c.optim.update(v.get("optim", {}))
  c.steps = v.get("steps", c.steps)
  c.checkpoint.every = v.get("checkpoint_every", c.checkpoint.every)
  c.log_every = v.get("log_every", c.log_every)
  return c
