"""Flow-matching sampling shared by every family: time grids, the Euler ODE step, guidance algebra, and turning a
clean-sample prediction into a velocity.

One time convention inside: sigma in [0, 1] is the noise level, sigma = 1 pure noise and sigma = 0 the clean
sample, x_sigma = (1 - sigma) x_clean + sigma noise, and the velocity is dx/dsigma = noise - x_clean (diffusers,
FLUX, SANA). Families whose time runs the other way convert at their edge: TUNA's t = 1 - sigma (t = 1 clean)
and its velocity x_clean - noise = -dx/dsigma (sampling/tuna.py). The Euler step is written for any monotone
grid, so the same function integrates both.
Shapes: n samples, N tokens or pixels, o values; branches of guidance are stacked on a leading axis.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

# A clean-sample prediction divides by the noise level left; near sigma = 0 that blows up, and the last Euler
# step lands there, so the denominator is clamped (JiT / TUNA-2 use 1e-3 as well).
MIN_SIGMA = 1e-3


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
  """SD3 / FLUX / TUNA time shift: sigma -> shift sigma / (1 + (shift - 1) sigma), more steps at high noise."""
  return shift * sigmas / (1 + (shift - 1) * sigmas)


def shifted_grid(steps: int, shift: float) -> np.ndarray:
  """`steps` noise levels from 1 to 0 (float64), uniformly spaced then shifted; steps - 1 Euler steps."""
  if steps < 2:
    raise ValueError(f"a time grid needs at least 2 points, got steps={steps}")
  return shift_sigmas(np.linspace(1.0, 0.0, steps, dtype=np.float64), shift)


def euler(velocity: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array, grid: np.ndarray,
          progress: bool = False) -> jax.Array:
  """Integrates dx/dg = velocity(x, g) over the grid (any convention, increasing or decreasing) from x(grid[0])."""
  for i in tqdm(range(len(grid) - 1), desc="sample", unit="step", disable=not progress):
    x = x + float(grid[i + 1] - grid[i]) * velocity(x, jnp.float32(grid[i]))
  return x


def velocity_from_clean(clean: jax.Array, x: jax.Array, sigma: jax.Array) -> jax.Array:
  """dx/dsigma of a model that predicts the clean sample (TUNA-2, JiT): (x - clean) / sigma, sigma clamped."""
  return (x - clean) / jnp.maximum(sigma, MIN_SIGMA)


def combine(branches: Sequence[jax.Array], weights: Sequence[float]) -> jax.Array:
  """sum_i w_i branch_i: every guidance rule below is such a weighted sum of the batched branches' outputs."""
  if len(branches) != len(weights):
    raise ValueError(f"guidance: {len(branches)} branches for {len(weights)} weights")
  return sum(w * b for w, b in zip(weights, branches))


def text_guidance(scale: float) -> tuple[float, ...]:
  """Weights of (conditional, unconditional): u + g (c - u); scale 1 runs the conditional branch alone."""
  return (1.0,) if scale == 1.0 else (scale, 1.0 - scale)


def image_text_guidance(text: float, image: float) -> tuple[float, float, float]:
  """Weights of (full, image only, neither) for InstructPix2Pix-style editing:
  v_none + g_i (v_image - v_none) + g_t (v_full - v_image)."""
  return (text, image - text, 1.0 - image)
