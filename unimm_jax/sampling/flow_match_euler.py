"""diffusers' FlowMatchEulerDiscreteScheduler (SD3, FLUX, SANA-Sprint, Ming): Euler steps of the flow ODE over a
shifted sigma grid.

Reference: diffusers schedulers/scheduling_flow_match_euler_discrete.py (`__init__`, `set_timesteps`, `step`,
`time_shift`, `stretch_shift_to_terminal`, `_convert_to_karras` / `_exponential` / `_beta`) and
pipelines/flux/pipeline_flux.py (`calculate_shift`). The grid is computed on the host in the dtypes diffusers
uses (float64 for its own linspace, float32 for given sigmas or timesteps) so the steps agree to float32 rounding.
Both of diffusers' time shifts are sampling/flow.py's `shift_sigmas`: exponential exp(mu) / (exp(mu) + 1/t - 1)
is shift_sigmas(t, exp(mu)) and linear mu / (mu + 1/t - 1) is shift_sigmas(t, mu).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unimm_jax.sampling.flow import shift_sigmas
from unimm_jax.sampling.schedulers import check_options, config_fields

DEFAULTS = dict(  # FlowMatchEulerDiscreteScheduler.__init__ defaults
    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096, invert_sigmas=False, shift_terminal=None,
    use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False, time_shift_type="exponential",
    stochastic_sampling=False,
)
# What `set_timesteps` takes (sigmas, timesteps, mu), the sequence length FLUX derives mu from, and the noise of
# stochastic sampling.
OPTIONS = ("sigmas", "timesteps", "mu", "image_seq_len", "rng")
WHERE = "FlowMatchEulerDiscreteScheduler"


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                    max_shift: float = 1.15) -> float:
  """FLUX's resolution-dependent mu: linear in the number of image tokens, base_shift at base_seq_len and
  max_shift at max_seq_len (pipeline_flux.calculate_shift)."""
  m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
  return image_seq_len * m + (base_shift - m * base_seq_len)


def _sigma_grid(c: Mapping[str, Any], steps: int, sigmas, timesteps, mu) -> tuple[np.ndarray, np.ndarray]:
  """-> (timesteps [n] float32, sigmas [n + 1] float32), as set_timesteps."""
  n_train = c["num_train_timesteps"]
  train = np.linspace(1, n_train, n_train, dtype=np.float32)[::-1] / n_train
  if not c["use_dynamic_shifting"]:
    train = shift_sigmas(train, c["shift"])
  sigma_max, sigma_min = float(train[0]), float(train[-1])

  given_timesteps = timesteps is not None
  if given_timesteps:
    timesteps = np.asarray(timesteps, np.float32)
  if sigmas is not None:
    s = np.asarray(sigmas, np.float32)
  else:
    if timesteps is None:
      timesteps = np.linspace(sigma_max * n_train, sigma_min * n_train, steps)
    s = timesteps / n_train
  if c["use_dynamic_shifting"]:
    s = shift_sigmas(s, math.exp(mu) if c["time_shift_type"] == "exponential" else mu)
  else:
    s = shift_sigmas(s, c["shift"])
  if c["shift_terminal"]:
    one_minus = 1 - s
    s = 1 - one_minus / (one_minus[-1] / (1 - c["shift_terminal"]))
  lo, hi = s[-1].item(), s[0].item()
  if c["use_karras_sigmas"]:
    rho = 7.0  # the EDM paper's
    ramp = np.linspace(0, 1, steps)
    s = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
  elif c["use_exponential_sigmas"]:
    s = np.exp(np.linspace(math.log(hi), math.log(lo), steps))
  elif c["use_beta_sigmas"]:
    import scipy.stats  # a dependency of jax
    s = np.array([lo + ppf * (hi - lo) for ppf in scipy.stats.beta.ppf(1 - np.linspace(0, 1, steps), 0.6, 0.6)])
  s = s.astype(np.float32)
  t = timesteps if given_timesteps else s * np.float32(n_train)
  if c["invert_sigmas"]:
    s = 1.0 - s
    t = s * np.float32(n_train)
    return t.astype(np.float32), np.append(s, np.float32(1.0)).astype(np.float32)
  return t.astype(np.float32), np.append(s, np.float32(0.0)).astype(np.float32)


@jax.tree_util.register_pytree_node_class
class FlowMatchEuler:
  """timesteps [n] (what the model is given, sigma * num_train_timesteps), sigmas [n + 1]; Euler steps
  x + (sigma_{i+1} - sigma_i) v, or with `stochastic_sampling` a re-noising of the predicted clean sample.
  A pytree (the grids and key are leaves) so that one compiled step serves every grid of the same length."""

  order = 1

  def __init__(self, timesteps: np.ndarray, sigmas: np.ndarray, *, stochastic: bool = False,
               rng: jax.Array | None = None):
    if stochastic and rng is None:
      raise ValueError(f"{WHERE}: stochastic_sampling needs the option rng (a jax.random key)")
    self.timesteps, self.sigmas, self.stochastic, self._rng = timesteps, sigmas, stochastic, rng

  def tree_flatten(self):
    return (self.timesteps, self.sigmas, self._rng), self.stochastic

  @classmethod
  def tree_unflatten(cls, stochastic, leaves):
    scheduler = object.__new__(cls)   # the leaves may be tracers: no re-validation
    scheduler.timesteps, scheduler.sigmas, scheduler._rng = leaves
    scheduler.stochastic = stochastic
    return scheduler

  @classmethod
  def from_config(cls, config: Mapping[str, Any], num_inference_steps: int, **options) -> "FlowMatchEuler":
    """options: sigmas or timesteps (custom grids, length num_inference_steps), mu or image_seq_len (dynamic
    shifting; image_seq_len goes through calculate_shift with the config's base/max lengths and shifts), rng."""
    check_options(options, OPTIONS, WHERE)
    c = config_fields(config, DEFAULTS, WHERE)
    if sum(bool(c[k]) for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")) > 1:
      raise ValueError(f"{WHERE}: use at most one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas")
    if c["time_shift_type"] not in ("exponential", "linear"):
      raise ValueError(f"{WHERE}: time_shift_type {c['time_shift_type']!r} is not 'exponential' or 'linear'")
    for name in ("sigmas", "timesteps"):
      grid: Sequence[float] | None = options.get(name)
      if grid is not None and len(grid) != num_inference_steps:
        raise ValueError(f"{WHERE}: {name} has {len(grid)} values for num_inference_steps={num_inference_steps}")
    if num_inference_steps < 1:
      raise ValueError(f"{WHERE}: num_inference_steps must be >= 1, got {num_inference_steps}")
    mu, seq_len = options.get("mu"), options.get("image_seq_len")
    if mu is not None and seq_len is not None:
      raise ValueError(f"{WHERE}: pass mu or image_seq_len, not both")
    if seq_len is not None:
      missing = [k for k in ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift") if c[k] is None]
      if missing:
        raise ValueError(f"{WHERE}: image_seq_len needs config fields {missing} (they are null)")
      mu = calculate_shift(seq_len, c["base_image_seq_len"], c["max_image_seq_len"], c["base_shift"],
                           c["max_shift"])
    if c["use_dynamic_shifting"] and mu is None:
      raise ValueError(f"{WHERE}: use_dynamic_shifting is set; pass the option mu or image_seq_len")
    timesteps, sigmas = _sigma_grid(c, num_inference_steps, options.get("sigmas"), options.get("timesteps"), mu)
    return cls(timesteps, sigmas, stochastic=bool(c["stochastic_sampling"]), rng=options.get("rng"))

  def init(self, sample: jax.Array) -> jax.Array | None:
    del sample
    return self._rng     # the solver keeps no outputs; stochastic sampling carries its key

  def step(self, state: jax.Array | None, output: jax.Array, i: jax.Array, sample: jax.Array):
    sigmas = jnp.asarray(self.sigmas)
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    x = sample.astype(jnp.float32)
    if self.stochastic:
      state, key = jax.random.split(state)
      clean = x - sigma * output
      x = (1.0 - sigma_next) * clean + sigma_next * jax.random.normal(key, x.shape, jnp.float32)
    else:
      x = x + (sigma_next - sigma) * output
    return x.astype(output.dtype), state
