"""Block-sparsity metadata for the Pallas attention kernels: which key/value tiles each query tile needs.

Shapes: b batch, T|S padded query|key length, nq|nk = T/bq | S/bk tiles, bq|bk tile sizes.

The mask (reference.py) is never materialised. Per tile we keep the min/max of the non-zero segment and
span ids and whether the tile holds padding (id 0); a (query tile, key tile) pair is *visible* when
  their segment ranges intersect, and, if causal, the key tile starts at or before the query tile's last
  row or their span ranges intersect;
and *full* (no element mask needed) when both tiles lie in one segment without padding and, if causal, the
key tile ends at or before the query tile's first row or both tiles lie in one span.
For packed rows (samples contiguous, ids ascending, spans inside samples) this is exact: every visible tile
holds a visible element, and `tile_counts` checks it against the materialised mask. Other layouts only
cost extra tiles, never correctness: tiles that are not full get the element mask.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from unimm_jax.kernels import reference


@dataclasses.dataclass(frozen=True)
class TileLists:
  """Per (row, tile) lists of the other side's visible tiles, visible ones first, in ascending order.

  codes [b n m] int32: 2 * tile index + 1 if the tile is full (no element mask); entries past `counts`
  repeat the last visible tile, so a grid that steps over them fetches nothing new.
  counts [b n] int32: number of visible tiles.
  """

  codes: jax.Array
  counts: jax.Array


jax.tree_util.register_dataclass(TileLists, data_fields=["codes", "counts"], meta_fields=[])


def _tile_stats(ids: jax.Array, block: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """[b L] ids -> ([b L/block] min, max of the non-zero ids, whether the tile holds a 0)."""
  tiles = ids.reshape(ids.shape[0], -1, block)
  nonzero = tiles != 0
  big = jnp.iinfo(jnp.int32).max
  lo = jnp.min(jnp.where(nonzero, tiles, big), axis=-1)  # big / -1 on all-zero tiles: intersects nothing
  hi = jnp.max(jnp.where(nonzero, tiles, -1), axis=-1)
  return lo, hi, ~jnp.all(nonzero, axis=-1)


def _intersect(a_lo, a_hi, b_lo, b_hi) -> jax.Array:
  """Range intersection of [b n] query-tile and [b m] key-tile id ranges -> [b n m]."""
  return (b_lo[:, None, :] <= a_hi[:, :, None]) & (a_lo[:, :, None] <= b_hi[:, None, :])


def _single(a_lo, a_hi, a_zero, b_lo, b_hi, b_zero) -> jax.Array:
  """Both tiles hold one and the same non-zero id and no 0 -> [b n m]."""
  a_one = (a_lo == a_hi) & ~a_zero
  b_one = (b_lo == b_hi) & ~b_zero
  return a_one[:, :, None] & b_one[:, None, :] & (a_lo[:, :, None] == b_lo[:, None, :])


@functools.partial(jax.jit, static_argnames=("causal", "block_q", "block_k"))
def tile_visibility(
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    q_span_ids: jax.Array | None,
    kv_span_ids: jax.Array | None,
    causal: bool,
    block_q: int,
    block_k: int,
) -> tuple[jax.Array, jax.Array]:
  """[b T], [b S], [b T] | None, [b S] | None -> (visible, full), bool [b nq nk].

  T, S are multiples of the blocks; span ids are the self-attention span ids padded to T and to S.
  """
  q_lo, q_hi, q_zero = _tile_stats(q_segment_ids, block_q)
  k_lo, k_hi, k_zero = _tile_stats(kv_segment_ids, block_k)
  visible = _intersect(q_lo, q_hi, k_lo, k_hi)
  full = _single(q_lo, q_hi, q_zero, k_lo, k_hi, k_zero)
  if causal:
    q_first = jnp.arange(q_lo.shape[1])[:, None] * block_q
    k_first = jnp.arange(k_lo.shape[1])[None, :] * block_k
    below = k_first <= q_first + block_q - 1  # some key at or before the tile's last query
    strictly_below = k_first + block_k - 1 <= q_first  # every key at or before every query
    if q_span_ids is None:
      visible = visible & below
      full = full & strictly_below
    else:
      qs_lo, qs_hi, qs_zero = _tile_stats(q_span_ids, block_q)
      ks_lo, ks_hi, ks_zero = _tile_stats(kv_span_ids, block_k)
      visible = visible & (below | _intersect(qs_lo, qs_hi, ks_lo, ks_hi))
      full = full & (strictly_below | _single(qs_lo, qs_hi, qs_zero, ks_lo, ks_hi, ks_zero))
  return visible, full


def tile_lists(visible: jax.Array, full: jax.Array) -> TileLists:
  """bool [b n m] visible / full -> TileLists over the last axis."""
  counts = jnp.sum(visible, axis=-1, dtype=jnp.int32)
  order = jnp.argsort(~visible, axis=-1, stable=True).astype(jnp.int32)  # visible tiles first, ascending
  codes = 2 * order + jnp.take_along_axis(full, order, axis=-1).astype(jnp.int32)
  last = jnp.take_along_axis(codes, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
  steps = jnp.arange(visible.shape[-1], dtype=jnp.int32)
  codes = jnp.where(steps < counts[..., None], codes, jnp.where(counts[..., None] > 0, last, 0))
  return TileLists(codes=codes, counts=counts)


def _pad(ids: np.ndarray, length: int) -> np.ndarray:
  return np.pad(ids, ((0, 0), (0, length - ids.shape[1])))


def tile_counts(
    segment_ids: np.ndarray,
    kv_segment_ids: np.ndarray | None = None,
    span_ids: np.ndarray | None = None,
    *,
    causal: bool = False,
    block_q: int,
    block_k: int,
) -> dict[str, int]:
  """Key/value tiles the Pallas kernels compute for this metadata, and the minimum at these tile sizes.

  [b t], [b s] | None, [b t] | None -> {"computed", "minimum", "full", "total"}: tiles the forward (and each
  backward) kernel computes, tiles holding at least one visible element (from the materialised mask, so
  for diagnostics and tests only), tiles computed without an element mask, and nq * nk * b.
  """
  seg = np.asarray(segment_ids, np.int32)
  kv_seg = seg if kv_segment_ids is None else np.asarray(kv_segment_ids, np.int32)
  b, t = seg.shape
  s = kv_seg.shape[1]
  big_t, big_s = -(-t // block_q) * block_q, -(-s // block_k) * block_k
  seg, kv_seg = _pad(seg, big_t), _pad(kv_seg, big_s)
  spans = (None, None) if span_ids is None else (
      jnp.asarray(_pad(np.asarray(span_ids, np.int32), big_t)),
      jnp.asarray(_pad(np.asarray(span_ids, np.int32), big_s)))
  visible, full = tile_visibility(jnp.asarray(seg), jnp.asarray(kv_seg), *spans, causal, block_q, block_k)
  # The reference mask needs t == s for causal; compare on the common padded length.
  n = max(big_t, big_s)
  mask = np.asarray(jax.jit(reference.attention_mask, static_argnums=3)(
      jnp.asarray(_pad(seg, n)), jnp.asarray(_pad(kv_seg, n)),
      None if span_ids is None else jnp.asarray(_pad(np.asarray(span_ids, np.int32), n)), causal))[:, :big_t, :big_s]
  per_tile = mask.reshape(b, big_t // block_q, block_q, big_s // block_k, block_k).any(axis=(2, 4))
  return {"computed": int(np.sum(visible)), "minimum": int(per_tile.sum()), "full": int(np.sum(full)),
          "total": int(per_tile.size)}
