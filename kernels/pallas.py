"""Pallas flash attention behind `attention(impl="pallas")`: layout, padding, tile lists and the custom VJP.

Shapes: b batch, t|s query|key tokens, h|k query|kv heads, e head dim; T|S|E the padded sizes.
The public layout q [b t h e] becomes [b h T E] (a tile of one head is then a contiguous 2-D block for both
Triton and Mosaic). Padded tokens get segment id 0, so the mask itself drops them; padded head-dim
columns are zero, so they change no dot product.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from einops import rearrange

from unimm_jax.kernels import blocks, flash_gpu, flash_tpu

TARGETS = {"gpu": flash_gpu, "tpu": flash_tpu}
COMPILERS = {"gpu": "Triton", "tpu": "Mosaic"}
DEFAULT_BLOCKS = {"gpu": (128, 64), "tpu": (128, 128)}


class KernelCompileError(RuntimeError):
  """A Pallas attention kernel did not lower or compile for this device (the compiler's error is the cause)."""


@dataclasses.dataclass(frozen=True)
class TileConfig:
  """Static kernel choices: the target's kernels, tile sizes (bq, bk), padded head dim E."""

  target: str
  block_q: int
  block_k: int
  head_dim: int
  causal: bool
  sm_scale: float
  interpret: bool


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _pow2_at_least(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def tile_config(
    target: str,
    t: int,
    s: int,
    e: int,
    *,
    block_q: int | None,
    block_k: int | None,
    causal: bool,
    sm_scale: float,
    interpret: bool,
) -> TileConfig:
  """Picks tile sizes and the padded head dim for `target`; raises ValueError on sizes it cannot lower."""
  if target not in TARGETS:
    raise ValueError(f"attention: unknown Pallas target {target!r}; choose from {tuple(TARGETS)}")
  bq, bk = (block_q or DEFAULT_BLOCKS[target][0]), (block_k or DEFAULT_BLOCKS[target][1])
  if target == "gpu":  # Triton: power-of-2 tiles of at least 16 (tl.dot)
    for name, size in (("block_q", bq), ("block_k", bk)):
      if size < 16 or size & (size - 1):
        raise ValueError(f"attention impl='pallas' on GPU: {name}={size} must be a power of 2 >= 16")
    bq, bk = min(bq, _pow2_at_least(max(t, 16))), min(bk, _pow2_at_least(max(s, 16)))
    big_e = _pow2_at_least(max(e, 16))
  else:  # Mosaic: sublane tiles of 8; a key tile is a lane dimension of the [b 1 S] ids, so 128 or all of S
    if bq % 8 or bk % 8:
      raise ValueError(f"attention impl='pallas' on TPU: block_q={bq}, block_k={bk} must be multiples of 8")
    bq, bk = min(bq, _round_up(t, 8)), min(bk, _round_up(s, 8))
    if not interpret and bk % 128 and bk < s:
      raise ValueError(f"attention impl='pallas' on TPU: block_k={bk} must be a multiple of 128 or cover s={s}")
    big_e = _round_up(e, 128)
  return TileConfig(target, bq, bk, big_e, causal, float(sm_scale), interpret)


def _kernel_kwargs(cfg: TileConfig) -> dict:
  return dict(causal=cfg.causal, sm_scale=cfg.sm_scale, block_q=cfg.block_q, block_k=cfg.block_k,
              interpret=cfg.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: TileConfig, q, k, v, ids, lists, lists_t):
  return TARGETS[cfg.target].forward(q, k, v, ids, lists, **_kernel_kwargs(cfg))[0]


def _flash_fwd(cfg, q, k, v, ids, lists, lists_t):
  o, lse = TARGETS[cfg.target].forward(q, k, v, ids, lists, **_kernel_kwargs(cfg))
  return o, (q, k, v, ids, lists, lists_t, o, lse)


def _flash_bwd(cfg, residuals, do):
  q, k, v, ids, lists, lists_t, o, lse = residuals
  kernels = TARGETS[cfg.target]
  delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)  # rowsum(dO * O)
  dq = kernels.backward_dq(q, k, v, do, lse, delta, ids, lists, **_kernel_kwargs(cfg))
  dk, dv = kernels.backward_dkv(q, k, v, do, lse, delta, ids, lists_t, **_kernel_kwargs(cfg))
  no_grad = lambda tree: jax.tree.map(lambda _: None, tree)
  return dq, dk, dv, no_grad(ids), no_grad(lists), no_grad(lists_t)


_flash.defvjp(_flash_fwd, _flash_bwd)


@functools.partial(jax.jit, static_argnums=0)
def _forward_and_backward(cfg: TileConfig, q, k, v, ids, lists, lists_t):
  out, vjp = jax.vjp(lambda q, k, v: _flash(cfg, q, k, v, ids, lists, lists_t), q, k, v)
  return out, vjp(out)


def check_compiles(cfg: TileConfig, args: tuple, where: str) -> None:
  """Compiles the forward, dq and dk/dv kernels alone for these operands (the padded `_flash` arguments) and
  turns a failure into a KernelCompileError naming the backend, the shapes and the way out.

  Inside a model the kernels are compiled by XLA with the whole step, whose error would name neither the
  attention nor the options; never falling back keeps the numerics the caller asked for. JAX caches the
  compilation, so every layer of one shape costs one check.
  """
  try:
    _forward_and_backward.trace(cfg, *jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)) \
        .lower().compile()
  except Exception as err:  # any lowering or compiler failure: re-raised below with its context
    device = jax.devices()[0].device_kind
    reason = (str(err).strip().splitlines() or [""])[0][:300].rstrip(".")
    raise KernelCompileError(
        f"attention impl='pallas_{cfg.target}': the {COMPILERS[cfg.target]} kernels do not compile on {device} "
        f"for {where}, tiles {cfg.block_q}x{cfg.block_k}, head dim padded to {cfg.head_dim}, causal={cfg.causal}: "
        f"{type(err).__name__}: {reason}. Choose another backend with impl='xla' (any mask) or impl='cudnn' "
        f"(NVIDIA GPU, no segment/span ids), e.g. the model config's attention_impl, or other tile sizes "
        f"with block_q / block_k.") from err


def pallas_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    span_ids: jax.Array | None,
    causal: bool,
    sm_scale: float,
    target: str,
    interpret: bool,
    block_q: int | None = None,
    block_k: int | None = None,
) -> jax.Array:
  """q [b t h e], k/v [b s k e], ids [b t] / [b s] -> [b t h e] in q.dtype; semantics of reference.py."""
  b, t, h, e = q.shape
  s = k.shape[1]
  cfg = tile_config(target, t, s, e, block_q=block_q, block_k=block_k, causal=causal, sm_scale=sm_scale,
                    interpret=interpret)
  big_t, big_s = _round_up(t, cfg.block_q), _round_up(s, cfg.block_k)
  dtype = jnp.result_type(q, k, v)

  def heads_major(x, length):
    x = rearrange(x.astype(dtype), "b t h e -> b h t e")
    return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, cfg.head_dim - e)))

  def pad_ids(x, length):
    return jnp.pad(x.astype(jnp.int32), ((0, 0), (0, length - x.shape[1])))

  q_seg, k_seg = pad_ids(segment_ids, big_t), pad_ids(kv_segment_ids, big_s)
  q_span = None if span_ids is None else pad_ids(span_ids, big_t)
  k_span = None if span_ids is None else pad_ids(span_ids, big_s)
  visible, full = blocks.tile_visibility(q_seg, k_seg, q_span, k_span, causal, cfg.block_q, cfg.block_k)
  lists = blocks.tile_lists(visible, full)
  lists_t = blocks.tile_lists(jnp.swapaxes(visible, 1, 2), jnp.swapaxes(full, 1, 2))
  ids = (q_seg[:, :, None], k_seg[:, None, :], None if q_span is None else q_span[:, :, None],
         None if k_span is None else k_span[:, None, :])
  args = (heads_major(q, big_t), heads_major(k, big_s), heads_major(v, big_s), ids, lists, lists_t)
  if not interpret and jax.default_backend() == target:  # lowering for another platform compiles nothing here
    check_compiles(cfg, args, f"q {tuple(q.shape)} k/v {tuple(k.shape)} {jnp.dtype(dtype).name}"
                              f"{' with span ids' if span_ids is not None else ''}")
  out = _flash(cfg, *args)
  return rearrange(out[:, :, :t, :e], "b h t e -> b t h e").astype(q.dtype)
