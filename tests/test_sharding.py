"""Mesh construction, rules from config, and that logical annotations really shard (8 fake CPU devices)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm_jax import sharding
from unimm_jax.models.qwen import Qwen, QwenConfig

TINY = QwenConfig(vocab=256, embed=64, mlp=128, depth=2, heads=4, kv_heads=2, head_dim=16)
P = jax.sharding.PartitionSpec


def test_mesh_fills_the_minus_one_axis_and_names_axes():
  mesh = sharding.make_mesh((2, -1, 2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert sharding.resolve_mesh_shape((1, -1, 1), (2, 1, 1), 8) == ((1, 4, 1), (2, 1, 1))
  explicit = sharding.make_mesh((1, 8, 1), axis_types="explicit")
  assert explicit.axis_types == (jax.sharding.AxisType.Explicit,) * 3


@pytest.mark.parametrize("ici,dcn,match", [
    ((3, -1, 1), (1, 1, 1), "not divisible"),
    ((2, 2, 1), (1, 1, 1), "uses 4 devices"),
    ((-1, -1, 1), (1, 1, 1), "one -1"),
    ((1, -1, 1), (3, 1, 1), "do not split"),
    ((1, -1), (1, 1, 1), "one size per axis"),
])
def test_mesh_rejects_shapes_that_do_not_cover_the_devices(ici, dcn, match):
  with pytest.raises(ValueError, match=match):
    sharding.resolve_mesh_shape(ici, dcn, 8)


def test_rules_from_config_rejects_unknown_logical_and_mesh_names():
  assert sharding.rules_from_config([["embed", "fsdp"], ["act_batch", ["data", "fsdp"]], ["mlp", None]]) == (
      ("embed", "fsdp"), ("act_batch", ("data", "fsdp")), ("mlp", None))
  with pytest.raises(ValueError, match="'emb'"):
    sharding.rules_from_config([["emb", "fsdp"]])
  with pytest.raises(ValueError, match="model"):
    sharding.rules_from_config([["embed", "model"]])


def _init_sharded(mesh, rules, ids):
  model = Qwen(TINY)
  abstract = jax.eval_shape(lambda r: model.init(r, ids), jax.random.PRNGKey(0))
  shardings = sharding.logical_shardings(abstract, mesh, rules)
  variables = jax.jit(lambda r: model.init(r, ids), out_shardings=shardings)(jax.random.PRNGKey(0))
  return model, nn.meta.unbox(variables["params"]), abstract, shardings


def test_logical_annotations_shard_params_and_activations_under_set_mesh():
  mesh = sharding.make_mesh((2, 2, 2))
  ids = jnp.zeros((8, 16), jnp.int32)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    model, params, _, _ = _init_sharded(mesh, sharding.DEFAULT_RULES, ids)
    assert params["layers_0"]["mlp"]["gate_proj"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert params["layers_0"]["self_attn"]["q_proj"]["kernel"].sharding.spec == P("fsdp", "tensor", None)
    assert params["lm_head"]["kernel"].sharding.spec == P("fsdp", "tensor")

    def hidden_and_logits(p, x):
      out = model.apply({"params": p}, x, return_hidden_states=True)
      return out.hidden_states[1], out.logits

    # The inputs are replicated: only the constraints inside the model can shard the outputs.
    hidden, logits = jax.jit(hidden_and_logits)(params, ids)
  assert hidden.sharding.spec == P(("data", "fsdp"))  # trailing unsharded dims are dropped
  assert logits.sharding.spec == P(("data", "fsdp"), None, "tensor")


def test_fsdp8_stores_about_one_eighth_of_the_params_per_device():
  mesh = sharding.make_mesh((1, 8, 1))
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    _, params, abstract, shardings = _init_sharded(mesh, sharding.DEFAULT_RULES, jnp.zeros((8, 16), jnp.int32))
  total = sum(x.nbytes for x in jax.tree.leaves(params))
  for dev in mesh.devices.flat:
    local = sum(s.data.nbytes for x in jax.tree.leaves(params) for s in x.addressable_shards if s.device == dev)
    # Only norm scales and q/k/v biases (~0.5% of this tiny model) are replicated.
    assert total / 8 <= local <= total / 8 * 1.05, (local, total)
  assert sharding.replicated_fraction(nn.meta.unbox(abstract), shardings) < 0.02


def test_tolerance_check_names_replicated_params_when_a_rule_is_missing():
  mesh = sharding.make_mesh((1, 8, 1))
  rules = tuple(r for r in sharding.DEFAULT_RULES if r[0] != "embed")  # forgot FSDP on embed
  ids = jnp.zeros((8, 16), jnp.int32)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract = jax.eval_shape(lambda r: Qwen(TINY).init(r, ids), jax.random.PRNGKey(0))
  shardings = sharding.logical_shardings(abstract, mesh, rules)
  unboxed = jax.tree.map(lambda b: b.value, abstract, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
  assert sharding.replicated_fraction(unboxed, shardings) == pytest.approx(1.0)
  with pytest.raises(ValueError, match="embed_tokens"):
    sharding.check_tolerance(unboxed, shardings, 0.02, "tiny qwen")
  np.testing.assert_equal(sharding.check_tolerance(unboxed, shardings, 1.0, "tiny qwen"), 1.0)
