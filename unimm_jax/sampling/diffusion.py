"""The denoising loop of the diffusers-style families (SANA, FLUX, MMDiT): a scheduler and one jitted step.

A scheduler (sampling/schedulers.py) is a plain object with
  timesteps  np [n]      what the model is given at step i (diffusers: sigma * num_train_timesteps)
  sigmas     np [n + 1]  noise levels (sampling/flow.py's convention), sigmas[n] the final one (0)
  init(sample) -> state                       the solver's memory (a pytree; multistep solvers keep outputs)
  step(state, output, i, sample) -> (sample, state)   i is a traced int32, so every step runs one compiled body
and is a pytree (its tables are leaves), and the model is `model_fn(params, x, timestep, cond) -> output` (the
pipeline folds guidance into it). The step is compiled once per model_fn, shapes and dtypes: a model_fn that
compares equal across calls (a frozen dataclass over the module and its static settings, as sampling/sana.py and
sampling/flux.py pass) reuses it from the second generate call on; a fresh closure compiles again each call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import functools

import jax
import jax.numpy as jnp
from tqdm import tqdm


def denoise(model_fn: Callable[[Any, jax.Array, jax.Array, Any], jax.Array], params: Any, scheduler: Any,
            latents: jax.Array, cond: Any = None, *, progress: bool = False,
            on_step: Callable[[int, jax.Array], None] | None = None) -> jax.Array:
  """Runs the scheduler's steps from `latents` (at sigmas[0]); `on_step(i, x)` sees each step's output."""
  timesteps = jnp.asarray(scheduler.timesteps, jnp.float32)
  x, state = latents, scheduler.init(latents)
  for i in tqdm(range(len(scheduler.timesteps)), desc="denoise", unit="step", disable=not progress):
    x, state = _step(model_fn, params, scheduler, timesteps, x, state, jnp.int32(i), cond)
    if on_step is not None:
      on_step(i, x)
  return x


@functools.partial(jax.jit, static_argnums=0)
def _step(model_fn, params, scheduler, timesteps, x, state, i, cond):
  return scheduler.step(state, model_fn(params, x, timesteps[i], cond), i, x)
