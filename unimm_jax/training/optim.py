"""Optimizer from config: AdamW, warmup + decay schedule, clipping, weight-decay mask, frozen modules, EMA.

Params are addressed by path strings "a/b/c" (e.g. "layers_0/mlp/gate_proj/kernel"); masks are
`re.fullmatch` regexes over them. Frozen params get no optimizer state (optax.multi_transform with
set_to_zero) and are passed through unchanged by the train step, so they stay bitwise equal.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

SCHEDULES = ("cosine", "linear", "constant")


def path_str(keypath: Sequence[Any]) -> str:
  """jax key path -> "a/b/c"."""
  parts = []
  for k in keypath:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def path_mask(tree: Any, patterns: Sequence[str]) -> Any:
  """Tree of bools: True where the leaf's path fullmatches any pattern."""
  compiled = [re.compile(p) for p in patterns]
  return jax.tree_util.tree_map_with_path(
      lambda kp, _: any(c.fullmatch(path_str(kp)) for c in compiled), tree)


def frozen_mask(params: Any, patterns: Sequence[str], where: str = "optim.freeze") -> Any:
  """Like path_mask, but a pattern that freezes nothing is a typo and raises, listing some paths."""
  paths = [path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  for p in patterns:
    if not any(re.fullmatch(p, s) for s in paths):
      raise ValueError(f"{where}: pattern {p!r} matches no parameter; paths look like {paths[:6]}")
  return path_mask(params, patterns)


def learning_rate(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to optim.lr over optim.warmup_steps, then `optim.schedule` down to
  optim.lr * optim.end_lr_frac at total_steps (cosine, linear) or flat (constant)."""
  if optim.schedule not in SCHEDULES:
    raise ValueError(f"optim.schedule {optim.schedule!r} is not one of {SCHEDULES}")
  lr, warmup = float(optim.lr), int(optim.warmup_steps)
  decay_steps = max(total_steps - warmup, 1)
  end = lr * float(optim.end_lr_frac)
  after = {
      "cosine": optax.cosine_decay_schedule(lr, decay_steps, alpha=float(optim.end_lr_frac)),
      "linear": optax.linear_schedule(lr, end, decay_steps),
      "constant": optax.constant_schedule(lr),
  }[optim.schedule]
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def build(optim: ml_collections.ConfigDict, total_steps: int, params: Any,
          extra_frozen: Sequence[str] = ()) -> tuple[optax.GradientTransformation, Any, optax.Schedule]:
  """-> (optimizer, trainable mask tree, lr schedule). `params` may be abstract."""
  schedule = learning_rate(optim, total_steps)
  frozen = frozen_mask(params, tuple(optim.freeze) + tuple(extra_frozen))
  trainable = jax.tree.map(lambda f: not f, frozen)
  labels = jax.tree.map(lambda t: "trainable" if t else "frozen", trainable)
  no_decay = tuple(optim.no_decay)

  def decay_mask(tree):  # inside multi_transform frozen leaves are MaskedNodes (no leaves), so skipped
    return jax.tree.map(lambda nd: not nd, path_mask(tree, no_decay))

  chain = []
  if optim.clip_norm > 0:
    chain.append(optax.clip_by_global_norm(float(optim.clip_norm)))
  chain.append(optax.adamw(schedule, b1=float(optim.b1), b2=float(optim.b2), eps=float(optim.eps),
                           weight_decay=float(optim.weight_decay), mask=decay_mask))
  tx = optax.multi_transform({"trainable": optax.chain(*chain), "frozen": optax.set_to_zero()}, labels)
  return tx, trainable, schedule


def ema_decay_at(decay: float, warmup: bool, updates: jax.Array) -> jax.Array:
  """The decay of the `updates`-th update (0-based): min(decay, (1 + n) / (10 + n)) with warmup, as
  diffusers' EMAModel, so a short run's average is not dominated by the initial weights."""
  if not warmup:
    return jnp.asarray(decay, jnp.float32)
  n = updates.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


def ema_update(ema: Any, params: Any, decay: float | jax.Array) -> Any:
  """ema <- decay * ema + (1 - decay) * params, leafwise in the params' dtype."""
  return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema, params)


def apply_updates(params: Any, updates: Any, trainable: Any) -> Any:
  """params + updates on trainable leaves; frozen leaves are returned as they are (bitwise)."""
  return jax.tree.map(lambda t, p, u: (p + u).astype(p.dtype) if t else p, trainable, params, updates)

