"""Convolutions over channels-last images (NHWC) and videos (NTHWC), with logical axes on the kernel.

Kernels are [*window, in, out] annotated (None, ..., "conv_in", "conv_out"); PyTorch's OI... layout is
converted by `convert.transforms.conv2d` / `conv3d`. `CausalConv3D` pads time on the left only, or
takes the previous frames from a streaming cache instead of zeros.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

default_kernel_init = nn.initializers.lecun_normal()


class Conv(nn.Module):
  """N-d convolution (N = 1..3), x [b *spatial c] -> [b *spatial' features].

  padding: ((lo, hi), ...) per spatial dim; None pads "same" (k-1)//2 / k//2.
  causal: the first spatial dim is time and is padded (k_t - 1, 0), or prefixed with `context`
  [b k_t-1 ... c] (the previous chunk's last frames), so chunked and whole-clip results agree.
  """

  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] | None = None
  padding: Sequence[tuple[int, int]] | None = None
  use_bias: bool = True
  causal: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
    nd = len(self.kernel_size)
    if x.ndim != nd + 2:
      raise ValueError(f"{self.name}: input {x.shape} is not [b {'t h w'[-2 * nd + 1:]} c]")
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(default_kernel_init, (None,) * nd + ("conv_in", "conv_out")),
        (*self.kernel_size, x.shape[-1], self.features), self.param_dtype)
    padding = list(self.padding if self.padding is not None
                   else [((k - 1) // 2, k // 2) for k in self.kernel_size])
    if self.causal:
      kt = self.kernel_size[0]
      padding[0] = (kt - 1, 0)
      if context is not None:
        if context.shape[1] != kt - 1:
          raise ValueError(f"{self.name}: context has {context.shape[1]} frames, kernel needs {kt - 1}")
        x, padding[0] = jnp.concatenate([context.astype(x.dtype), x], axis=1), (0, 0)
    elif context is not None:
      raise ValueError(f"{self.name}: context is only meaningful for a causal conv")
    dims = "DHW"[3 - nd:]
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype), window_strides=tuple(self.strides or (1,) * nd),
        padding=[tuple(p) for p in padding], dimension_numbers=(f"N{dims}C", f"{dims}IO", f"N{dims}C"))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class CausalConv3D(Conv):
  """Conv over [b t h w c] that sees only past frames (Wan / MagViT-style causal video conv)."""

  kernel_size: Sequence[int] = (3, 3, 3)
  causal: bool = True
