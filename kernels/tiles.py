"""Per-tile math shared by the GPU (Triton) and TPU (Mosaic) flash attention kernels.

Shapes inside a tile: bq query rows, bk keys, E padded head dim. Row statistics are [bq 1] and id vectors
[bq 1] (query side) / [1 bk] (key side), so every value is 2-D for both compilers. All math is fp32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class TileIds:
  """Segment (and span) ids of one query tile [bq 1] and one key tile [1 bk], with their first positions."""

  q_seg: jax.Array
  k_seg: jax.Array
  q_span: jax.Array | None
  k_span: jax.Array | None
  q_start: jax.Array
  k_start: jax.Array


def div(a: jax.Array, n) -> jax.Array:
  """a // n for non-negative int32 scalars; jnp's floor division lowers to sign tests Mosaic and Triton reject."""
  return jax.lax.div(a, jnp.asarray(n, jnp.int32))


def rem(a: jax.Array, n) -> jax.Array:
  """a % n for non-negative int32 scalars (see div)."""
  return jax.lax.rem(a, jnp.asarray(n, jnp.int32))


def tile_of(code: jax.Array) -> jax.Array:
  """TileLists code -> tile index."""
  return jax.lax.shift_right_logical(code, jnp.int32(1))


def is_full(code: jax.Array) -> jax.Array:
  """TileLists code -> whether the tile needs no element mask."""
  return jax.lax.bitwise_and(code, jnp.int32(1)) == 1


def tile_mask(ids: TileIds, causal: bool) -> jax.Array:
  """Element visibility of one tile, bool [bq bk]; the semantics of reference.attention_mask."""
  visible = (ids.q_seg == ids.k_seg) & (ids.k_seg != 0)
  if causal:
    shape = (ids.q_seg.shape[0], ids.k_seg.shape[1])
    q_pos = ids.q_start + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    k_pos = ids.k_start + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    allowed = k_pos <= q_pos
    if ids.q_span is not None:
      allowed = allowed | ((ids.q_span == ids.k_span) & (ids.q_span != 0))
    visible = visible & allowed
  return visible


def masker(code: jax.Array, ids_fn, causal: bool):
  """-> fn(logits [bq bk]) with invisible entries at -inf; on full tiles a run-time no-op.

  Only this elementwise step sits under the branch: the K/V loads and the dots stay at the top level of the
  kernel's loop, where Triton can software-pipeline them.
  """
  def apply(s):
    hide = lambda s: jnp.where(tile_mask(ids_fn(), causal), s, -jnp.inf)
    return jax.lax.cond(is_full(code), lambda s: s, hide, s)
  return apply


def _dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
  """[m e], [n e] -> [m n] in fp32."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a: jax.Array, b: jax.Array) -> jax.Array:
  """[m n], [m e] -> [n e] in fp32."""
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
  """[m n], [n e] -> [m e] in fp32."""
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def forward_tile(q, k, v, m, l, acc, mask_fn, sm_scale):
  """One online-softmax step: q [bq E], k/v [bk E], m/l [bq 1], acc [bq E] -> updated (m, l, acc).

  mask_fn (from `masker`) hides invisible logits. m stays -inf on rows that have seen no key yet; shifting
  by 0 there keeps exp() at 0 instead of NaN.
  """
  s = mask_fn(_dot_nt(q, k) * sm_scale)
  m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
  shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
  p = jnp.exp(s - shift)
  alpha = jnp.exp(m - shift)
  l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
  acc = alpha * acc + _dot(p.astype(v.dtype), v)
  return m_new, l, acc


def forward_finish(m, l, acc):
  """-> (out [bq E] fp32, lse [bq 1]); rows that saw nothing give 0 and lse +inf (so p = 0 in backward)."""
  seen = l > 0.0
  safe_l = jnp.where(seen, l, 1.0)
  out = acc * jnp.where(seen, 1.0 / safe_l, 0.0)
  return out, jnp.where(seen, m + jnp.log(safe_l), jnp.inf)


def _probs_and_dlogits(q, k, v, do, lse, delta, mask_fn, sm_scale):
  p = jnp.exp(mask_fn(_dot_nt(q, k) * sm_scale) - lse)  # masked logits are -inf -> 0
  dp = _dot_nt(do, v)
  return p, p * (dp - delta)


def dq_tile(q, k, v, do, lse, delta, dq, mask_fn, sm_scale):
  """dq [bq E] += dS k: q/do [bq E], k/v [bk E], lse/delta [bq 1]."""
  _, ds = _probs_and_dlogits(q, k, v, do, lse, delta, mask_fn, sm_scale)
  return dq + _dot(ds.astype(k.dtype), k) * sm_scale


def dkv_tile(q, k, v, do, lse, delta, dk, dv, mask_fn, sm_scale):
  """dk, dv [bk E] += dS^T q, P^T do for one query tile."""
  p, ds = _probs_and_dlogits(q, k, v, do, lse, delta, mask_fn, sm_scale)
  dv = dv + _dot_tn(p.astype(do.dtype), do)
  dk = dk + _dot_tn(ds.astype(q.dtype), q) * sm_scale
  return dk, dv
