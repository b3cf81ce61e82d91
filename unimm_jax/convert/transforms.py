"""Tensor transforms between PyTorch layouts and ours, each a (forward, inverse) pair.

forward(x, target_shape) maps the PyTorch tensor to our layout; inverse(y) maps ours back.
All layout knowledge (Linear [out, in], conv OIHW, head splits) lives here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Transform:
  name: str
  forward: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]
  inverse: Callable[[np.ndarray], np.ndarray]
  # (axis, index, count): the rule reads slice `index` of `count` equal slices of its source tensor
  # (fused q/k/v). The engine requires the rules matching one source key to cover every slice, and
  # export concatenates the inverses along `axis`. None: the rule reads the whole tensor.
  part: tuple[int, int, int] | None = None

  @property
  def __name__(self) -> str:
    return self.name


identity = Transform("identity", lambda x, shape: x, lambda y: y)
# nn.Linear.weight [out, in] -> kernel [in, out]
transpose = Transform("transpose", lambda x, shape: x.T, lambda y: y.T)


def _to_heads(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  return x.reshape(shape) if x.ndim == 1 else x.T.reshape(shape)


def _to_heads_inv(y: np.ndarray) -> np.ndarray:
  return y.reshape(-1) if y.ndim == 2 else y.reshape(y.shape[0], -1).T


# q/k/v: weight [h*e, d] -> kernel [d, h, e]; bias [h*e] -> [h, e]
to_heads = Transform("to_heads", _to_heads, _to_heads_inv)
# o_proj: weight [d, h*e] -> kernel [h, e, d]
from_heads = Transform(
    "from_heads", lambda x, shape: x.T.reshape(shape), lambda y: y.reshape(-1, y.shape[-1]).T)
# Conv2d weight OIHW -> HWIO; Conv3d OIDHW -> DHWIO
conv2d = Transform("conv2d", lambda x, shape: x.transpose(2, 3, 1, 0), lambda y: y.transpose(3, 2, 0, 1))
conv3d = Transform(
    "conv3d", lambda x, shape: x.transpose(2, 3, 4, 1, 0), lambda y: y.transpose(4, 3, 0, 1, 2))
# SigLIP2 / NaViT patch embedding: nn.Linear weight [d, p*p*c] over (py, px, c)-flattened patches
# -> kernel [p p c d], the HWIO layout of the equivalent stride-p conv.
patch_linear = Transform(
    "patch_linear", lambda x, shape: x.T.reshape(shape), lambda y: y.reshape(-1, y.shape[-1]).T)


def part(index: int, count: int, then: Transform = identity, axis: int = 0) -> Transform:
  """Slice `index` of `count` equal slices of the source along `axis`, then `then`.

  For fused projections (torch MultiheadAttention in_proj_weight [3d, d] -> q, k, v): one rule per
  slice, all matching the same source key.
  """
  if not 0 <= index < count:
    raise ValueError(f"part: index {index} is not in [0, {count})")

  def forward(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if x.shape[axis] % count:
      raise ValueError(f"axis {axis} of shape {x.shape} does not split into {count} equal parts")
    return then.forward(np.split(x, count, axis=axis)[index], shape)

  return Transform(f"part({index}/{count})+{then.name}", forward, then.inverse, part=(axis, index, count))


def uneven_part(index: int, count: int, then: Transform = identity, kernel: bool = True) -> Transform:
  """Slice `index` of a tensor fused along axis 0 from count - 1 equal slices and a last one of another size
  (FLUX / Ovis-U1 single blocks' linear1 = [q; k; v; mlp]). Each slice is as wide as its target: the target's
  size without its input axis (kernels [d_in, ...]) or its whole size (biases); the last slice is the rest.
  Export concatenates the slices back in index order."""
  if not 0 <= index < count:
    raise ValueError(f"uneven_part: index {index} is not in [0, {count})")

  def forward(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    width = int(np.prod(shape[1:] if kernel else shape))
    start = x.shape[0] - width if index == count - 1 else index * width
    if start < 0 or (index < count - 1 and (index + 1) * width > x.shape[0] - 1):
      raise ValueError(f"slice {index} of {count} ({width} rows) does not fit a fused tensor of shape {x.shape}")
    return then.forward(x[start:start + width], shape)

  return Transform(f"uneven_part({index}/{count})+{then.name}", forward, then.inverse, part=(0, index, count))


def trailing_ones(n: int) -> Transform:
  """[c, 1, ..., 1] with n trailing ones (Wan RMS_norm gammas, broadcast over t h w) <-> [c]."""

  def forward(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if x.shape[1:] != (1,) * n:
      raise ValueError(f"expected shape [c{', 1' * n}], got {x.shape}")
    return x.reshape(shape)

  return Transform(f"trailing_ones({n})", forward, lambda y: y.reshape(*y.shape, *(1,) * n))


def _drop_batch_axis(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  if x.shape[:1] != (1,):
    raise ValueError(f"expected a leading axis of 1 (a [1, ...] table), got {x.shape}")
  return x[0]


# [1, n, d] -> [n, d]: a position table stored with a batch axis (Ovis-U1's AIMv2 pos_embed)
drop_batch_axis = Transform("drop_batch_axis", _drop_batch_axis, lambda y: y[None])


def _pointwise(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  if x.shape[2:] != (1, 1):
    raise ValueError(f"expected a 1x1 conv weight [o i 1 1], got {x.shape}")
  return x[:, :, 0, 0].T


# 1x1 Conv2d weight [o, i, 1, 1] -> dense kernel [i, o] (SANA / DC-AE Mix-FFN projections)
pointwise = Transform("pointwise", _pointwise, lambda y: y.T[:, :, None, None])
