"""The denoising loop of the diffusers-style families (SANA, FLUX, MMDiT): a scheduler and one jitted step.

A scheduler (sampling/schedulers.py) is a plain object with
  timesteps  np [n]      what the model is given at step i (diffusers: sigma * num_train_timesteps)
  sigmas     np [n + 1]  noise levels (sampling/flow.py's convention), sigmas[n] the final one (0)
  init(sample) -> state                       the solver's memory (a pytree; multistep solvers keep outputs)
  step(state, output, i, sample) -> (sample, state)   i is a traced int32, so every step runs one compiled body
and the model is `model_fn(params, x, timestep, cond) -> output` (the pipeline folds guidance into it).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm


def _value_key(obj: Any) -> Any:
  """A hashable key equal for equal schedulers: dataclass fields by value, numpy arrays by dtype, shape and bytes;
  anything else by its own hash, or by identity when it has none (then only the same object hits)."""
  if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
    return (type(obj), tuple((f.name, _value_key(getattr(obj, f.name))) for f in dataclasses.fields(obj)))
  if isinstance(obj, np.ndarray):
    return (obj.dtype.str, obj.shape, obj.tobytes())
  try:
    hash(obj)
  except TypeError:
    return ("id", id(obj))   # the cache entry's _Key keeps obj alive, so the id is not reused meanwhile
  return obj


class _Key:
  """lru_cache key of (model_fn, scheduler): the model_fn by its own hash (a value-hashable callable, e.g. a frozen
  dataclass, hits across calls; a closure only within one), the scheduler by value."""

  def __init__(self, model_fn, scheduler):
    self.model_fn, self.scheduler, self.key = model_fn, scheduler, (model_fn, _value_key(scheduler))

  def __hash__(self):
    return hash(self.key)

  def __eq__(self, other):
    return isinstance(other, _Key) and self.key == other.key


@functools.lru_cache(maxsize=16)
def _step(key: _Key) -> Callable:
  """The jitted step of one (model_fn, scheduler): compiled once, not once per sampling call."""
  model_fn, scheduler = key.model_fn, key.scheduler
  timesteps = jnp.asarray(scheduler.timesteps, jnp.float32)

  @jax.jit
  def one(params, x, state, i, cond):
    out = model_fn(params, x, timesteps[i], cond)
    return scheduler.step(state, out, i, x)

  return one


def denoise(model_fn: Callable[[Any, jax.Array, jax.Array, Any], jax.Array], params: Any, scheduler: Any,
            latents: jax.Array, cond: Any = None, *, progress: bool = False,
            on_step: Callable[[int, jax.Array], None] | None = None) -> jax.Array:
  """Runs the scheduler's steps from `latents` (at sigmas[0]); `on_step(i, x)` sees each step's output. Repeated
  calls with an equal model_fn (by hash) and an equal scheduler reuse one compiled step."""
  one = _step(_Key(model_fn, scheduler))
  x, state = latents, scheduler.init(latents)
  for i in tqdm(range(len(scheduler.timesteps)), desc="denoise", unit="step", disable=not progress):
    x, state = one(params, x, state, jnp.int32(i), cond)
    if on_step is not None:
      on_step(i, x)
  return x
