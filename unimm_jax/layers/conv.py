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
from einops import rearrange

default_kernel_init = nn.initializers.lecun_normal()


class Conv(nn.Module):
  """N-d convolution (N = 1..3), x [b *spatial c] -> [b *spatial' features].

  padding: ((lo, hi), ...) per spatial dim; None pads "same" (k-1)//2 / k//2.
  causal: the first spatial dim is time and is padded (k_t - 1, 0), or prefixed with `context`
  [b k_t-1 ... c] (the previous chunk's last frames), so chunked and whole-clip results agree.
  groups: torch's `groups` (kernel [*window, in/groups, out]); groups = in = out is a depthwise conv.
  """

  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] | None = None
  padding: Sequence[tuple[int, int]] | None = None
  use_bias: bool = True
  causal: bool = False
  upsample: bool = False    # nearest 2x upsampling of the input first (2D, 3x3, stride 1, "same" only)
  groups: int = 1
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
    nd = len(self.kernel_size)
    if x.ndim != nd + 2:
      raise ValueError(f"{self.name}: input {x.shape} is not [b {'t h w'[-2 * nd + 1:]} c]")
    if x.shape[-1] % self.groups or self.features % self.groups:
      raise ValueError(f"{self.name}: {x.shape[-1]} -> {self.features} channels do not split into "
                       f"{self.groups} groups")
    if self.groups > 1 and (self.upsample or self.causal):
      raise ValueError(f"{self.name}: groups={self.groups} is only supported for a plain conv")
    per_group = x.shape[-1] // self.groups      # 1 for a depthwise conv: nothing to shard on that axis
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(
            default_kernel_init, (None,) * nd + ("conv_in" if per_group > 1 else None, "conv_out")),
        (*self.kernel_size, per_group, self.features), self.param_dtype)
    padding = list(self.padding if self.padding is not None
                   else [((k - 1) // 2, k // 2) for k in self.kernel_size])
    strides = tuple(self.strides or (1,) * nd)
    if context is not None and not self.causal:
      raise ValueError(f"{self.name}: context is only meaningful for a causal conv")
    if self.causal and context is not None and context.shape[1] != self.kernel_size[0] - 1:
      raise ValueError(f"{self.name}: context has {context.shape[1]} frames, kernel needs {self.kernel_size[0] - 1}")
    taps = self.causal and nd == 3 and strides[0] == 1
    if self.upsample and (nd != 2 or tuple(self.kernel_size) != (3, 3) or strides != (1, 1)
                          or self.padding is not None):
      raise ValueError(f"{self.name}: upsample needs a 2D 3x3 stride-1 'same' conv, got {self.kernel_size}")
    if self.upsample or taps or jnp.dtype(self.dtype) != kernel.dtype:   # the kernel is transformed
      kernel = _after(kernel, x)
    kernel = kernel.astype(self.dtype)
    if self.upsample:
      y = _upsample2x_conv3x3(x.astype(self.dtype), kernel)
    elif taps:
      y = _causal_taps(x.astype(self.dtype), kernel, context, padding[1:], strides[1:])
    else:
      if self.causal:
        padding[0] = (self.kernel_size[0] - 1, 0)
        if context is not None:
          x, padding[0] = jnp.concatenate([context.astype(x.dtype), x], axis=1), (0, 0)
      depthwise = per_group == 1 and self.groups == self.features and nd == 2 and strides == (1, 1)
      y = (_depthwise(x.astype(self.dtype), kernel, padding) if depthwise
           else _conv(x.astype(self.dtype), kernel, padding, strides, self.groups))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


def _after(kernel: jax.Array, x: jax.Array) -> jax.Array:
  """The kernel, made computable only once x exists (kernel + an exact 0 derived from x).

  Kernel transforms (a time tap's slice, the phase folds, a cast to the compute dtype) read only weights,
  so XLA:CPU schedules them
  all before the first conv and keeps a transformed copy of every kernel alive at once: measured 27
  tap slices of 36 MiB live together in a Wan 2.2 1024^2 decode. An optimization_barrier does not
  survive to scheduling; a data dependence does. nan_to_num keeps the 0 exact for non-finite x.
  """
  zero = jnp.nan_to_num(x.reshape(-1)[0].astype(jnp.float32) * 0.0, nan=0.0, posinf=0.0, neginf=0.0)
  return kernel + zero.astype(kernel.dtype)


def _conv(x: jax.Array, kernel: jax.Array, padding, strides, groups: int = 1) -> jax.Array:
  dims = "DHW"[3 - (x.ndim - 2):]
  return jax.lax.conv_general_dilated(x, kernel, window_strides=strides, padding=[tuple(p) for p in padding],
                                      dimension_numbers=(f"N{dims}C", f"{dims}IO", f"N{dims}C"),
                                      feature_group_count=groups)


def _depthwise(x: jax.Array, kernel: jax.Array, padding) -> jax.Array:
  """Depthwise stride-1 2D conv as a sum of shifted, per-channel-scaled copies of the padded input.

  Why not conv_general_dilated(feature_group_count=c): XLA:CPU runs that 5x slower (measured 2.9 s vs 0.58 s
  for SANA-1.6B's 3x3 over 11200 channels at 32 x 32); the k*k multiply-adds fuse into one loop.
  """
  kh, kw = kernel.shape[:2]
  xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  h, w = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
  y = None
  for i in range(kh):
    for j in range(kw):
      term = xp[:, i:i + h, j:j + w, :] * kernel[i, j, 0]
      y = term if y is None else y + term
  return y


def _upsample2x_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """conv3x3(nearest_upsample_2x(x)) with zero padding 1, without building the upsampled input.

  Output pixel (2i + a, 2j + b) only reads input rows i - 1 + a .. i + a and columns j - 1 + b .. j + b:
  the 3 kernel taps of a row phase fold into 2 (a = 0: [w0, w1 + w2]; a = 1: [w0 + w1, w2]), so each of
  the 4 phases is a 2x2 conv at the input's resolution -- 2.25x fewer multiply-adds.
  """
  def fold(k, axis, phase):
    k0, k1, k2 = (jnp.take(k, i, axis=axis) for i in range(3))
    return jnp.stack([k0, k1 + k2] if phase == 0 else [k0 + k1, k2], axis=axis)

  pad = ((1, 0), (0, 1))   # phase 0 reads one row / column before, phase 1 one after
  phases = [[_conv(x, fold(fold(kernel, 0, a), 1, b), (pad[a], pad[b]), (1, 1)) for b in (0, 1)] for a in (0, 1)]
  return rearrange(jnp.stack([jnp.stack(p) for p in phases]), "a b n h w o -> n (h a) (w b) o")


def _causal_taps(x: jax.Array, kernel: jax.Array, context: jax.Array | None, padding, strides) -> jax.Array:
  """Causal video conv [b t h w c] as a sum over time taps of 2D convs over frames.

  Why not one 3D conv: XLA:CPU runs 2D convolutions several times faster than 3D ones, and without
  `context` (zeros before the first frame) each tap skips the frames that would only read zeros, so a
  1-frame image costs one 2D conv instead of a 3D conv over two frames of padding.
  """
  kt, t = kernel.shape[0], x.shape[1]
  stream = x if context is None else jnp.concatenate([context.astype(x.dtype), x], axis=1)
  y = None
  for k in range(kt):
    skip = kt - 1 - k if context is None else 0       # leading output frames whose input is padding
    if skip >= t:
      continue
    start = k if context is not None else 0
    frames = stream[:, start:start + t - skip]
    out = _conv(rearrange(frames, "b t h w c -> (b t) h w c"), kernel[k], padding, strides)
    out = rearrange(out, "(b t) h w c -> b t h w c", b=x.shape[0])
    out = jnp.pad(out, ((0, 0), (skip, 0), (0, 0), (0, 0), (0, 0)))
    y = out if y is None else y + out
  return y


class CausalConv3D(Conv):
  """Conv over [b t h w c] that sees only past frames (Wan / MagViT-style causal video conv)."""

  kernel_size: Sequence[int] = (3, 3, 3)
  causal: bool = True
