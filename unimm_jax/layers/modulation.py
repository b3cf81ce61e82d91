"""Timestep embedding and adaptive-norm modulation (DiT AdaLN-Zero)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from unimm_jax.layers.linear import DenseGeneral


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """x * (1 + scale) + shift, computed in fp32 (as DiT / TUNA), returned in x.dtype."""
  y = x.astype(jnp.float32) * (1 + scale.astype(jnp.float32)) + shift.astype(jnp.float32)
  return y.astype(x.dtype)


def timestep_features(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """[...] times -> [... dim] sinusoids [cos(t f), sin(t f)], f_j = max_period^(-j / (dim/2)) (GLIDE/DiT)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[..., None] * freqs
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[..., :1])], axis=-1)
  return emb


class TimestepEmbedder(nn.Module):
  """[...] times -> [... d]: sinusoid features -> Linear -> SiLU -> Linear (names mlp_0, mlp_2)."""

  features: int
  frequency_dim: int = 256
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
    h = timestep_features(t, self.frequency_dim).astype(self.dtype)
    h = DenseGeneral((self.frequency_dim,), (self.features,), (None, "embed"), name="mlp_0", **kw)(h)
    return DenseGeneral((self.features,), (self.features,), ("mlp", "embed"), name="mlp_2", **kw)(jax.nn.silu(h))


class AdaLNModulation(nn.Module):
  """SiLU -> Linear(d, n d) of a conditioning vector: [... d] -> n chunks [... d] (zero-init: AdaLN-Zero)."""

  features: int
  chunks: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, c: jax.Array) -> tuple[jax.Array, ...]:
    out = DenseGeneral((self.features,), (self.chunks * self.features,), ("embed", "mlp"), use_bias=True,
                       kernel_init=nn.initializers.zeros_init(), name="linear", dtype=self.dtype,
                       param_dtype=self.param_dtype)(jax.nn.silu(c))
    return tuple(jnp.split(out, self.chunks, axis=-1))
