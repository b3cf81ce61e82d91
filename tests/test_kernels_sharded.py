"""The Pallas attention under a mesh (8 fake CPU devices, interpret mode): each device computes its shard.

Outputs and dq/dk/dv of the sharded call equal the unsharded ones (<= 1e-5), and the compiled HLO of the
sharded forward + backward holds no all-gather: q/k/v stay where the logical rules put them.
"""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm_jax import kernels, sharding
from unimm_jax.kernels import partition, segments

TOL = 1e-5
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # see test_kernels_attention.py
P = jax.sharding.PartitionSpec
Q_AXES, KV_AXES, ID_AXES = partition.Q_AXES, partition.KV_AXES, ("act_batch", "act_length")


def packed_inputs(b, t, h, kh, e, seed=0):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((b, t, h, e)), jnp.float32)
  k, v = (jnp.asarray(x, jnp.float32) for x in rng.standard_normal((2, b, t, kh, e)))
  seg = np.stack([segments.segment_ids_from_lengths([9 + i % 3, 14, 5], t) for i in range(b)])
  span = np.stack([segments.span_ids_from_spans([(2, 7), (12, 20)], t) for _ in range(b)])
  w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
  return q, k, v, jnp.asarray(seg), jnp.asarray(span), w


def grad_fn(target, w):
  def loss(q, k, v, seg, span):
    out = kernels.attention(q, k, v, segment_ids=seg, span_ids=span, causal=True, impl=f"pallas_{target}",
                            block_q=16, block_k=16)
    return jnp.sum(out * w), out
  return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)


@functools.cache  # several meshes share one unsharded reference
def unsharded(target, b, h, kh):
  q, k, v, seg, span, w = packed_inputs(b, 32, h, kh, 16)
  (_, out), grads = jax.jit(grad_fn(target, w), compiler_options=FAST_COMPILE)(q, k, v, seg, span)
  return out, grads


def sharded_and_unsharded(mesh_shape, target, b, h, kh, rules=sharding.DEFAULT_RULES, kv_axes=KV_AXES):
  """-> (sharded (out, grads), unsharded (out, grads), compiled HLO text of the sharded call, its plan).

  The operands enter with the shardings the rules give q/k/v (kv_axes: the spec k/v really have).
  """
  q, k, v, seg, span, w = packed_inputs(b, 32, h, kh, 16)
  fn = grad_fn(target, w)
  mesh = sharding.make_mesh(mesh_shape)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    spec = lambda names: jax.sharding.NamedSharding(mesh, nn.logical_to_mesh_axes(names))
    qs, ks, ids = spec(Q_AXES), spec(kv_axes), spec(ID_AXES)
    compiled = jax.jit(fn, in_shardings=(qs, ks, ks, ids, ids), out_shardings=((None, qs), (qs, ks, ks)),
                       compiler_options=FAST_COMPILE).lower(q, k, v, seg, span).compile()
    (_, out), grads = compiled(q, k, v, seg, span)
    shard = partition.plan(b, h, kh)
  assert out.sharding.spec == qs.spec and grads[1].sharding.spec == ks.spec
  return (out, grads), unsharded(target, b, h, kh), compiled.as_text(), shard


def all_gathers(hlo: str) -> list[str]:
  """Result shapes of the all-gathers in compiled HLO text, e.g. ['f32[2,32,4,16]']."""
  return re.findall(r"= (\S+) all-gather(?:-start)?\(", hlo)


def assert_equal(got, want):
  (out, grads), (ref_out, ref_grads) = got, want
  np.testing.assert_allclose(out, ref_out, atol=TOL, rtol=0, err_msg="out")
  for name, g, ref_g in zip(("dq", "dk", "dv"), grads, ref_grads):
    np.testing.assert_allclose(g, ref_g, atol=TOL, rtol=0, err_msg=name)


@pytest.mark.parametrize("mesh_shape,target,want", [
    ((8, 1, 1), "gpu", partition.ShardPlan(("data",), (), ())),
    ((2, 2, 2), "gpu", partition.ShardPlan(("data", "fsdp"), ("tensor",), ("tensor",))),
    ((1, 4, 2), "gpu", partition.ShardPlan(("fsdp",), ("tensor",), ("tensor",))),
    ((2, 2, 2), "tpu", partition.ShardPlan(("data", "fsdp"), ("tensor",), ("tensor",))),
])
def test_sharded_pallas_attention_equals_unsharded_and_gathers_nothing(mesh_shape, target, want):
  sharded, unsharded, hlo, shard = sharded_and_unsharded(mesh_shape, target, b=8, h=4, kh=2)
  assert shard == want
  assert_equal(sharded, unsharded)
  assert all_gathers(hlo) == []


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_kv_heads_that_do_not_split_enter_whole_and_each_device_takes_its_own(kv_heads):
  """8 query heads on 4 tensor devices, 2 (or 1) kv heads: q is split by heads, k/v are not."""
  rules = tuple(r for r in sharding.DEFAULT_RULES if r[0] != "act_kv_heads") + (("act_kv_heads", None),)
  sharded, unsharded, hlo, shard = sharded_and_unsharded(
      (1, 2, 4), "gpu", b=2, h=8, kh=kv_heads, rules=rules, kv_axes=("act_batch", None, None, None))
  assert shard == partition.ShardPlan(("fsdp",), ("tensor",), ())
  assert_equal(sharded, unsharded)
  assert all_gathers(hlo) == []


def test_plan_follows_the_rules_and_splits_only_what_divides():
  mesh = sharding.make_mesh((2, 2, 2))
  assert partition.plan(8, 4, 2) is None  # no mesh
  with jax.set_mesh(mesh):
    assert partition.plan(8, 4, 2) is None  # a mesh but no rules: flax's constraints do nothing either
    with nn.logical_axis_rules(sharding.DEFAULT_RULES):
      assert partition.plan(8, 4, 2) == partition.ShardPlan(("data", "fsdp"), ("tensor",), ("tensor",))
      assert partition.plan(2, 4, 2).batch == ("data",)  # 2 rows over data x fsdp = 4: data only
      assert partition.plan(1, 4, 2) == partition.ShardPlan((), ("tensor",), ("tensor",))  # decoding one row
      assert partition.plan(8, 3, 3) == partition.ShardPlan(("data", "fsdp"), (), ())  # 3 heads on 2 devices
      assert partition.plan(8, 4, 1).kv_heads == ()
      assert partition.plan(1, 3, 1) is None
      inner = jax.shard_map(lambda x: jnp.full((1,), partition.plan(8, 4, 2) is None), in_specs=P("data"),
                            out_specs=P("data"))(jnp.zeros(2))
      assert bool(inner.all())  # inside another shard_map's manual axes there is nothing left to split
    with nn.logical_axis_rules((("act_batch", "tensor"), ("act_heads", "data"), ("act_kv_heads", "data"))):
      assert partition.plan(8, 4, 2) == partition.ShardPlan(("tensor",), ("data",), ("data",))
  one = jax.make_mesh((1, 1, 1), sharding.MESH_AXES, devices=jax.devices()[:1])
  with jax.set_mesh(one), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    assert partition.plan(8, 4, 2) is None
