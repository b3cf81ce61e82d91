"""Flow-matching training shared by every family: noise levels, the resolution shift, the path and its target.

The convention of sampling/flow.py: sigma is the noise level (1 = noise), x_sigma = (1 - sigma) clean + sigma noise,
target dx/dsigma = noise - clean. TUNA (t = 1 - sigma clean) converts at its edge (training/tuna_objective.py).
"""

from __future__ import annotations

import math

import jax


def logit_normal(rng: jax.Array, shape: tuple[int, ...], mean: float = 0.0, std: float = 1.0) -> jax.Array:
  """sigmoid(N(mean, std^2)): SD3's logit-normal draw in (0, 1)."""
  return jax.nn.sigmoid(mean + std * jax.random.normal(rng, shape))


def shift_mu(seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15, base_len: int = 256,
             max_len: int = 4096) -> float:
  """The resolution shift mu, linear in the image's token count through (base_len, base_shift) and
  (max_len, max_shift) (FLUX's calculate_shift; TUNA uses it with seq_len 1024)."""
  return base_shift + (max_shift - base_shift) / (max_len - base_len) * (seq_len - base_len)


def time_shift(sigma: jax.Array, mu: float) -> jax.Array:
  """e^mu / (e^mu + 1 / sigma - 1): more noise for larger images (FLUX's exponential time shift)."""
  return math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))


def add_noise(clean: jax.Array, noise: jax.Array, sigma: jax.Array, alpha: jax.Array | None = None) -> jax.Array:
  """x_sigma = alpha clean + sigma noise with alpha = 1 - sigma. A caller that holds alpha itself (TUNA's t)
  passes it, so its path has no extra rounding of 1 - (1 - t)."""
  return (1 - sigma if alpha is None else alpha) * clean + sigma * noise


def velocity_target(clean: jax.Array, noise: jax.Array) -> jax.Array:
  """dx/dsigma along the straight path: noise - clean (what FLUX / SANA / diffusers flow models predict)."""
  return noise - clean

