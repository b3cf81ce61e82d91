"""DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095) multistep, on flow-matching sigmas: SANA's sampler.

Reference: diffusers schedulers/scheduling_dpmsolver_multistep.py (DPMSolverMultistepScheduler with
use_flow_sigmas=True, prediction_type="flow_prediction"), read from a diffusers scheduler_config.json.

With flow sigmas alpha = 1 - sigma, lambda = log(alpha / sigma); the model's velocity v becomes the data
prediction x0 = x - sigma v, and each step is
  first order   x' = (sigma'/sigma) x - alpha' (e^-h - 1) x0                      h = lambda' - lambda
  second order  ... - 0.5 alpha' (e^-h - 1) D1 (midpoint) or + alpha' ((e^-h - 1)/h + 1) D1 (heun),
                D1 = (x0 - x0_prev) / r, r = (lambda - lambda_prev) / h.
The step order is known per step (first at step 0 and, with final_sigmas_type "zero", at the last step,
which lands exactly on x0), so the per-step scalars are tables computed once in float32 as diffusers does,
and `step` is the same traced body for every i.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

NAME = "DPMSolverMultistepScheduler"
# Fields whose diffusers default is not SANA's, or that fix the math: a config without them is refused.
REQUIRED = ("num_train_timesteps", "solver_order", "prediction_type", "algorithm_type", "solver_type",
            "lower_order_final", "use_flow_sigmas", "flow_shift", "final_sigmas_type")
# Every other field diffusers knows, with the one value this implementation follows (its default).
FIXED = {"thresholding": False, "use_karras_sigmas": False, "use_exponential_sigmas": False,
         "use_beta_sigmas": False, "use_lu_lambdas": False, "time_shift_type": "exponential"}
OPTIONAL = {"euler_at_final": False, "use_dynamic_shifting": False}
# No effect with flow sigmas: the betas / alphas_cumprod (and what clips or spaces their timesteps) are replaced
# by the flow grid, variance_type only reads epsilon predictions, the thresholding knobs only thresholding.
INERT = ("beta_start", "beta_end", "beta_schedule", "trained_betas", "dynamic_thresholding_ratio",
         "sample_max_value", "lambda_min_clipped", "variance_type", "timestep_spacing", "steps_offset",
         "rescale_betas_zero_snr")
SUPPORTED = {"solver_order": (1, 2), "prediction_type": ("flow_prediction",), "algorithm_type": ("dpmsolver++",),
             "solver_type": ("midpoint", "heun"), "use_flow_sigmas": (True,), "final_sigmas_type": ("zero",)}


def check_config(d: Mapping[str, Any]) -> dict[str, Any]:
  """The scheduler config with OPTIONAL defaults filled; raises naming a missing, unknown or unsupported field."""
  known = set(REQUIRED) | set(FIXED) | set(OPTIONAL) | set(INERT)
  unknown = sorted(k for k in d if not k.startswith("_") and k not in known)
  if unknown:
    raise ValueError(f"{NAME} config: unknown field(s) {unknown}")
  missing = [k for k in REQUIRED if k not in d]
  if missing:
    raise ValueError(f"{NAME} config: missing field(s) {missing} (scheduler_config.json must set them)")
  for key, allowed in SUPPORTED.items():
    if d[key] not in allowed:
      raise NotImplementedError(f"{NAME} config: {key}={d[key]!r} is not supported (supported: {allowed})")
  for key, want in FIXED.items():
    if d.get(key, want) != want:
      raise NotImplementedError(f"{NAME} config: {key}={d[key]!r} is not supported (only {want!r})")
  return {**OPTIONAL, **{k: d[k] for k in (*REQUIRED, *OPTIONAL) if k in d}}


def flow_sigmas(steps: int, num_train_timesteps: int, shift: float) -> np.ndarray:
  """diffusers' flow grid (float64): `steps` noise levels from 1 - 1/T, shifted; the final 0 is not included."""
  sigmas = 1.0 - np.linspace(1, 1 / num_train_timesteps, steps + 1)
  return np.flip(shift * sigmas / (1 + (shift - 1) * sigmas))[:-1].copy()


@dataclasses.dataclass(frozen=True, eq=False)
class DPMSolverMultistep:
  """The interface of sampling/diffusion.py. State: the previous step's data prediction x0 (zeros at first)."""

  timesteps: np.ndarray    # [n] int64, sigma * num_train_timesteps truncated, as diffusers
  sigmas: np.ndarray       # [n + 1] float32, sigmas[n] = 0
  a: np.ndarray            # [n] sigma_next / sigma
  b: np.ndarray            # [n] alpha_next (e^-h - 1)
  c: np.ndarray            # [n] coefficient of D1 (0 on first-order steps), subtracted
  inv_r: np.ndarray        # [n] 1 / r (0 on first-order steps)

  @classmethod
  def from_config(cls, config: Mapping[str, Any], num_inference_steps: int, *, mu: float | None = None
                  ) -> "DPMSolverMultistep":
    """`mu`: dynamic shifting (flow_shift = e^mu), as diffusers' set_timesteps(mu=...)."""
    d = check_config(config)
    if num_inference_steps < 1:
      raise ValueError(f"{NAME}: num_inference_steps must be >= 1, got {num_inference_steps}")
    shift = float(d["flow_shift"])
    if mu is not None:
      if not d["use_dynamic_shifting"]:
        raise ValueError(f"{NAME}: mu={mu} needs use_dynamic_shifting=True in the config")
      shift = float(np.exp(mu))
    t_train = int(d["num_train_timesteps"])
    grid = flow_sigmas(num_inference_steps, t_train, shift)
    timesteps = (grid * t_train).astype(np.int64)
    sigmas = np.concatenate([grid, [0.0]]).astype(np.float32)
    n = len(timesteps)
    final_first = d["euler_at_final"] or (d["lower_order_final"] and n < 15) or d["final_sigmas_type"] == "zero"
    second = np.array([d["solver_order"] == 2 and i > 0 and not (i == n - 1 and final_first) for i in range(n)])

    with np.errstate(divide="ignore", invalid="ignore"):   # the last sigma is 0: lambda = +inf, e^-h = 0
      alpha = np.float32(1) - sigmas
      lam = np.log(alpha) - np.log(sigmas)
      h = lam[1:] - lam[:-1]
      a = sigmas[1:] / sigmas[:-1]
      b = alpha[1:] * (np.exp(-h) - np.float32(1))
      if d["solver_type"] == "midpoint":
        c = np.float32(0.5) * b
      else:   # heun adds alpha' ((e^-h - 1) / h + 1) D1
        c = -(alpha[1:] * ((np.exp(-h) - np.float32(1)) / h + np.float32(1)))
      r = np.concatenate([[np.float32(1)], (lam[1:-1] - lam[:-2])]) / h
      inv_r = np.float32(1) / r
    zero = np.float32(0)
    return cls(timesteps, sigmas, a.astype(np.float32), b.astype(np.float32),
               np.where(second, c, zero).astype(np.float32), np.where(second, inv_r, zero).astype(np.float32))

  def init(self, sample: jax.Array) -> jax.Array:
    return jnp.zeros(sample.shape, jnp.float32)

  def step(self, state: jax.Array, output: jax.Array, i: jax.Array, sample: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One step from sigmas[i] to sigmas[i + 1] given the model's velocity `output`; `i` may be traced."""
    take = lambda table: jnp.asarray(table)[i]   # noqa: E731
    x = sample.astype(jnp.float32)
    x0 = x - take(self.sigmas) * output.astype(jnp.float32)
    d1 = take(self.inv_r) * (x0 - state)
    out = take(self.a) * x - take(self.b) * x0 - take(self.c) * d1
    return out.astype(output.dtype), x0


# A pytree (every table a leaf) so that one compiled step serves every grid of the same length.
jax.tree_util.register_dataclass(
    DPMSolverMultistep, data_fields=[f.name for f in dataclasses.fields(DPMSolverMultistep)], meta_fields=[])
