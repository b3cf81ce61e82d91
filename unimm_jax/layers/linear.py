"""Dense projections written as einsums over named axes, with logical partitioning on the kernel."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from unimm_jax import sharding

default_kernel_init = nn.initializers.normal(stddev=0.02)


class DenseGeneral(nn.Module):
  """y = x · W + b contracting the last `len(in_features)` axes of x.

  Kernel shape in_features + out_features, annotated with `kernel_axes` (one logical name per dim);
  the bias (out_features) takes the trailing names. Compute in `dtype`, params stored in `param_dtype`.
  """

  in_features: Sequence[int]
  out_features: Sequence[int]
  kernel_axes: Sequence[str | None]
  use_bias: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  kernel_init: nn.initializers.Initializer = default_kernel_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n_in, n_out = len(self.in_features), len(self.out_features)
    if len(self.kernel_axes) != n_in + n_out:
      raise ValueError(f"{self.name}: kernel_axes {self.kernel_axes} need {n_in + n_out} names")
    sharding.check_logical_names(self.kernel_axes, self.name or "DenseGeneral")
    if tuple(x.shape[-n_in:]) != tuple(self.in_features):
      raise ValueError(f"{self.name}: input {x.shape} does not end with {tuple(self.in_features)}")
    shape = tuple(self.in_features) + tuple(self.out_features)
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(self.kernel_init, tuple(self.kernel_axes)), shape,
        self.param_dtype)
    y = jax.lax.dot_general(
        x.astype(self.dtype), kernel.astype(self.dtype),
        ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())))
    if self.use_bias:
      bias = self.param(
          "bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), tuple(self.kernel_axes[n_in:])),
          tuple(self.out_features), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y
