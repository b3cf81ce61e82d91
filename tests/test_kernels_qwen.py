"""The Qwen decoder gives the same logits with attention_impl="pallas" (interpret mode on CPU) as with "xla"."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from unimm_jax.kernels import segments
from unimm_jax.models import qwen

CFG = qwen.QwenConfig(vocab=97, embed=64, mlp=96, depth=2, heads=4, kv_heads=2, head_dim=16)
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # see test_kernels_attention.py


def logits(impl: str, params, ids, **kw):
  model = qwen.Qwen(dataclasses.replace(CFG, attention_impl=impl))
  fn = jax.jit(lambda p, i: model.apply({"params": p}, i, **kw).logits, compiler_options=FAST_COMPILE)
  return fn(params, ids)


def test_packed_rows_with_spans_give_equal_logits_with_pallas_and_xla():
  t = 40
  seg = jnp.asarray(np.stack([segments.segment_ids_from_lengths([12, 19, 5], t),
                              segments.segment_ids_from_lengths([40], t)]))
  span = jnp.asarray(np.stack([segments.span_ids_from_spans([(14, 25)], t),
                               segments.span_ids_from_spans([(3, 10), (20, 36)], t)]))
  ids = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab, (2, t)))
  params = qwen.Qwen(CFG).init(jax.random.key(0), ids)["params"]
  pallas = logits("pallas", params, ids, segment_ids=seg, span_ids=span)
  xla = logits("xla", params, ids, segment_ids=seg, span_ids=span)
  np.testing.assert_allclose(pallas, xla, atol=1e-5, rtol=0)
