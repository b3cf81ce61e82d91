"""Task "ming" on the trainer: the tiny config overfits one shapes batch, the frozen MLLM and VAE stay bitwise equal
and hold no optimizer state, and the objective equals a hand computation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ming as ming_configs
from unimm_jax import registry, sharding
from unimm_jax.training import ming_task, optim, trainer

STEPS = 12
FROZEN_PARTS = (("ming", "visual"), ("ming", "llm"), ("ming", "linear_proj_0"), ("ming", "linear_proj_2"), ("vae",))
TRAINED_PARTS = (("ming", "query_tokens_4x4"), ("ming", "query_tokens_16x16"), ("ming", "proj_in"),
                 ("ming", "connector"), ("ming", "proj_out"), ("ming", "mlp"), ("dit",))


def part(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def tiny_config():
  c = ming_configs.get_config("tiny")
  c.batch_size = 2
  c.steps = STEPS
  c.ming.cond_dropout = 0.0
  c.optim.update(warmup_steps=0, schedule="constant", lr=3e-3, weight_decay=0.0)
  return c


@pytest.fixture(scope="module")
def setup():
  c = tiny_config()
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  rules = sharding.rules_from_config(c.sharding.rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return c, mesh, rules, trainer.build(c, mesh, rules)   # traced abstractly: nothing is compiled yet


@pytest.fixture(scope="module")
def overfit(setup):
  """STEPS steps on one fixed batch of 2; the loss at a fixed draw of noise and sigma before and after."""
  c, mesh, rules, s = setup
  batch = next(iter(registry.dataset(c.data.name)(c, c.batch_size, 0, 1)))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = s.init(jax.random.PRNGKey(0))
    init = jax.device_get(state.params)
    gb = s.global_batch(batch)
    fixed = jax.jit(lambda p, b: s.task.loss_fn(p, b, jax.random.PRNGKey(7), s.task.normalizers(b)))
    before = jax.device_get(fixed(state.params, gb))
    for _ in range(STEPS):
      state, out = s.step(state, gb)
    after = jax.device_get(fixed(state.params, gb))
    return init, jax.device_get(state), before, after, jax.device_get(out)


def test_frozen_parts_hold_no_optimizer_state(setup):
  s = setup[-1]
  opt_paths = [optim.path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(s.abstract_state.opt_state)[0]]
  for path in FROZEN_PARTS:
    assert not any("/".join(path) + "/" in p for p in opt_paths), path
  for path in TRAINED_PARTS:
    assert any("/".join(path) in p for p in opt_paths), path
  trainable = {optim.path_str(kp): t for kp, t in jax.tree_util.tree_flatten_with_path(s.trainable)[0]}
  assert not any(t for p, t in trainable.items() if p.startswith(("ming/visual/", "ming/llm/", "vae/")))
  assert all(t for p, t in trainable.items() if p.startswith(("dit/", "ming/connector/", "ming/mlp/")))


@pytest.mark.slow   # one compile of the tiny step and of the loss (~80 s on 2 shared cores)
def test_tiny_overfit_loss_falls(overfit):
  _, _, (loss0, m0), (loss1, m1), out = overfit
  assert np.isfinite(out["loss"]) and out["finite"]
  assert loss1 < 0.7 * loss0, (loss0, loss1)
  assert m1["flow"] < m0["flow"]
  for k in ("flow_4x4", "flow_8x8", "flow_16x16", "consistency"):
    assert k in m1


@pytest.mark.slow
def test_frozen_mllm_and_vae_unchanged_after_training(overfit):
  init, state, *_ = overfit
  for path in FROZEN_PARTS:
    for a, b in zip(jax.tree.leaves(part(state.params, path)), jax.tree.leaves(part(init, path)), strict=True):
      np.testing.assert_array_equal(a, b, err_msg="/".join(path))
  for path in TRAINED_PARTS:
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(part(state.params, path)),
                                                       jax.tree.leaves(part(init, path)), strict=True)]
    assert any(moved), "/".join(path)


def test_objective_equals_hand_computation():
  rng = np.random.default_rng(0)
  b = 3
  target = rng.normal(size=(b, 2, 2, 4)).astype(np.float32)
  v = {k: rng.normal(size=target.shape).astype(np.float32) for k in ("4x4", "8x8", "16x16")}
  loss, m = ming_task.objective({k: jnp.asarray(x) for k, x in v.items()}, jnp.asarray(target),
                                {"examples": jnp.float32(b)}, 0.5)
  flow = {k: np.mean((x - target) ** 2) for k, x in v.items()}   # per-example means averaged = the global mean
  cons = (np.mean((v["4x4"] - v["16x16"]) ** 2) + np.mean((v["8x8"] - v["16x16"]) ** 2)) / 2
  np.testing.assert_allclose(m["flow_8x8"], flow["8x8"], rtol=1e-6)
  np.testing.assert_allclose(m["flow"], np.mean(list(flow.values())), rtol=1e-6)
  np.testing.assert_allclose(m["consistency"], cons, rtol=1e-6)
  np.testing.assert_allclose(loss, np.mean(list(flow.values())) + 0.5 * cons, rtol=1e-6)
  # the finest run is the consistency target, not pulled: its gradient is the flow term's alone
  grads = jax.grad(lambda f: ming_task.objective({**v, "16x16": f}, jnp.asarray(target),
                                                 {"examples": jnp.float32(b)}, 0.5)[0])(jnp.asarray(v["16x16"]))
  np.testing.assert_allclose(grads, 2 * (v["16x16"] - target) / target.size / 3, rtol=1e-5, atol=1e-7)


def test_configs_are_consistent():
  for name in ming_configs.VARIANTS:
    c = ming_configs.get_config(name)
    cfg, dit, vae = ming_task.configs_from(c)
    assert c.task == "ming" and c.task in registry.TASKS and c.data.name in registry.DATASETS
    assert dit.caption_channels == cfg.caption_channels and dit.in_channels == vae.latent_channels
  cfg, dit, vae = ming_task.configs_from(ming_configs.get_config("release"))
  assert (cfg.text.embed, cfg.vision.out_embed, cfg.mlp_hidden, cfg.caption_channels) == (3584, 8192, 2048, 2304)
  assert (dit.inner_dim, dit.num_layers, vae.spatial_downscale, vae.latent_channels) == (2240, 20, 32, 32)


def test_init_from_a_converted_release(tmp_path):
  """load_params reads a scripts/convert.py --ming directory into the task's tree; other sizes are refused by name."""
  import os

  from unimm_jax import checkpoint
  from unimm_jax.convert import ming as ming_convert
  fixtures = os.path.join(os.path.dirname(__file__), "fixtures", "ming_lite_uni")
  dst = str(tmp_path / "ming")
  ming_convert.convert_cli(fixtures, None, dst, {}, False)
  c = tiny_config()
  for field, where in (("model", dst), ("dit", os.path.join(dst, "transformer")), ("vae", os.path.join(dst, "vae"))):
    c[field] = type(c[field])(checkpoint.read_meta(where)["config"])
  task = ming_task.build(c)
  params = task.load_params(dst)
  want = jax.eval_shape(task.init_fn, jax.random.PRNGKey(0))
  want = jax.tree.map(lambda b: b.value, want, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
  assert jax.tree.structure(params) == jax.tree.structure(want)
  for (path, got), w in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(want), strict=True):
    assert got.shape == w.shape and got.dtype == w.dtype, jax.tree_util.keystr(path)
  with pytest.raises(ValueError, match=r"differs from config\.model in \[.*'text'"):
    ming_task.build(tiny_config()).load_params(dst)


def test_release_size_builds_sharded_over_8_devices():
  """The release config on an 8-way fsdp mesh: every frozen pattern matches, the params shard within tolerance
  (traced abstractly, nothing is allocated)."""
  c = ming_configs.get_config("release")
  c.batch_size = 8
  mesh = sharding.make_mesh((1, 8, 1))
  rules = sharding.rules_from_config(c.sharding.rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    s = trainer.build(c, mesh, rules)
  ff = s.state_shardings.params["dit"]["layers_0"]["ff"]["conv_inverted"]["kernel"]
  assert ff.spec != jax.sharding.PartitionSpec()
  frozen = sum(a.size for a, t in zip(jax.tree.leaves(s.abstract_state.params), jax.tree.leaves(s.trainable)) if not t)
  assert frozen > 7e9   # the 7B LLM and the ViT
