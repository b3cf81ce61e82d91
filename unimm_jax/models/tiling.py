"""Overlapping-tile encode/decode shared by the VAEs, blended exactly as diffusers does.

A large image (or every frame of a video) is cut into tiles starting every `stride` rows/columns
(edge tiles are smaller, as in diffusers), each tile goes through the same network, and neighbours
are cross-faded over `blend` rows/columns: top first, then left, each against the already blended
neighbour, keeping the first `keep` rows/columns of every tile. Tiles of one shape are stacked and
run by `nn.scan`, so one compiled body serves them all and activations are those of one tile (but
see docs/vae.md: XLA hoists loop-invariant kernel flips of single-frame 3-D convs out of the loop).
Arrays are channels-last with the two spatial axes at positions -3 and -2.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


def _starts(size: int, stride: int) -> list[int]:
  return list(range(0, size, stride))


def map_tiles(module: nn.Module, fn: Callable[[nn.Module, jax.Array], jax.Array], x: jax.Array,
              tile: tuple[int, int], stride: tuple[int, int]) -> list[list[jax.Array]]:
  """Runs fn(module, tile) on every tile of x; returns the grid of outputs [rows][cols].

  `module` must be a bound submodule (its params are broadcast into the scan).
  """
  rows, cols = _starts(x.shape[-3], stride[0]), _starts(x.shape[-2], stride[1])
  tiles = {(i, j): x[..., r:r + tile[0], c:c + tile[1], :] for i, r in enumerate(rows) for j, c in enumerate(cols)}
  by_shape: dict[tuple[int, ...], list[tuple[int, int]]] = {}
  for ij, t in tiles.items():
    by_shape.setdefault(t.shape, []).append(ij)
  step = nn.scan(lambda mdl, carry, t: (carry, fn(mdl, t)), variable_broadcast="params",
                 split_rngs={"params": False})
  out: dict[tuple[int, int], jax.Array] = {}
  for ijs in by_shape.values():
    _, ys = step(module, None, jnp.stack([tiles[ij] for ij in ijs]))
    out.update({ij: ys[n] for n, ij in enumerate(ijs)})
  return [[out[(i, j)] for j in range(len(cols))] for i in range(len(rows))]


def _ramp(n: int, ndim: int, axis: int) -> jax.Array:
  """[0, 1/n, ..., (n-1)/n] along `axis`, broadcastable against an ndim array."""
  shape = [1] * ndim
  shape[axis] = n
  return (jnp.arange(n, dtype=jnp.float32) / n).reshape(shape)


def _blend(a: jax.Array, b: jax.Array, extent: int, axis: int) -> jax.Array:
  """b's first `extent` rows (axis) fade in from a's last `extent` rows: diffusers blend_v / blend_h."""
  extent = min(a.shape[axis], b.shape[axis], extent)
  if extent <= 0:
    return b
  w = _ramp(extent, b.ndim, axis).astype(b.dtype)
  head = jax.lax.slice_in_dim(a, a.shape[axis] - extent, a.shape[axis], axis=axis) * (1 - w)
  head = head + jax.lax.slice_in_dim(b, 0, extent, axis=axis) * w
  return jnp.concatenate([head, jax.lax.slice_in_dim(b, extent, b.shape[axis], axis=axis)], axis=axis)


def blend_grid(grid: list[list[jax.Array]], blend: tuple[int, int], keep: tuple[int, int],
               out_hw: tuple[int, int]) -> jax.Array:
  """Blends a grid of decoded/encoded tiles and stitches the kept parts into [..., out_h, out_w, c]."""
  done: list[list[jax.Array]] = []
  for i, row in enumerate(grid):
    done.append([])
    for j, t in enumerate(row):
      if i > 0:
        t = _blend(done[i - 1][j], t, blend[0], t.ndim - 3)
      if j > 0:
        t = _blend(done[i][j - 1], t, blend[1], t.ndim - 2)
      done[i].append(t)
  stitched = jnp.concatenate(
      [jnp.concatenate([t[..., :keep[0], :keep[1], :] for t in row], axis=-2) for row in done], axis=-3)
  return stitched[..., :out_hw[0], :out_hw[1], :]
