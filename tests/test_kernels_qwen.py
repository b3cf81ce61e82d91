"""The Qwen decoder gives the same logits with attention_impl="pallas" (interpret mode on CPU) as with "xla",
and the same under a mesh, where the kernels run per device."""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm_jax import sharding
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


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 2, 4)])  # (1, 2, 4): 2 kv heads on 4 tensor devices
def test_sharded_decoder_with_pallas_gives_unsharded_logits_and_gathers_no_attention_operand(mesh_shape):
  t = 40
  seg = jnp.asarray(np.stack([segments.segment_ids_from_lengths([12, 19, 5], t)] * 4))
  ids = jnp.asarray(np.random.default_rng(1).integers(0, CFG.vocab, (4, t)))
  model = qwen.Qwen(dataclasses.replace(CFG, attention_impl="pallas"))
  params = nn.meta.unbox(model.init(jax.random.key(0), ids)["params"])
  fn = lambda p, i, s: model.apply({"params": p}, i, segment_ids=s).logits
  want = jax.jit(fn, compiler_options=FAST_COMPILE)(params, ids, seg)
  with jax.set_mesh(sharding.make_mesh(mesh_shape)), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    compiled = jax.jit(fn, compiler_options=FAST_COMPILE).lower(params, ids, seg).compile()
    got = compiled(params, ids, seg)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  gathered = re.findall(r"= \w+\[([\d,]*)\]\S* all-gather(?:-start)?\(", compiled.as_text())
  assert all(len(shape.split(",")) != 4 for shape in gathered), gathered  # q/k/v and their padded forms are 4-D
