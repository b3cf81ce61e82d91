"""Normalisation layers; statistics always in fp32."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class RMSNorm(nn.Module):
  """x / rms(x) * scale over the last axis (Qwen/LLaMA: normalise in fp32, cast, then scale)."""

  features: int
  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                       (self.features,), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * y.astype(self.dtype)


class LayerNorm(nn.Module):
  """Standard LayerNorm over the last axis with learnable scale and bias; without either (`use_scale` and
  `use_bias` False, torch's elementwise_affine=False) it has no params (DiT / FLUX before a modulation)."""

  features: int
  eps: float = 1e-6
  use_bias: bool = True
  use_scale: bool = True
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    if self.use_scale:
      scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                         (self.features,), self.param_dtype)
      y = y * scale.astype(jnp.float32)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(jnp.float32)
    return y.astype(self.dtype)


class GroupNorm(nn.Module):
  """torch.nn.GroupNorm on channels-last x [b ... c]: statistics per (sample, group) over all other axes."""

  features: int
  groups: int = 32
  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.features % self.groups or x.shape[-1] != self.features:
      raise ValueError(f"{self.name}: {x.shape[-1]} channels for features={self.features}, groups={self.groups}")
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                       (self.features,), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
                      (self.features,), self.param_dtype)
    x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], self.groups, self.features // self.groups)
    axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)          # every axis but batch and group
    mean = jnp.mean(x32, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=axes, keepdims=True)
    y = ((x32 - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class L2Norm(nn.Module):
  """x / max(||x||_2, eps) * sqrt(d) * scale over the last axis: F.normalize-based RMS norm (Wan VAE).

  Equals RMSNorm up to where eps enters (it clamps the norm instead of adding to the mean square).
  """

  features: int
  eps: float = 1e-12
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                       (self.features,), self.param_dtype)
    x32 = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True))
    y = x32 / jnp.maximum(norm, self.eps) * (self.features ** 0.5)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)
