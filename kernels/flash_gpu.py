"""Flash attention on GPU: Pallas Triton kernels that loop over the visible key tiles of each query tile.

Shapes: b batch, h|k query|kv heads, g = h/k, T|S padded query|key length, E padded head dim (a power of 2),
bq|bk tile sizes, nq|nk tile counts. q/do/o [b h T E], k/v [b k S E], lse/delta [b h T 1] fp32, segment and
span ids [b T 1] (query side) / [b 1 S] (key side). GQA maps query head i to kv head i // g in the
BlockSpecs, so K/V are never repeated in memory.

Each program owns one query tile (forward, dq) or one key tile (dk/dv) and runs a `fori_loop` over only
the tiles its TileLists entry names; full tiles skip the element mask (`tiles.masker`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from unimm_jax.kernels import tiles
from unimm_jax.kernels.blocks import TileLists


def _params(e: int) -> pltriton.CompilerParams:
  return pltriton.CompilerParams(num_warps=4 if e <= 64 else 8, num_stages=2)


def _split(rest, spans: bool, n_out: int):
  """Kernel refs after the ids: (q_span, k_span) if spans, then the outputs."""
  if spans:
    return rest[0], rest[1], rest[2:2 + n_out]
  return None, None, rest[:n_out]


def _over_key_tiles(codes_ref, counts_ref, kseg_ref, kspan_ref, q_seg, q_span, q_start, *, block_k, causal,
                    step, init):
  """fori_loop over this query tile's visible key tiles: carry = step(cols, mask_fn, carry)."""
  def body(j, carry):
    code = codes_ref[j]
    k_start = pl.multiple_of(tiles.tile_of(code) * block_k, block_k)
    cols = pl.ds(k_start, block_k)
    ids = lambda: tiles.TileIds(q_seg, kseg_ref[:, cols], q_span, None if kspan_ref is None else kspan_ref[:, cols],
                                q_start, k_start)
    return step(cols, tiles.masker(code, ids, causal), carry)

  return jax.lax.fori_loop(0, counts_ref[0], body, init)


def _forward_kernel(codes_ref, counts_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, *rest, causal, sm_scale,
                    block_k, spans):
  qspan_ref, kspan_ref, (o_ref, lse_ref) = _split(rest, spans, 2)
  bq, e = q_ref.shape
  q = q_ref[...]

  def step(cols, mask_fn, carry):
    return tiles.forward_tile(q, k_ref[cols, :], v_ref[cols, :], *carry, mask_fn, sm_scale)

  init = (jnp.full((bq, 1), -jnp.inf, jnp.float32), jnp.zeros((bq, 1), jnp.float32),
          jnp.zeros((bq, e), jnp.float32))
  m, l, acc = _over_key_tiles(codes_ref, counts_ref, kseg_ref, kspan_ref, qseg_ref[...],
                              qspan_ref[...] if spans else None, pl.program_id(2) * bq, block_k=block_k,
                              causal=causal, step=step, init=init)
  out, lse = tiles.forward_finish(m, l, acc)
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse


def _dq_kernel(codes_ref, counts_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, *rest,
               causal, sm_scale, block_k, spans):
  qspan_ref, kspan_ref, (dq_ref,) = _split(rest, spans, 1)
  bq, e = q_ref.shape
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]

  def step(cols, mask_fn, dq):
    return tiles.dq_tile(q, k_ref[cols, :], v_ref[cols, :], do, lse, delta, dq, mask_fn, sm_scale)

  dq = _over_key_tiles(codes_ref, counts_ref, kseg_ref, kspan_ref, qseg_ref[...], qspan_ref[...] if spans else None,
                       pl.program_id(2) * bq, block_k=block_k, causal=causal, step=step,
                       init=jnp.zeros((bq, e), jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(codes_ref, counts_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, *rest,
                causal, sm_scale, block_q, spans):
  qspan_ref, kspan_ref, (dk_ref, dv_ref) = _split(rest, spans, 2)
  groups = q_ref.shape[0]
  bk, e = k_ref.shape
  k_start = pl.program_id(2) * bk
  k, v, k_seg = k_ref[...], v_ref[...], kseg_ref[...]
  k_span = kspan_ref[...] if spans else None

  def body(n, carry):  # n walks (visible query tile, query head of this kv head's group)
    code, head = codes_ref[tiles.div(n, groups)], tiles.rem(n, groups)
    q_start = pl.multiple_of(tiles.tile_of(code) * block_q, block_q)
    rows = pl.ds(q_start, block_q)
    q, do = q_ref[head, rows, :], do_ref[head, rows, :]
    lse, delta = lse_ref[head, rows, :], delta_ref[head, rows, :]
    ids = lambda: tiles.TileIds(qseg_ref[rows, :], k_seg, qspan_ref[rows, :] if spans else None, k_span, q_start,
                                k_start)
    return tiles.dkv_tile(q, k, v, do, lse, delta, *carry, tiles.masker(code, ids, causal), sm_scale)

  zeros = jnp.zeros((bk, e), jnp.float32)
  dk, dv = jax.lax.fori_loop(0, counts_ref[0] * groups, body, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _list_specs(lists: TileLists):
  """Specs giving each program its own row of codes [n] and its count [1]."""
  n = lists.codes.shape[-1]
  return [pl.BlockSpec((None, None, n), lambda b, h, i: (b, i, 0)),
          pl.BlockSpec((None, None, 1), lambda b, h, i: (b, i, 0))]


def _list_args(lists: TileLists):
  return lists.codes, lists.counts[..., None]


def _id_args(ids):
  return [x for x in ids if x is not None]


def _query_tile_specs(lists, groups, block_q, big_s, e, spans, backward):
  """Grid (b, h, nq) of the forward and dq kernels; K/V rows of the query head's kv head stay in HBM.

  -> (index map of query-shaped tiles, in_specs for codes, counts, q, k, v, [do, lse, delta,] ids [, spans]).
  """
  tile = lambda b_, h_, i: (b_, h_, i, 0)
  kv_row = lambda b_, h_, i: (b_, tiles.div(h_, groups), 0, 0)
  ids = [pl.BlockSpec((None, block_q, 1), lambda b_, h_, i: (b_, i, 0)),
         pl.BlockSpec((None, 1, big_s), lambda b_, h_, i: (b_, 0, 0))]
  residuals = [pl.BlockSpec((None, None, block_q, e), tile), pl.BlockSpec((None, None, block_q, 1), tile),
               pl.BlockSpec((None, None, block_q, 1), tile)]
  return tile, [*_list_specs(lists), pl.BlockSpec((None, None, block_q, e), tile),
                pl.BlockSpec((None, None, big_s, e), kv_row), pl.BlockSpec((None, None, big_s, e), kv_row),
                *(residuals if backward else []), *ids * (2 if spans else 1)]


def forward(q, k, v, ids, lists: TileLists, *, causal, sm_scale, block_q, block_k, interpret):
  """-> (o [b h T E] in q.dtype, lse [b h T 1] fp32)."""
  b, h, big_t, e = q.shape
  spans = ids[2] is not None
  tile, in_specs = _query_tile_specs(lists, h // k.shape[1], block_q, k.shape[2], e, spans, backward=False)
  return pl.pallas_call(
      functools.partial(_forward_kernel, causal=causal, sm_scale=sm_scale, block_k=block_k, spans=spans),
      grid=(b, h, big_t // block_q),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, None, block_q, e), tile), pl.BlockSpec((None, None, block_q, 1), tile)],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, big_t, 1), jnp.float32)],
      compiler_params=_params(e),
      interpret=interpret,
      name="flash_forward_gpu",
  )(*_list_args(lists), q, k, v, *_id_args(ids))


def backward_dq(q, k, v, do, lse, delta, ids, lists: TileLists, *, causal, sm_scale, block_q, block_k, interpret):
  """-> dq [b h T E] in q.dtype."""
  b, h, big_t, e = q.shape
  spans = ids[2] is not None
  tile, in_specs = _query_tile_specs(lists, h // k.shape[1], block_q, k.shape[2], e, spans, backward=True)
  return pl.pallas_call(
      functools.partial(_dq_kernel, causal=causal, sm_scale=sm_scale, block_k=block_k, spans=spans),
      grid=(b, h, big_t // block_q),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((None, None, block_q, e), tile),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_params(e),
      interpret=interpret,
      name="flash_dq_gpu",
  )(*_list_args(lists), q, k, v, do, lse, delta, *_id_args(ids))


def backward_dkv(q, k, v, do, lse, delta, ids, lists_t: TileLists, *, causal, sm_scale, block_q, block_k,
                 interpret):
  """lists_t: per key tile, its visible query tiles. -> (dk, dv) [b k S E] in k.dtype."""
  b, h, big_t, e = q.shape
  kh, big_s = k.shape[1], k.shape[2]
  groups, spans = h // kh, ids[2] is not None
  group_rows = lambda b_, h_, i: (b_, h_, 0, 0)  # block of `groups` query heads = this kv head's group
  tile = lambda b_, h_, i: (b_, h_, i, 0)
  in_specs = [
      *_list_specs(lists_t),
      pl.BlockSpec((None, groups, big_t, e), group_rows),
      pl.BlockSpec((None, None, block_k, e), tile),
      pl.BlockSpec((None, None, block_k, e), tile),
      pl.BlockSpec((None, groups, big_t, e), group_rows),
      pl.BlockSpec((None, groups, big_t, 1), group_rows),
      pl.BlockSpec((None, groups, big_t, 1), group_rows),
      pl.BlockSpec((None, big_t, 1), lambda b_, h_, i: (b_, 0, 0)),
      pl.BlockSpec((None, 1, block_k), lambda b_, h_, i: (b_, 0, i)),
  ]
  if spans:
    in_specs += in_specs[-2:]
  out = jax.ShapeDtypeStruct(k.shape, k.dtype)
  return pl.pallas_call(
      functools.partial(_dkv_kernel, causal=causal, sm_scale=sm_scale, block_q=block_q, spans=spans),
      grid=(b, kh, big_s // block_k),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, None, block_k, e), tile)] * 2,
      out_shape=[out, out],
      compiler_params=_params(e),
      interpret=interpret,
      name="flash_dkv_gpu",
  )(*_list_args(lists_t), q, k, v, do, lse, delta, *_id_args(ids))
