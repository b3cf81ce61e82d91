"""The trainer on the tiny Qwen LM: mesh equivalence, accumulation, freezing, EMA, non-finite steps, FLOPs.

All on 8 fake CPU devices in fp32; a "1 device" reference uses a mesh over jax.devices()[:1].
"""

import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/

from configs import qwen_lm  # noqa: E402
from unimm_jax import registry, schema, sharding  # noqa: E402
from unimm_jax.training import lm, metrics, optim, trainer  # noqa: E402
from unimm_jax.training.task import Task  # noqa: E402


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  c = qwen_lm.get_config("tiny")
  c.optim.warmup_steps = 0     # the first step must move the params
  c.optim.eps = 1e-4           # keeps Adam's first step Lipschitz in the gradient: fp noise stays noise
  c.optim.lr = 1e-3
  c.update(overrides)
  return c


def batches(config, n=1):
  it = iter(registry.dataset(config.data.name)(config, config.batch_size, 0, 1))
  return [next(it) for _ in range(n)]


def run(config, ici, n_devices=8, data=None, n_steps=1, start=None):
  """-> (initial state, states after each step, metrics of each step, Setup); states as numpy.

  `start`: an initial state (numpy) to place on this mesh instead of initialising (saves a compile).
  """
  mesh = sharding.make_mesh(ici, devices=jax.devices()[:n_devices])
  rules = sharding.rules_from_config(config.sharding.rules)
  data = data if data is not None else batches(config, n_steps)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    s = trainer.build(config, mesh, rules)
    state = (s.init(jax.random.PRNGKey(config.seed)) if start is None
             else jax.device_put(start, s.state_shardings))
    states, outs = [jax.device_get(state)], []
    for batch in data:
      state, out = s.step(state, s.global_batch(batch))
      states.append(jax.device_get(state))
      outs.append(jax.device_get(out))
    return states[0], states[1:], outs, s


def assert_trees_close(a, b, atol):
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(x, y, atol=atol, rtol=0, err_msg=jax.tree_util.keystr(path))


def test_one_step_gives_the_same_loss_and_params_on_every_mesh():
  config = tiny_config()
  data = batches(config)
  init, (ref,), (ref_out,), _ = run(config, (1, 1, 1), n_devices=1, data=data)
  for ici in [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2)]:
    _, (got,), (out,), s = run(config, ici, data=data, start=init)
    np.testing.assert_allclose(out["loss"], ref_out["loss"], atol=1e-5, rtol=0, err_msg=str(ici))
    np.testing.assert_allclose(out["grad_norm"], ref_out["grad_norm"], rtol=1e-5, err_msg=str(ici))
    assert_trees_close(got.params, ref.params, atol=1e-5)
    assert_trees_close(got.opt_state, ref.opt_state, atol=1e-5)
  # The last mesh (1, 4, 2): params, Adam moments and batches really are sharded.
  assert s.state_shardings.params["layers_0"]["mlp"]["up_proj"]["kernel"].spec == jax.sharding.PartitionSpec(
      "fsdp", "tensor")
  mu = s.state_shardings.opt_state.inner_states["trainable"].inner_state[1][0].mu
  assert mu["layers_0"]["mlp"]["up_proj"]["kernel"].spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert s.batch_sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))


def test_gradient_accumulation_4x2_equals_batch_8():
  data = batches(tiny_config(), 2)
  init, (*_, big), big_out, _ = run(tiny_config(), (1, 2, 1), n_devices=2, data=data)
  _, (*_, acc), acc_out, _ = run(tiny_config(accum_steps=4), (1, 2, 1), n_devices=2, data=data, start=init)
  for a, b in zip(acc_out, big_out):
    np.testing.assert_allclose(a["loss"], b["loss"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(a["loss/accuracy"], b["loss/accuracy"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)
  assert_trees_close(acc.params, big.params, atol=1e-5)


def test_frozen_modules_stay_bitwise_equal_and_get_no_optimizer_state():
  config = tiny_config()
  config.optim.freeze = (r"layers_0/.*", r"embed_tokens/.*")
  init, (_, state), _, _ = run(config, (1, 4, 2), n_steps=2)
  init = init.params
  np.testing.assert_array_equal(state.params["embed_tokens"]["embedding"], init["embed_tokens"]["embedding"])
  for a, b in zip(jax.tree.leaves(state.params["layers_0"]), jax.tree.leaves(init["layers_0"]), strict=True):
    np.testing.assert_array_equal(a, b)
  assert not np.allclose(state.params["layers_1"]["mlp"]["up_proj"]["kernel"],
                         init["layers_1"]["mlp"]["up_proj"]["kernel"])
  opt_paths = [optim.path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]]
  assert not any("layers_0" in p or "embed_tokens" in p for p in opt_paths)
  assert any("layers_1/mlp/up_proj/kernel" in p for p in opt_paths)


def test_freeze_pattern_that_matches_nothing_is_an_error():
  config = tiny_config()
  config.optim.freeze = (r"vision_tower/.*",)
  with pytest.raises(ValueError, match="vision_tower"):
    run(config, (1, 1, 1), n_devices=1, data=[])


@pytest.mark.slow
def test_ema_params_follow_the_formula():
  config = tiny_config()
  config.optim.ema_decay = 0.9
  init, (state1, state2), _, _ = run(config, (2, 2, 2), n_steps=2)
  np.testing.assert_array_equal(init.ema_params["norm"]["scale"], init.params["norm"]["scale"])
  want = jax.tree.map(lambda p0, p1, p2: 0.9 * (0.9 * p0 + 0.1 * p1) + 0.1 * p2,
                      init.params, state1.params, state2.params)
  assert_trees_close(state2.ema_params, want, atol=1e-6)


def test_ema_warmup_follows_diffusers_decay_schedule():
  # update n uses min(decay, (1 + n) / (10 + n)): 0.1 then 2/11, not 0.9 from the start
  config = tiny_config()
  config.optim.update(ema_decay=0.9, ema_warmup=True)
  init, (state1, state2), _, _ = run(config, (1, 1, 1), n_devices=1, n_steps=2)
  d0, d1 = 0.1, 2 / 11
  want = jax.tree.map(lambda p0, p1, p2: d1 * (d0 * p0 + (1 - d0) * p1) + (1 - d1) * p2,
                      init.params, state1.params, state2.params)
  assert_trees_close(state2.ema_params, want, atol=1e-6)
  np.testing.assert_allclose(np.asarray(optim.ema_decay_at(0.9, True, jnp.asarray(1000))), 0.9)


def test_weight_decay_skips_norms_biases_and_embeddings():
  config = tiny_config()
  config.optim.update(lr=0.1, weight_decay=0.5, clip_norm=0.0)
  params = {"embed_tokens": {"embedding": jnp.ones((4, 2))},
            "layers_0": {"input_layernorm": {"scale": jnp.ones(2)},
                         "self_attn": {"q_proj": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}}}
  tx, _, _ = optim.build(config.optim, 10, params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)   # zero gradients: only decay moves params
  np.testing.assert_allclose(updates["layers_0"]["self_attn"]["q_proj"]["kernel"], -0.1 * 0.5)
  for leaf in (updates["embed_tokens"]["embedding"], updates["layers_0"]["input_layernorm"]["scale"],
               updates["layers_0"]["self_attn"]["q_proj"]["bias"]):
    np.testing.assert_array_equal(leaf, 0.0)


def test_schedules_warm_up_then_decay_to_the_end_fraction():
  c = tiny_config().optim
  c.update(lr=1.0, warmup_steps=10, end_lr_frac=0.1)
  for name, mid in [("cosine", 0.55), ("linear", 0.55), ("constant", 1.0)]:
    c.schedule = name
    f = optim.learning_rate(c, 110)
    np.testing.assert_allclose([f(0), f(5), f(10), f(60)], [0.0, 0.5, 1.0, mid], atol=1e-6)
    np.testing.assert_allclose(f(110), 1.0 if name == "constant" else 0.1, atol=1e-6)
  c.schedule = "rsqrt"
  with pytest.raises(ValueError, match="rsqrt"):
    optim.learning_rate(c, 110)


def scaled_lm(config):
  """The LM task with its loss times batch["scale"], so a test can inject a NaN batch."""
  base = lm.build(config)

  def loss_fn(params, batch, rng, norms):
    loss, aux = base.loss_fn(params, batch, rng, norms)
    return loss * batch["scale"][0], aux
  return Task(**{**base.__dict__, "name": "lm_scaled", "loss_fn": loss_fn})


def with_scale(batch, value):
  return {**batch, "scale": np.full((len(batch["input_ids"]),), value, np.float32)}


@pytest.mark.slow
def test_nonfinite_step_is_skipped_and_counted(monkeypatch):
  monkeypatch.setitem(registry.TASKS, "lm_scaled", scaled_lm)
  config = tiny_config(task="lm_scaled")
  data = [with_scale(b, v) for b, v in zip(batches(config, 3), [1.0, np.nan, 1.0])]
  _, (state1, state2, state3), outs, _ = run(config, (2, 2, 2), data=data)
  assert [bool(o["finite"]) for o in outs] == [True, False, True]
  assert int(state2.step) == 2 and int(state2.skipped) == 1 and int(outs[2]["skipped"]) == 1
  kept = jax.tree.leaves((state2.params, state2.opt_state))
  for a, b in zip(kept, jax.tree.leaves((state1.params, state1.opt_state)), strict=True):
    np.testing.assert_array_equal(a, b)
  assert not np.allclose(state3.params["norm"]["scale"], state2.params["norm"]["scale"])
  # The learning rate follows the steps actually taken (Adam's count), not the skipped one.
  np.testing.assert_allclose(outs[2]["lr"], outs[1]["lr"])


@pytest.mark.slow
def test_nonfinite_stop_checkpoints_the_last_good_state_and_raises(monkeypatch, tmp_path):
  monkeypatch.setitem(registry.TASKS, "lm_scaled", scaled_lm)

  def nan_at_3(config, per_process, index, count):
    it = iter(registry.dataset("synthetic_tokens")(config, per_process, index, count))
    return (with_scale(next(it), np.nan if i == 2 else 1.0) for i in range(10**6))

  class Resumable:  # grain's checkpoint handler stores get_state() bytes of non-grain iterators
    def __init__(self, config, per_process, index, count):
      self.it, self.i = nan_at_3(config, per_process, index, count), 0

    def __next__(self):
      self.i += 1
      return next(self.it)

    def __iter__(self):
      return self

    def get_state(self):
      return json.dumps({"i": self.i}).encode()

    def set_state(self, state):
      raise AssertionError("not resumed in this test")

  monkeypatch.setitem(registry.DATASETS, "nan_at_3", Resumable)
  config = tiny_config(task="lm_scaled", nonfinite="stop", steps=6)
  config.data.name = "nan_at_3"
  config.mesh.ici = (2, 2, 2)
  with pytest.raises(trainer.NonFiniteLoss, match="step 3"):
    trainer.train(config, str(tmp_path))
  mngr = ocp.CheckpointManager(tmp_path / "checkpoints")
  assert mngr.latest_step() == 3
  assert metrics.read_scalars(str(tmp_path / "events"))["skipped"] == {1: 0.0, 2: 0.0}


@pytest.mark.slow
def test_analytic_flops_match_xla_cost_analysis():
  config = tiny_config()
  config.model.update(vocab=1024, embed=256, mlp=1024, depth=2, heads=4, kv_heads=2, head_dim=64)
  config.data.seq_len, config.batch_size = 256, 4
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  rules = sharding.rules_from_config(config.sharding.rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    s = trainer.build(config, mesh, rules)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s.batch_sharding),
                         batches(config)[0])
    cost = s.step.lower(s.abstract_state, batch).compile().cost_analysis()
  xla = cost["flops"]
  analytic = s.task.flops_per_example * config.batch_size
  # XLA also counts softmax, norms, the loss and the optimizer, a few percent at this size.
  assert 0.95 <= xla / analytic <= 1.10, (xla, analytic)


def test_event_files_round_trip_and_use_tensorflow_crc(tmp_path):
  c = 0xE3069283  # CRC-32C of b"123456789" (RFC 3720)
  assert metrics._masked_crc(b"123456789") == (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF
  w = metrics.EventWriter(str(tmp_path))
  w.scalars(1, {"loss": 2.5, "perf/mfu": 0.25})
  w.scalars(2, {"loss": 1.5})
  w.close()
  with open(w.path, "ab") as f:
    f.write(b"\x10\x00")  # a record cut short by a kill ends the file
  assert metrics.read_scalars(str(tmp_path)) == {"loss": {1: 2.5, 2: 1.5}, "perf/mfu": {1: 0.25}}
  raw = bytearray(open(w.path, "rb").read())
  raw[30] ^= 1
  open(w.path, "wb").write(bytes(raw))
  with pytest.raises(ValueError, match="corrupt"):
    metrics.read_scalars(str(tmp_path))


def test_peak_flops_from_device_kind_or_override():
  assert metrics.peak_flops(jax.devices()[0]) is None  # CPU: no data sheet
  assert metrics.peak_flops(jax.devices()[0], 2.0) == 2e12


def test_processes_read_their_own_rows_that_stack_to_the_one_process_batch():
  config = tiny_config()
  one = next(iter(registry.dataset("synthetic_tokens")(config, 8, 0, 1)))
  two = [next(iter(registry.dataset("synthetic_tokens")(config, 4, i, 2))) for i in range(2)]
  for key in one:
    np.testing.assert_array_equal(np.concatenate([t[key] for t in two]), one[key])
  seg, labels = one["segment_ids"], one["labels"]
  assert (labels[seg == 0] == schema.IGNORE).all() and (seg.max(1) >= 1).all()


def test_next_token_targets_stop_at_document_boundaries_padding_and_loss_mask():
  batch = {"labels": np.array([[5, 6, 7, 8, 9, -100]]), "segment_ids": np.array([[1, 1, 2, 2, 2, 0]]),
           "loss_mask": np.array([[1, 1, 1, 1, 0, 0]])}
  targets, valid = lm.next_token_targets(batch)
  # position t predicts labels[t+1]: 5->6 ok, 6->7 crosses documents, 7->8 ok, 8->9 masked, 9->pad
  np.testing.assert_array_equal(valid, [[True, False, True, False, False]])
  np.testing.assert_array_equal(targets, [[6, 0, 8, 0, 0]])


@pytest.mark.slow
def test_init_from_a_converted_checkpoint_starts_from_its_params(tmp_path):
  from unimm_jax import checkpoint
  from unimm_jax.models.qwen import Qwen, QwenConfig
  config = tiny_config(steps=1)
  config.optim.lr = 0.0  # the one step leaves the params as loaded
  cfg = QwenConfig.from_dict(config.model.to_dict())
  boxed = Qwen(cfg).init(jax.random.PRNGKey(7), np.zeros((1, 4), np.int32))["params"]
  params = jax.tree.map(lambda b: np.asarray(b.value), boxed, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
  checkpoint.save(str(tmp_path / "ckpt"), params, {"family": "qwen", "config": cfg.to_dict()})
  config.init_from = str(tmp_path / "ckpt")
  state = trainer.train(config, str(tmp_path / "run"))
  assert_trees_close(jax.device_get(state.params), params, atol=0)


def test_checkpoints_keep_the_last_k_and_every_mth_and_restore_the_data_position(tmp_path):
  from unimm_jax.training import checkpointing
  config = tiny_config()
  config.checkpoint.update(every=1, keep=2, keep_every=4)
  data = iter(registry.dataset("synthetic_tokens")(config, 2, 0, 1))
  mngr = checkpointing.manager(str(tmp_path), config.checkpoint)
  for step in range(1, 11):
    next(data)
    checkpointing.save(mngr, step, {"w": np.full((3,), step, np.float32)}, data)
  mngr.wait_until_finished()
  assert sorted(mngr.all_steps()) == [4, 8, 9, 10]
  want = next(data)
  fresh = iter(registry.dataset("synthetic_tokens")(config, 2, 0, 1))
  abstract = {"w": jax.ShapeDtypeStruct((3,), np.float32)}
  restored = checkpointing.restore(mngr, 10, abstract, fresh)
  np.testing.assert_array_equal(restored["w"], 10.0)
  np.testing.assert_array_equal(next(fresh)["input_ids"], want["input_ids"])
  mngr.close()
