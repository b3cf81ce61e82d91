"""Pallas flash attention (GPU and TPU kernels, interpret mode on CPU) against the XLA reference.

Every check compares outputs and dq/dk/dv with reference.py at 2e-5 (fp32). `target` "gpu" runs the Triton
kernels (loop over visible tiles), "tpu" the Mosaic ones (scalar-prefetched grid); both interpret on CPU.
"""

import os
import re

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm_jax import kernels
from unimm_jax.kernels import blocks, segments

TOL = 2e-5
TARGETS = ("gpu", "tpu")
# Interpret mode turns each kernel into a large while-loop HLO; XLA's optimisation passes take ~3x longer
# on it than the test itself and change no number we check.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
slow = pytest.mark.slow


def random_qkv(rng, b, t, s, h, kh, e, dtype=jnp.float32):
  q = rng.standard_normal((b, t, h, e))
  k, v = rng.standard_normal((2, b, s, kh, e))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def fast_jit(fn):
  return jax.jit(fn, compiler_options=FAST_COMPILE)


def out_and_grads(impl, q, k, v, **kw):
  """Output and d(sum(out * w))/d(q, k, v) for a fixed random weight w."""
  w = jnp.asarray(np.random.default_rng(7).standard_normal(q.shape), jnp.float32)

  def loss(q, k, v):
    out = kernels.attention(q, k, v, impl=impl, **kw)
    return jnp.sum(out.astype(jnp.float32) * w), out

  grad_fn = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
  (_, out), grads = fast_jit(grad_fn)(q, k, v)
  return out, grads


def assert_matches_reference(target, q, k, v, block_q=16, block_k=16, tol=TOL, **kw):
  out, grads = out_and_grads(f"pallas_{target}", q, k, v, block_q=block_q, block_k=block_k, **kw)
  ref_out, ref_grads = out_and_grads("xla", q, k, v, **kw)
  np.testing.assert_allclose(out, ref_out, atol=tol, rtol=0, err_msg="out")
  for name, g, ref_g in zip(("dq", "dk", "dv"), grads, ref_grads):
    assert np.all(np.isfinite(g)), name
    np.testing.assert_allclose(g, ref_g, atol=tol, rtol=0, err_msg=name)
  return out, grads


def packed_rows(t, lengths_per_row, spans_per_row=None):
  seg = np.stack([segments.segment_ids_from_lengths(lens, t) for lens in lengths_per_row])
  if spans_per_row is None:
    return jnp.asarray(seg), None
  span = np.stack([segments.span_ids_from_spans(sp, t) for sp in spans_per_row])
  return jnp.asarray(seg), jnp.asarray(span)


# GQA groups 1, 2, 4, 8; the default run takes each group once, alternating target and causality.
GQA_CASES = [(t, c, h, kh) for h, kh in [(2, 2), (4, 2), (4, 1), (8, 1)] for t in TARGETS for c in (False, True)]


@pytest.mark.parametrize("target,causal,heads,kv_heads", [
    pytest.param(*case, marks=() if i % 3 == 0 else slow) for i, case in enumerate(GQA_CASES)])
def test_flash_attention_matches_reference_for_gqa_groups_at_odd_length(target, causal, heads, kv_heads):
  q, k, v = random_qkv(np.random.default_rng(0), 2, 37, 37, heads, kv_heads, 64)
  assert_matches_reference(target, q, k, v, causal=causal)


@pytest.mark.parametrize("target,head_dim", [
    ("gpu", 72), ("tpu", 72), ("gpu", 128), pytest.param("tpu", 128, marks=slow),
    pytest.param("gpu", 64, marks=slow), pytest.param("tpu", 64, marks=slow)])
def test_flash_attention_pads_any_head_dim(target, head_dim):
  q, k, v = random_qkv(np.random.default_rng(1), 1, 45, 45, 2, 1, head_dim)
  assert_matches_reference(target, q, k, v, causal=True, block_q=32, block_k=16)


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("head_dim", [80, 96, 112])
@pytest.mark.parametrize("block_q,block_k", [(16, 32), (64, 16)])
def test_flash_attention_pads_siglip_and_dit_head_dims(target, head_dim, block_q, block_k):
  q, k, v = random_qkv(np.random.default_rng(2), 2, 77, 77, 4, 2, head_dim)
  assert_matches_reference(target, q, k, v, causal=True, block_q=block_q, block_k=block_k)


# One row per segment count 1..6, with padding tails and spans of several shapes (start, end, whole sample).
LENGTHS = [[64], [30, 34], [5, 20, 33], [11, 9, 17, 14], [3, 16, 1, 25, 12], [8, 8, 8, 8, 8, 8]]
SPANS = [[(10, 40)], [(0, 30), (40, 50)], [(6, 25), (30, 37)], [(11, 20), (23, 33), (37, 51)],
         [(3, 19), (20, 45)], [(0, 8), (16, 24), (40, 47)]]


@pytest.mark.parametrize("target,mode", [
    ("gpu", "bidirectional"), ("gpu", "causal_spans"), ("tpu", "causal"), ("tpu", "causal_spans"),
    pytest.param("gpu", "causal", marks=slow), pytest.param("tpu", "bidirectional", marks=slow)])
def test_packed_rows_of_one_to_six_segments_match_reference(target, mode):
  seg, span = packed_rows(64, LENGTHS, SPANS if mode == "causal_spans" else None)
  q, k, v = random_qkv(np.random.default_rng(3), len(LENGTHS), 64, 64, 4, 2, 64)
  assert_matches_reference(target, q, k, v, segment_ids=seg, span_ids=span, causal=mode != "bidirectional")


@pytest.mark.parametrize("target", ["gpu", pytest.param("tpu", marks=slow)])
def test_all_padding_rows_give_zeros_and_finite_grads(target):
  seg, span = packed_rows(40, [[13, 9], [1]], [[(2, 11)], [(0, 1)]])
  seg = seg.at[1].set(0)  # the whole second row is padding
  q, k, v = random_qkv(np.random.default_rng(4), 2, 40, 40, 4, 2, 64)
  out, grads = assert_matches_reference(target, q, k, v, segment_ids=seg, span_ids=span, causal=True)
  assert np.all(np.asarray(out)[1] == 0) and np.all(np.asarray(out)[0, 22:] == 0)
  assert all(np.all(np.asarray(g)[1] == 0) for g in grads)


@pytest.mark.parametrize("target", TARGETS)
def test_cross_attention_with_different_kv_segments_matches_reference(target):
  q_seg, _ = packed_rows(29, [[10, 12], [29]])
  kv_seg, _ = packed_rows(53, [[20, 25], [7, 40]])  # row 1: queries of sample 1 see only its 7 keys
  q, k, v = random_qkv(np.random.default_rng(5), 2, 29, 53, 4, 2, 64)
  assert_matches_reference(target, q, k, v, segment_ids=q_seg, kv_segment_ids=kv_seg, block_q=16, block_k=32)


@pytest.mark.parametrize("target", ["gpu", pytest.param("tpu", marks=slow)])
def test_decode_step_over_partly_filled_cache_matches_reference(target):
  kv_seg = jnp.asarray((np.arange(48)[None] < np.array([[17], [48]])).astype(np.int32))
  q, k, v = random_qkv(np.random.default_rng(6), 2, 1, 48, 8, 2, 64)
  assert_matches_reference(target, q, k, v, segment_ids=jnp.ones((2, 1), jnp.int32), kv_segment_ids=kv_seg)


@pytest.mark.parametrize("target", TARGETS)
def test_bf16_inputs_accumulate_in_fp32(target):
  seg, span = packed_rows(48, [[20, 28], [48]], [[(5, 15)], [(30, 48)]])
  q, k, v = random_qkv(np.random.default_rng(8), 2, 48, 48, 4, 2, 64, jnp.bfloat16)
  out = fast_jit(lambda q, k, v: kernels.attention(
      q, k, v, segment_ids=seg, span_ids=span, causal=True, impl=f"pallas_{target}", block_q=16,
      block_k=16))(q, k, v)
  ref = kernels.attention(*(x.astype(jnp.float32) for x in (q, k, v)), segment_ids=seg, span_ids=span,
                          causal=True, impl="xla")
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=2e-2, rtol=0)


@pytest.mark.parametrize("target", TARGETS)
def test_invisible_tiles_are_never_read(target):
  """K/V tiles that no query can see hold NaN; a kernel that touched them would return NaN."""
  seg, _ = packed_rows(64, [[20, 12], [16]])  # row 0: keys 32.., row 1: keys 16.. are padding tiles
  q, k, v = random_qkv(np.random.default_rng(9), 2, 64, 64, 2, 1, 64)
  poison = (np.arange(64)[None, :, None, None] >= np.array([32, 16])[:, None, None, None])
  out = fast_jit(lambda q, k, v: kernels.attention(
      q, k, v, segment_ids=seg, causal=True, impl=f"pallas_{target}", block_q=16, block_k=16))(
          q, jnp.where(poison, jnp.nan, k), jnp.where(poison, jnp.nan, v))
  ref = kernels.attention(q, k, v, segment_ids=seg, causal=True, impl="xla")
  np.testing.assert_allclose(out, ref, atol=TOL, rtol=0)


def test_packed_batch_computes_the_minimum_number_of_tiles():
  # 8 documents per 1k row, a padding tail, images as bidirectional spans inside three of them.
  lengths = [[100, 140, 90, 160, 120, 130, 110, 70], [300, 40, 60, 200, 150, 90, 100, 50]]
  spans = [[(110, 200), (400, 500)], [(20, 280), (700, 800)]]
  seg, span = packed_rows(1024, lengths, spans)
  for causal, span_ids in ((False, None), (True, None), (True, span)):
    for block_q, block_k in ((128, 64), (128, 128), (64, 128)):
      counts = blocks.tile_counts(seg, span_ids=span_ids, causal=causal, block_q=block_q, block_k=block_k)
      assert counts["computed"] == counts["minimum"], (causal, block_q, block_k, counts)
      assert counts["full"] < counts["computed"] < counts["total"] * 0.4


@hypothesis.settings(max_examples=60, deadline=None, derandomize=True)
@hypothesis.given(data=st.data(), causal=st.booleans(), blocks_qk=st.sampled_from([(16, 16), (32, 16), (16, 64)]))
def test_tile_lists_are_minimal_for_random_packings(data, causal, blocks_qk):
  t = data.draw(st.sampled_from([37, 96, 200]), label="t")  # few shapes: tile_counts compiles per shape
  seg, span = _draw_packing(data, t)
  counts = blocks.tile_counts(seg[None], span_ids=span[None] if causal else None, causal=causal,
                              block_q=blocks_qk[0], block_k=blocks_qk[1])
  assert counts["computed"] == counts["minimum"]


def _draw_packing(data, t):
  """Random packed row of length t: 1..6 samples, optional padding tail, spans inside samples."""
  n = data.draw(st.integers(1, min(6, t)), label="segments")
  used = data.draw(st.integers(n, t), label="used")
  cuts = sorted(data.draw(st.sets(st.integers(1, used - 1), min_size=n - 1, max_size=n - 1), label="cuts")) \
      if n > 1 else []
  bounds = [0, *cuts, used]
  spans = []
  for start, end in zip(bounds[:-1], bounds[1:]):
    if end - start >= 2 and data.draw(st.booleans(), label="span"):
      a = data.draw(st.integers(start, end - 2), label="span_start")
      spans.append((a, data.draw(st.integers(a + 1, end), label="span_end")))
  seg = segments.segment_ids_from_lengths(np.diff(bounds).tolist(), t)
  return seg, segments.span_ids_from_spans(spans, t)


@hypothesis.settings(max_examples=4, deadline=None, derandomize=True)
@hypothesis.given(data=st.data(), target=st.sampled_from(TARGETS), causal=st.booleans(),
                  with_spans=st.booleans())
def test_flash_attention_matches_reference_on_random_packings(data, target, causal, with_spans):
  rows = [_draw_packing(data, 48) for _ in range(2)]  # fixed shapes: one compilation per flag combination
  seg = jnp.asarray(np.stack([r[0] for r in rows]))
  span = jnp.asarray(np.stack([r[1] for r in rows])) if causal and with_spans else None
  q, k, v = random_qkv(np.random.default_rng(10), 2, 48, 48, 4, 2, 64)
  assert_matches_reference(target, q, k, v, segment_ids=seg, span_ids=span, causal=causal)


@pytest.mark.slow
@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(data=st.data(), target=st.sampled_from(TARGETS), causal=st.booleans(),
                  with_spans=st.booleans(), blocks_qk=st.sampled_from([(16, 16), (32, 16), (16, 32)]))
def test_flash_attention_matches_reference_on_many_random_packings(data, target, causal, with_spans, blocks_qk):
  t = data.draw(st.sampled_from([33, 64, 100]), label="t")
  rows = [_draw_packing(data, t) for _ in range(3)]
  seg = jnp.asarray(np.stack([r[0] for r in rows]))
  span = jnp.asarray(np.stack([r[1] for r in rows])) if causal and with_spans else None
  q, k, v = random_qkv(np.random.default_rng(11), 3, t, t, 8, 2, 72)
  assert_matches_reference(target, q, k, v, segment_ids=seg, span_ids=span, causal=causal,
                           block_q=blocks_qk[0], block_k=blocks_qk[1])


@pytest.mark.parametrize("target,platform,call", [("gpu", "cuda", "__gpu$xla.gpu.triton"),
                                                  ("tpu", "tpu", "tpu_custom_call")])
def test_forward_and_backward_lower_for_gpu_and_tpu_from_the_entry_point(target, platform, call):
  """Pallas -> Triton IR / Mosaic MLIR on this CPU machine (the GPU/TPU compilers run later, on device)."""
  b, t, h, kh, e = 2, 300, 8, 2, 72
  q = jax.ShapeDtypeStruct((b, t, h, e), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((b, t, kh, e), jnp.bfloat16)
  ids = jax.ShapeDtypeStruct((b, t), jnp.int32)

  def loss(q, k, v, seg, span):
    out = kernels.attention(q, k, v, segment_ids=seg, span_ids=span, causal=True, impl=f"pallas_{target}",
                            interpret=False)
    return jnp.sum(out.astype(jnp.float32))

  lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv, ids, ids).lower(
      lowering_platforms=(platform,))
  names = re.findall(r"(flash_(?:forward|dq|dkv)_\w+)", lowered.as_text())
  assert lowered.as_text().count(f"custom_call @{call}") == 3  # forward, dq, dk/dv
  assert {"flash_forward_" + target, "flash_dq_" + target, "flash_dkv_" + target} <= set(names)


def test_non_pallas_backends_reject_pallas_arguments_by_name():
  q, k, v = random_qkv(np.random.default_rng(12), 1, 8, 8, 2, 2, 16)
  with pytest.raises(NotImplementedError, match="block_q"):
    kernels.attention(q, k, v, impl="xla", block_q=16)
  with pytest.raises(NotImplementedError, match="interpret"):
    kernels.attention(q, k, v, impl="cudnn", interpret=True)
  with pytest.raises(NotImplementedError, match="segment_ids"):
    kernels.attention(q, k, v, segment_ids=jnp.ones((1, 8), jnp.int32), impl="cudnn")


@pytest.mark.parametrize("per", ["head", "row"])
def test_bias_is_added_to_the_scaled_logits_before_the_mask(per):
  """T5's position bias: softmax(q k^T * scale + bias) over the keys the mask lets through (GQA 4/2, padding)."""
  rng = np.random.default_rng(15)
  q, k, v = random_qkv(rng, 2, 6, 6, 4, 2, 8)
  bias = jnp.asarray(rng.standard_normal((1, 4, 6, 6) if per == "head" else (2, 1, 6, 6)), jnp.float32)
  kv_seg = jnp.asarray([[1] * 6, [1] * 4 + [0] * 2], jnp.int32)
  out = kernels.attention(q, k, v, kv_segment_ids=kv_seg, bias=bias, sm_scale=0.5)
  kk, vv = (np.repeat(np.asarray(x), 2, axis=2) for x in (k, v))
  logits = np.einsum("bthe,bshe->bhts", np.asarray(q), kk) * 0.5 + np.broadcast_to(bias, (2, 4, 6, 6))
  logits = np.where(np.asarray(kv_seg)[:, None, None, :] > 0, logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  want = np.einsum("bhts,bshe->bthe", p / p.sum(-1, keepdims=True), vv)
  np.testing.assert_allclose(out, want, atol=1e-5, rtol=0)


def test_only_the_xla_reference_takes_a_bias_and_auto_picks_it():
  q, k, v = random_qkv(np.random.default_rng(16), 1, 8, 8, 2, 2, 16)
  bias = jnp.asarray(np.random.default_rng(17).standard_normal((1, 2, 8, 8)), jnp.float32)
  np.testing.assert_array_equal(kernels.attention(q, k, v, bias=bias),
                                kernels.attention(q, k, v, bias=bias, impl="xla"))
  for impl in ("cudnn", "pallas", "pallas_gpu", "pallas_tpu"):
    with pytest.raises(NotImplementedError, match=f"impl='{impl if impl != 'pallas' else 'pallas_gpu'}': bias"):
      kernels.attention(q, k, v, bias=bias, impl=impl)
  with pytest.raises(ValueError, match=r"bias \(1, 3, 8, 8\) does not broadcast to \[b h t s\]=\(1, 2, 8, 8\)"):
    kernels.attention(q, k, v, bias=jnp.zeros((1, 3, 8, 8)))


def test_pallas_rejects_tile_sizes_the_compiler_cannot_take():
  q, k, v = random_qkv(np.random.default_rng(13), 1, 8, 8, 2, 2, 16)
  with pytest.raises(ValueError, match="block_q=24 must be a power of 2"):
    kernels.attention(q, k, v, impl="pallas_gpu", block_q=24)
  with pytest.raises(ValueError, match="multiples of 8"):
    kernels.attention(q, k, v, impl="pallas_tpu", block_k=12)


def test_auto_picks_xla_on_cpu_and_pallas_interprets_by_default():
  seg, _ = packed_rows(24, [[10, 9]])
  q, k, v = random_qkv(np.random.default_rng(14), 1, 24, 24, 2, 1, 32)
  auto = kernels.attention(q, k, v, segment_ids=seg, causal=True)
  pallas = fast_jit(lambda q, k, v: kernels.attention(
      q, k, v, segment_ids=seg, causal=True, impl="pallas", block_q=16, block_k=16))(q, k, v)
  np.testing.assert_array_equal(auto, kernels.attention(q, k, v, segment_ids=seg, causal=True, impl="xla"))
  np.testing.assert_allclose(pallas, auto, atol=TOL, rtol=0)


class FakeDevice:
  """What auto_impl reads of a device: its kind and, on CUDA, its compute capability."""

  def __init__(self, kind: str, capability: str | None = None):
    self.device_kind = kind
    if capability is not None:
      self.compute_capability = capability


def test_auto_picks_a_pallas_kernel_only_on_a_device_where_it_was_proven(monkeypatch):
  q, kv = jax.ShapeDtypeStruct((2, 64, 4, 128), jnp.bfloat16), jax.ShapeDtypeStruct((2, 64, 2, 128), jnp.bfloat16)
  auto = lambda q=q, kv=kv, masked=False: kernels.auto_impl(q, kv, kv, masked=masked)

  def on(platform, device):
    monkeypatch.setattr(jax, "default_backend", lambda: platform)
    monkeypatch.setattr(jax, "devices", lambda *_: [device])

  assert auto() == "xla"  # this CPU
  h200, a100 = FakeDevice("NVIDIA H200", "9.0"), FakeDevice("NVIDIA A100-SXM4-80GB", "8.0")
  on("gpu", h200)
  assert (auto(), auto(masked=True)) == ("cudnn", "xla")  # cuDNN cannot express segment or span ids
  assert auto(q=q.update(dtype=jnp.float32), kv=kv.update(dtype=jnp.float32)) == "xla"
  assert auto(q=q.update(shape=(2, 64, 4, 72)), kv=kv.update(shape=(2, 64, 2, 72))) == "cudnn"
  assert auto(q=q.update(shape=(2, 64, 4, 256)), kv=kv.update(shape=(2, 64, 2, 256))) == "xla"
  on("gpu", FakeDevice("AMD Instinct MI300X", "gfx942"))
  assert auto() == "xla"
  on("tpu", FakeDevice("TPU v5 lite"))
  assert auto(masked=True) == "xla"

  monkeypatch.setitem(kernels.PROVEN, ("pallas_gpu", "NVIDIA H200"), "test entry")
  monkeypatch.setitem(kernels.PROVEN, ("pallas_tpu", "TPU v5 lite"), "test entry")
  on("gpu", h200)
  assert (auto(), auto(masked=True)) == ("pallas_gpu", "pallas_gpu")
  on("gpu", a100)  # proven on another device only
  assert (auto(), auto(masked=True)) == ("cudnn", "xla")
  on("tpu", FakeDevice("TPU v5 lite"))
  assert auto(masked=True) == "pallas_tpu"


def test_proven_table_in_code_equals_the_one_in_the_docs():
  with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "performance.md")) as f:
    section = f.read().split("## Proven backends", 1)[1].split("\n## ", 1)[0]
  rows = re.findall(r"^\| `(pallas_\w+)` \| (.+?) \| (.+?) \|", section, flags=re.MULTILINE)
  assert {(impl, kind) for impl, kind, _ in rows} == set(kernels.PROVEN)


def test_pallas_compile_failure_names_the_backend_the_shapes_and_other_impls(monkeypatch):
  """On a "GPU" (the platform name patched) the Triton kernels really compile, for this CPU, and fail."""
  q, k, v = random_qkv(np.random.default_rng(15), 1, 8, 8, 2, 2, 16)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  with pytest.raises(kernels.KernelCompileError, match=r"impl='pallas_gpu'.*Triton.*q \(1, 8, 2, 16\).*impl='xla'") \
      as info:
    kernels.attention(q, k, v, impl="pallas", interpret=False)
  assert "Only interpret mode" in str(info.value) and isinstance(info.value.__cause__, Exception)
