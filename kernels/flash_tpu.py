"""Flash attention on TPU: Pallas Mosaic kernels whose innermost grid axis walks the visible tiles.

Shapes as in flash_gpu.py (q/do/o [b h T E], k/v [b k S E], lse/delta [b h T 1], ids [b T 1] / [b 1 S]);
E is a multiple of 128, bk a multiple of 128 or all of S, bq a multiple of 8.

The TileLists are scalar-prefetched into SMEM and read by the index maps, so grid step j of a query tile
DMAs the j-th *visible* key tile; steps past the count name the last visible tile again (no new DMA) and
compute nothing (`pl.when`); full tiles skip the element mask (`tiles.masker`). Running statistics live in
VMEM scratch across the innermost axis.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from unimm_jax.kernels import tiles
from unimm_jax.kernels.blocks import TileLists


def _params(axes: int) -> pltpu.CompilerParams:
  return pltpu.CompilerParams(dimension_semantics=("parallel",) * (axes - 1) + ("arbitrary",))


def _split(rest, spans: bool, n_out: int):
  """Kernel refs after the ids: (q_span, k_span) if spans, then outputs, then scratch."""
  if spans:
    return rest[0], rest[1], rest[2:2 + n_out], rest[2 + n_out:]
  return None, None, rest[:n_out], rest[n_out:]


def _visible_tile(codes, counts, row, step, width):
  """-> (code of the step-th visible tile of TileLists row `row`, whether step < count)."""
  return codes[row * width + step], step < counts[row]


def _forward_kernel(codes, counts, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, *rest, causal, sm_scale, spans):
  qspan_ref, kspan_ref, (o_ref, lse_ref), (m_sc, l_sc, acc_sc) = _split(rest, spans, 2)
  b, qi, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  nq, nk = pl.num_programs(2), pl.num_programs(3)
  bq, bk = q_ref.shape[0], k_ref.shape[0]

  @pl.when(j == 0)
  def _():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  code, live = _visible_tile(codes, counts, b * nq + qi, j, nk)

  @pl.when(live)
  def _():
    ids = lambda: tiles.TileIds(qseg_ref[...], kseg_ref[...], qspan_ref[...] if spans else None,
                                kspan_ref[...] if spans else None, qi * bq, tiles.tile_of(code) * bk)
    m, l, acc = tiles.forward_tile(q_ref[...], k_ref[...], v_ref[...], m_sc[...], l_sc[...], acc_sc[...],
                                   tiles.masker(code, ids, causal), sm_scale)
    m_sc[...], l_sc[...], acc_sc[...] = m, l, acc

  @pl.when(j == nk - 1)
  def _():
    out, lse = tiles.forward_finish(m_sc[...], l_sc[...], acc_sc[...])
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def _dq_kernel(codes, counts, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, *rest, causal,
               sm_scale, spans):
  qspan_ref, kspan_ref, (dq_ref,), (dq_sc,) = _split(rest, spans, 1)
  b, qi, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  nq, nk = pl.num_programs(2), pl.num_programs(3)
  bq, bk = q_ref.shape[0], k_ref.shape[0]

  @pl.when(j == 0)
  def _():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  code, live = _visible_tile(codes, counts, b * nq + qi, j, nk)

  @pl.when(live)
  def _():
    ids = lambda: tiles.TileIds(qseg_ref[...], kseg_ref[...], qspan_ref[...] if spans else None,
                                kspan_ref[...] if spans else None, qi * bq, tiles.tile_of(code) * bk)
    dq_sc[...] = tiles.dq_tile(q_ref[...], k_ref[...], v_ref[...], do_ref[...], lse_ref[...], delta_ref[...],
                               dq_sc[...], tiles.masker(code, ids, causal), sm_scale)

  @pl.when(j == nk - 1)
  def _():
    dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


def _dkv_kernel(codes, counts, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, *rest, causal,
                sm_scale, spans, nq):
  qspan_ref, kspan_ref, (dk_ref, dv_ref), (dk_sc, dv_sc) = _split(rest, spans, 2)
  b, ki, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  nk, steps = pl.num_programs(2), pl.num_programs(3)
  bq, bk = q_ref.shape[0], k_ref.shape[0]

  @pl.when(j == 0)
  def _():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  code, live = _visible_tile(codes, counts, b * nk + ki, tiles.rem(j, nq), nq)  # step j = (query head, list entry)

  @pl.when(live)
  def _():
    ids = lambda: tiles.TileIds(qseg_ref[...], kseg_ref[...], qspan_ref[...] if spans else None,
                                kspan_ref[...] if spans else None, tiles.tile_of(code) * bq, ki * bk)
    dk, dv = tiles.dkv_tile(q_ref[...], k_ref[...], v_ref[...], do_ref[...], lse_ref[...], delta_ref[...],
                            dk_sc[...], dv_sc[...], tiles.masker(code, ids, causal), sm_scale)
    dk_sc[...], dv_sc[...] = dk, dv

  @pl.when(j == steps - 1)
  def _():
    dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _flat(lists: TileLists):
  """SMEM wants 1-D scalars: codes [b*n*m], counts [b*n]."""
  return lists.codes.reshape(-1), lists.counts.reshape(-1)


def _query_tile_specs(groups, nq, nk, block_q, block_k, e, spans, backward):
  """Grid (b, h, nq, nk) of the forward and dq kernels: step j of query tile i reads its j-th visible key tile.

  -> (index map of query-shaped tiles, in_specs for q, k, v, [do, lse, delta,] ids [, spans]).
  """
  kv_tile = lambda b_, i, j, codes: tiles.tile_of(codes[(b_ * nq + i) * nk + j])
  q_map = lambda b_, h_, i, j, codes, counts: (b_, h_, i, 0)
  kv_map = lambda b_, h_, i, j, codes, counts: (b_, tiles.div(h_, groups), kv_tile(b_, i, j, codes), 0)
  ids = [pl.BlockSpec((None, block_q, 1), lambda b_, h_, i, j, codes, counts: (b_, i, 0)),
         pl.BlockSpec((None, 1, block_k), lambda b_, h_, i, j, codes, counts: (b_, 0, kv_tile(b_, i, j, codes)))]
  residuals = [pl.BlockSpec((None, None, block_q, e), q_map), pl.BlockSpec((None, None, block_q, 1), q_map),
               pl.BlockSpec((None, None, block_q, 1), q_map)]
  return q_map, [pl.BlockSpec((None, None, block_q, e), q_map), pl.BlockSpec((None, None, block_k, e), kv_map),
                 pl.BlockSpec((None, None, block_k, e), kv_map), *(residuals if backward else []),
                 *ids * (2 if spans else 1)]


def forward(q, k, v, ids, lists: TileLists, *, causal, sm_scale, block_q, block_k, interpret):
  """-> (o [b h T E] in q.dtype, lse [b h T 1] fp32)."""
  b, h, big_t, e = q.shape
  spans = ids[2] is not None
  nq, nk = lists.codes.shape[1:]
  q_map, in_specs = _query_tile_specs(h // k.shape[1], nq, nk, block_q, block_k, e, spans, backward=False)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(b, h, nq, nk),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, None, block_q, e), q_map), pl.BlockSpec((None, None, block_q, 1), q_map)],
      scratch_shapes=[pltpu.VMEM((block_q, 1), jnp.float32), pltpu.VMEM((block_q, 1), jnp.float32),
                      pltpu.VMEM((block_q, e), jnp.float32)],
  )
  return pl.pallas_call(
      functools.partial(_forward_kernel, causal=causal, sm_scale=sm_scale, spans=spans),
      grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, big_t, 1), jnp.float32)],
      compiler_params=_params(4),
      interpret=interpret,
      name="flash_forward_tpu",
  )(*_flat(lists), q, k, v, *[x for x in ids if x is not None])


def backward_dq(q, k, v, do, lse, delta, ids, lists: TileLists, *, causal, sm_scale, block_q, block_k, interpret):
  """-> dq [b h T E] in q.dtype."""
  b, h, _, e = q.shape
  spans = ids[2] is not None
  nq, nk = lists.codes.shape[1:]
  q_map, in_specs = _query_tile_specs(h // k.shape[1], nq, nk, block_q, block_k, e, spans, backward=True)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(b, h, nq, nk),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((None, None, block_q, e), q_map),
      scratch_shapes=[pltpu.VMEM((block_q, e), jnp.float32)],
  )
  return pl.pallas_call(
      functools.partial(_dq_kernel, causal=causal, sm_scale=sm_scale, spans=spans),
      grid_spec=grid_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_params(4),
      interpret=interpret,
      name="flash_dq_tpu",
  )(*_flat(lists), q, k, v, do, lse, delta, *[x for x in ids if x is not None])


def backward_dkv(q, k, v, do, lse, delta, ids, lists_t: TileLists, *, causal, sm_scale, block_q, block_k,
                 interpret):
  """lists_t: per key tile, its visible query tiles. -> (dk, dv) [b k S E] in k.dtype.

  Grid (b, k, nk, g * nq): the innermost step j visits query head (kv head * g + j // nq) at entry j % nq of
  the key tile's list, so the g query heads sharing a kv head accumulate into one dk/dv tile.
  """
  b, h, _, e = q.shape
  kh = k.shape[1]
  groups, spans = h // kh, ids[2] is not None
  nk, nq = lists_t.codes.shape[1:]
  q_tile = lambda b_, i, j, codes: tiles.tile_of(codes[(b_ * nk + i) * nq + tiles.rem(j, nq)])
  q_map = lambda b_, h_, i, j, codes, counts: (b_, h_ * groups + tiles.div(j, nq), q_tile(b_, i, j, codes), 0)
  kv_map = lambda b_, h_, i, j, codes, counts: (b_, h_, i, 0)
  in_specs = [
      pl.BlockSpec((None, None, block_q, e), q_map),
      pl.BlockSpec((None, None, block_k, e), kv_map),
      pl.BlockSpec((None, None, block_k, e), kv_map),
      pl.BlockSpec((None, None, block_q, e), q_map),
      pl.BlockSpec((None, None, block_q, 1), q_map),
      pl.BlockSpec((None, None, block_q, 1), q_map),
      pl.BlockSpec((None, block_q, 1), lambda b_, h_, i, j, codes, counts: (b_, q_tile(b_, i, j, codes), 0)),
      pl.BlockSpec((None, 1, block_k), lambda b_, h_, i, j, codes, counts: (b_, 0, i)),
  ]
  if spans:
    in_specs += in_specs[-2:]
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(b, kh, nk, groups * nq),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, None, block_k, e), kv_map)] * 2,
      scratch_shapes=[pltpu.VMEM((block_k, e), jnp.float32)] * 2,
  )
  out = jax.ShapeDtypeStruct(k.shape, k.dtype)
  return pl.pallas_call(
      functools.partial(_dkv_kernel, causal=causal, sm_scale=sm_scale, spans=spans, nq=nq),
      grid_spec=grid_spec,
      out_shape=[out, out],
      compiler_params=_params(4),
      interpret=interpret,
      name="flash_dkv_tpu",
  )(*_flat(lists_t), q, k, v, do, lse, delta, *[x for x in ids if x is not None])
