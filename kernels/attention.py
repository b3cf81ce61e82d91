"""The one attention entry point of the project: `attention(q, k, v, ...)`.

Every attention (LLM decoder, ViT encoders, flow head, DiTs) calls this function; backends plug in
behind `impl`. Mask semantics are defined once, in `reference.py`. Every backend honours every
argument or raises NotImplementedError naming it; none drops one. Under a mesh the Pallas kernels run
per device (kernels/partition.py); `impl="auto"` uses them only where they were proven (PROVEN).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from unimm_jax.kernels import pallas, partition, reference

IMPLS = ("auto", "xla", "cudnn", "pallas", "pallas_gpu", "pallas_tpu")

# Pallas kernel families that passed scripts/device_check.py's correctness suite with interpret=False, per
# device: (impl, jax.Device.device_kind) -> "date, commit" of that run (its report is quoted in
# docs/performance.md, "Proven backends"). `impl="auto"` picks a Pallas kernel only on a device listed here.
# No GPU or TPU has been available to the project yet: no entry, so auto picks cuDNN or XLA there.
PROVEN: dict[tuple[str, str], str] = {}
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def _cudnn_handles(q: jax.Array, k: jax.Array, v: jax.Array, masked: bool, shard) -> bool:
  """Whether jax.nn.dot_product_attention(implementation="cudnn") takes this call (JAX's checks in
  jax/_src/cudnn/fused_attention_stablehlo.py, kept conservative): an NVIDIA GPU of compute capability
  >= 8.0, no segment or span ids, bf16/fp16, head dim a multiple of 8 up to 128, and q/k/v split alike
  under the mesh (its partitioner refuses kv heads sharded differently from the query heads)."""
  if masked or any(x.dtype not in CUDNN_DTYPES for x in (q, k, v)) or q.shape[3] % 8 or q.shape[3] > 128:
    return False
  if shard is not None and shard.kv_heads != shard.heads:
    return False
  capability = getattr(jax.devices()[0], "compute_capability", "")
  try:
    return tuple(int(x) for x in capability.split(".")) >= (8, 0)
  except ValueError:  # not a CUDA device (e.g. ROCm reports gfx names)
    return False


def auto_impl(q: jax.Array, k: jax.Array, v: jax.Array, *, masked: bool) -> str:
  """The backend `impl="auto"` picks on this platform: a proven Pallas family, else cuDNN where it handles
  the call (GPU, no segment/span ids: `masked` False), else the XLA reference."""
  platform, device = jax.default_backend(), jax.devices()[0]
  family = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(platform)
  if family and (family, device.device_kind) in PROVEN:
    return family
  if platform == "gpu" and _cudnn_handles(q, k, v, masked, partition.plan(q.shape[0], q.shape[2], k.shape[2])):
    return "cudnn"
  return "xla"


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    span_ids: jax.Array | None = None,
    causal: bool = False,
    bias: jax.Array | None = None,
    sm_scale: float | None = None,
    impl: str = "auto",
    block_q: int | None = None,
    block_k: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
  """Multi-head attention with GQA, packed segments and bidirectional spans.

  q [b t h e], k/v [b s k e] with h a multiple of k -> [b t h e] in q.dtype.
  segment_ids [b t] / kv_segment_ids [b s]: token i sees token j only if their ids are equal and
  non-zero (0 = padding). None means one segment covering everything; kv_segment_ids defaults to
  segment_ids for self-attention (t == s).
  causal: additionally j <= i, unless span_ids[i] == span_ids[j] != 0 (span_ids [b t], self-attention only).
  bias: an additive logit bias broadcastable to [b h t s] (4 dims, each of size 1 or full), added after the
  sm_scale scaling and before the mask (T5's relative position bias); only the XLA reference takes it, so
  "auto" picks XLA for a biased call and the other impls raise NotImplementedError on it.
  Rows that see nothing return zeros. sm_scale defaults to 1/sqrt(e).
  impl: "xla" (reference), "cudnn" (jax.nn.dot_product_attention; no segments or spans),
  "pallas" (flash attention kernels for the platform: Triton on GPU, Mosaic on TPU, the Triton kernels in
  interpret mode on CPU), "pallas_gpu" / "pallas_tpu" (those kernels whatever the platform, e.g. to lower
  for another platform or to interpret on CPU), "auto" (`auto_impl`: a Pallas family only on a device in
  PROVEN, else cuDNN on GPU where it handles the call, else xla). Under a mesh (`jax.set_mesh`) and logical
  rules, the Pallas kernels run per device on the batch rows and heads the rules give each device
  (kernels/partition.py); a Pallas kernel that fails to compile raises pallas.KernelCompileError.
  block_q / block_k: Pallas tile sizes (defaults per target in kernels/pallas.py). interpret: run the
  Pallas kernels in interpret mode (default: on CPU only). Other impls raise NotImplementedError on them.
  """
  b, t, h, e = q.shape
  s, kh = k.shape[1], k.shape[2]
  if k.shape != v.shape or k.shape[0] != b or k.shape[3] != e:
    raise ValueError(f"attention: q {q.shape}, k {k.shape}, v {v.shape} do not agree on [b . . e]")
  if h % kh:
    raise ValueError(f"attention: {h} query heads is not a multiple of {kh} kv heads")
  if (causal or span_ids is not None) and t != s:
    raise ValueError(f"attention: causal / span_ids need self-attention, got t={t} != s={s}")
  if span_ids is not None and not causal:
    raise ValueError("attention: span_ids only relax a causal mask; pass causal=True")
  if impl not in IMPLS:
    raise ValueError(f"attention: unknown impl {impl!r}; choose from {IMPLS}")
  if bias is not None and (bias.ndim != 4 or any(n not in (1, m) for n, m in zip(bias.shape, (b, h, t, s)))):
    raise ValueError(f"attention: bias {bias.shape} does not broadcast to [b h t s]={(b, h, t, s)}")
  if sm_scale is None:
    sm_scale = 1.0 / math.sqrt(e)
  platform = jax.default_backend()
  if impl == "auto" and bias is not None:
    impl = "xla"
  if impl == "auto":
    impl = auto_impl(q, k, v, masked=any(x is not None for x in (segment_ids, kv_segment_ids, span_ids)))
  if impl == "pallas":
    impl = "pallas_tpu" if platform == "tpu" else "pallas_gpu"
  if bias is not None and impl != "xla":
    raise NotImplementedError(f"attention impl={impl!r}: bias (only the XLA reference adds a logit bias)")
  if not impl.startswith("pallas"):
    for name, value in (("block_q", block_q), ("block_k", block_k), ("interpret", interpret)):
      if value is not None:
        raise NotImplementedError(f"attention impl={impl!r}: {name} (only the Pallas kernels take it)")

  if impl == "cudnn":
    if segment_ids is not None or kv_segment_ids is not None:
      raise NotImplementedError("attention impl='cudnn': segment_ids (cuDNN's mask model cannot express them)")
    if span_ids is not None:
      raise NotImplementedError("attention impl='cudnn': span_ids")
    return jax.nn.dot_product_attention(q, k, v, scale=sm_scale, is_causal=causal, implementation="cudnn")

  if segment_ids is None:
    segment_ids = jnp.ones((b, t), jnp.int32)
  if kv_segment_ids is None:
    if s != t:
      kv_segment_ids = jnp.ones((b, s), jnp.int32)
    else:
      kv_segment_ids = segment_ids
  if segment_ids.shape != (b, t) or kv_segment_ids.shape != (b, s):
    raise ValueError(
        f"attention: segment_ids {segment_ids.shape} / kv_segment_ids {kv_segment_ids.shape} "
        f"must be [b t]={(b, t)} / [b s]={(b, s)}")
  if span_ids is not None and span_ids.shape != (b, t):
    raise ValueError(f"attention: span_ids {span_ids.shape} must be [b t]={(b, t)}")
  if impl.startswith("pallas"):
    def flash(q, k, v, segment_ids, kv_segment_ids, span_ids):
      return pallas.pallas_attention(
          q, k, v, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, span_ids=span_ids, causal=causal,
          sm_scale=sm_scale, target=impl.removeprefix("pallas_"),
          interpret=platform == "cpu" if interpret is None else interpret, block_q=block_q, block_k=block_k)
    shard = partition.plan(b, h, kh)
    if shard is None:
      return flash(q, k, v, segment_ids, kv_segment_ids, span_ids)
    return partition.sharded(flash, shard, q, k, v, segment_ids, kv_segment_ids, span_ids)
  return reference.attention_reference(
      q, k, v, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, span_ids=span_ids,
      causal=causal, sm_scale=sm_scale, bias=bias)
