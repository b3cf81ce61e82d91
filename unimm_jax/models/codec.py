"""The latent codec interface every autoencoder implements (AutoencoderKL, the Wan VAEs, DC-AE), so samplers and
trainers call one set of names whatever the autoencoder.

A codec module (linen) has
  encode(x) -> posterior        images [b H W c] (or videos [b T H W c]) in [-1, 1] -> `DiagonalGaussian`
                                (KL VAEs) or `Deterministic` (DC-AE); `.mode()` is the deterministic latent
  decode(z) -> x                latents [b h w z] (videos [b t h w z]) -> pixels in [-1, 1]
  tiled_encode / tiled_decode   the same over overlapping tiles (large images)
  normalize(z) / denormalize(z) posterior latents <-> the diffusion model's latents, by `cfg.latent_norm()`
and its config has `latent_channels`, `spatial_downscale`, `temporal_downscale` (1 for image codecs) and
`latent_norm() -> LatentNorm`. A model trained with other latent statistics than its codec's own (TUNA: mean =
std of Wan 2.2) holds its own LatentNorm and calls `norm.apply` / `norm.invert` instead.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class LatentNorm:
  """diffusion latent = (z - shift) * factor / std, per channel (tuples) or for all channels (floats).

  Covers SD / SDXL (shift 0, factor = scaling_factor), FLUX (shift = shift_factor), checkpoints with
  per-channel statistics ((z - mean) * factor / std) and Wan ((z - mean) / std).
  """

  shift: float | tuple[float, ...] = 0.0
  std: float | tuple[float, ...] = 1.0
  factor: float = 1.0

  def apply(self, z: jax.Array) -> jax.Array:
    return (z - jnp.asarray(self.shift, z.dtype)) * self.factor / jnp.asarray(self.std, z.dtype)

  def invert(self, z: jax.Array) -> jax.Array:
    return z * jnp.asarray(self.std, z.dtype) / self.factor + jnp.asarray(self.shift, z.dtype)


@flax.struct.dataclass
class DiagonalGaussian:
  """Posterior q(z|x): mean and log-variance (clamped to [-30, 20] as diffusers does), both [b ... z]."""

  mean: jax.Array
  logvar: jax.Array

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  def mode(self) -> jax.Array:
    return self.mean

  def sample(self, rng: jax.Array) -> jax.Array:
    return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

  @classmethod
  def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return cls(mean, jnp.clip(logvar, -30.0, 20.0))


@flax.struct.dataclass
class Deterministic:
  """The posterior of a deterministic autoencoder (DC-AE): every sample is the latent itself."""

  mean: jax.Array

  def mode(self) -> jax.Array:
    return self.mean

  def sample(self, rng: jax.Array) -> jax.Array:
    del rng
    return self.mean
