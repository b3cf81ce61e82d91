"""Defaults shared by every training config, and `pick` for `file.py:variant` arguments.

A config file defines `get_config(arg)` returning a ConfigDict; `scripts/train.py --config
configs/x.py:variant --config.optim.lr=1e-4` selects a variant and overrides single fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

from unimm_jax import sharding


def pick(table: Mapping[str, Any], arg: str, file: str) -> Any:
  """table[arg], or a KeyError listing the variants of `file`."""
  if arg not in table:
    raise KeyError(f"{file}: unknown variant {arg!r}; choose one of {sorted(table)}")
  return table[arg]


def train_defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "lm"                 # key of unimm_jax.registry.TASKS
  c.seed = 0
  c.steps = 1000
  c.batch_size = 8              # global examples per optimizer step (over all processes)
  c.accum_steps = 1             # microbatches per step; batch_size / accum_steps examples each
  c.init_from = ""              # converted or HF checkpoint dir; "" = random init
  c.nonfinite = "skip"          # skip: keep the state, count the step | stop: checkpoint and raise
  # nonfinite="skip" gives up (checkpoints and raises, as "stop") past this many skipped steps in a row /
  # in the whole run; 0 = no cap. A run that skips steps this often is diverging, not meeting a bad batch.
  c.nonfinite_max_consecutive = 10
  c.nonfinite_max_total = 100

  # max_consecutive_skips: a stream whose last this-many records were all skipped (missing files, bad lines)
  # stops the run with an error naming its source and the reasons, instead of looping on it for ever.
  c.data = ml_collections.ConfigDict(dict(name="synthetic_tokens", seq_len=128, num_records=1 << 20, seed=0,
                                          max_consecutive_skips=1000))

  c.optim = ml_collections.ConfigDict(dict(
      lr=3e-4, warmup_steps=100, schedule="cosine", end_lr_frac=0.1,   # cosine | linear | constant
      b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0,
      # re.fullmatch over "a/b/c" param paths: no weight decay on norms, biases and embeddings.
      no_decay=(r"(.*/)?[^/]*norm[^/]*/(scale|bias)", r".*/bias", r"(.*/)?embed[^/]*/embedding"),
      freeze=(),                # params to freeze (stage-wise training), same path regexes
      ema_decay=0.0,            # 0 = no EMA params
      ema_warmup=False,         # decay min(ema_decay, (1 + n) / (10 + n)) at update n (diffusers' EMAModel)
  ))

  # Mesh (data, fsdp, tensor): ici within a slice (one -1 = fill), dcn across slices. Axes are Auto:
  # under Explicit axes linen's with_logical_constraint asserts instead of constraining.
  c.mesh = ml_collections.ConfigDict(dict(ici=(1, -1, 1), dcn=(1, 1, 1)))
  c.sharding = ml_collections.ConfigDict(dict(
      rules=tuple((name, axes) for name, axes in sharding.DEFAULT_RULES),
      tolerance=0.02,           # max share of param bytes replicated when fsdp * tensor > 1
  ))

  c.checkpoint = ml_collections.ConfigDict(dict(every=500, keep=3, keep_every=0, async_save=True))
  c.log_every = 10
  c.profile = ml_collections.ConfigDict(dict(start=-1, steps=3))   # jax.profiler trace of steps [start, start+steps)
  c.peak_tflops = 0.0           # per-device peak for MFU; 0 = from the device kind (None on CPU)
  return c
