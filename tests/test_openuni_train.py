"""OpenUni training (task "openuni", configs/openuni.py): the task's loss is the original's text2image_loss on the
fixture's case d batch, each stage keeps its frozen parts out of the optimizer state, the tiny finetune's loss falls
through the trainer and its export scores with scripts/eval_shapes.py, and a stopped run resumes exactly."""

from __future__ import annotations

import os
import signal
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_openuni import FIX, config_of_fixture, fixture, nhwc

from configs import openuni as openuni_configs
from unimm_jax import sharding
from unimm_jax.convert import openuni as convert_openuni
from unimm_jax.data import openuni_data
from unimm_jax.models import openuni
from unimm_jax.training import checkpointing, metrics, openuni_task, optim, trainer


def setup(stage: str, model=None) -> trainer.Setup:
  config = openuni_configs.get_config("tiny")
  config.stage = stage
  if model is not None:
    config.model = model
  mesh = sharding.make_mesh(tuple(config.mesh.ici), tuple(config.mesh.dcn))
  rules = sharding.rules_from_config(config.sharding.rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return trainer.build(config, mesh, rules)


@pytest.mark.parametrize("stage, trained", [("pretrain", {"meta_queries", "connector", "projector"}),
                                            ("finetune", {"meta_queries", "connector", "projector", "transformer"})])
def test_stages_keep_their_frozen_parts_out_of_the_optimizer_state(stage, trained):
  s = setup(stage)   # abstract state only: nothing compiles
  tops = {optim.path_str(kp).split("/")[0] for kp, _ in
          jax.tree_util.tree_flatten_with_path(s.abstract_state.opt_state)[0]}
  params = set(s.abstract_state.params)
  assert params == {"lmm", "meta_queries", "connector", "projector", "transformer", "vae"}
  assert not tops & (params - trained), tops
  paths = [optim.path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(s.abstract_state.opt_state)[0]]
  for part in trained:   # Adam moments of every trained part
    assert any(f"{part}/" in p or p.endswith(part) for p in paths), part
  assert not any(f"/{frozen}/" in f"/{p}" for p in paths for frozen in params - trained)
  assert {p: bool(v) for p, v in zip(params, [any(jax.tree.leaves(s.trainable[k])) for k in params])} == {
      p: p in trained for p in params}


@pytest.mark.slow   # ~40 s: DC-AE encoder, LLM and SANA compile
def test_task_loss_fn_is_the_fixture_text2image_loss(monkeypatch):
  """The task's own loss_fn on case d's batch, with diff_loss's randoms as the original drew them."""
  import json
  with open(os.path.join(FIX, "config.json")) as f:
    meta = json.load(f)
  cfg = config_of_fixture(meta)
  params, _ = convert_openuni.convert_release(os.path.join(FIX, "openuni.safetensors"), cfg)
  d = fixture("case_d_train_loss")
  config = openuni_configs.get_config("tiny")
  config.model = cfg.to_dict()
  config.data.image_size = cfg.image_size
  task = openuni_task.build(config)
  batch = {"input_ids": jnp.asarray(d["t2i_input_ids"], jnp.int32),
           "attention_mask": jnp.asarray(d["t2i_attention_mask"], jnp.int32),
           "images": jnp.asarray(d["t2i_images_uint8"].astype(np.float32) / 127.5 - 1)}
  randoms = (nhwc(d["t2i_noise"]), jnp.asarray(d["t2i_u"]))
  shapes, ours = [], openuni_task.draw

  def fixture_draw(rng, c, images_shape):
    shapes.append(ours(rng, c, images_shape)[0].shape)   # our draw has the noise's shape
    return randoms

  monkeypatch.setattr(openuni_task, "draw", fixture_draw)
  loss, metrics = jax.jit(task.loss_fn)(params, batch, jax.random.key(0), task.normalizers(batch))
  assert shapes == [randoms[0].shape]
  np.testing.assert_allclose(loss, d["t2i_loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics["flow_loss"], loss, rtol=0)


def tiny_run(stage: str, **overrides):
  config = openuni_configs.get_config("tiny")
  config.stage = stage
  config.update_from_flattened_dict({"log_every": 1, **overrides})
  return config


def losses(workdir) -> dict[int, float]:
  return metrics.read_scalars(os.path.join(str(workdir), "events"))["loss"]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
  """60 steps of the tiny finetune stage through the trainer (lr 1e-3, cosine, the shapes t2i stream)."""
  workdir = tmp_path_factory.mktemp("finetune")
  config = tiny_run("finetune", steps=60, **{"checkpoint.every": 60})
  state = trainer.train(config, str(workdir))
  return config, jax.device_get(state.params), losses(workdir)


@pytest.mark.slow   # ~3-5 min on 2 shared cores: one compile of the step, 60 steps of batch 8
def test_tiny_finetune_loss_falls_through_the_trainer(finetuned):
  loss = finetuned[2]
  assert sorted(loss) == list(range(1, 61))
  first, last = np.mean([loss[s] for s in range(1, 6)]), np.mean([loss[s] for s in range(51, 61)])
  assert last < 0.8 * first, (first, last)


@pytest.mark.slow   # the finetune run above, then the eval set's prompts, questions and edits at 4 per category
def test_eval_shapes_scores_the_trained_tiny_through_the_family_pipeline(finetuned, tmp_path):
  """The trained params exported as a converted OpenUni directory (with the shapes tokenizer) are what
  scripts/eval_shapes.py --ckpt loads, through unimm_jax.load_pipeline's family table."""
  from scripts import eval_shapes
  config, params, _ = finetuned
  cfg = openuni.OpenUniConfig.from_dict(config.model.to_dict())
  export = str(tmp_path / "export")
  with tempfile.TemporaryDirectory() as tok:
    openuni_data.tokenizer().save_pretrained(tok)
    convert_openuni.save(export, cfg, params, tokenizer=tok)
  report = eval_shapes.main(["--ckpt", export, "--per-category", "2", "--steps", "5"])
  assert set(report) >= {"generation", "understanding", "editing", "chance"}
  assert 0 <= report["generation"]["overall"] <= 1
  assert os.path.isfile(os.path.join(export, "shapes_eval", "shapes_eval.json"))


@pytest.mark.slow   # three runs of 4 steps, each compiling the tiny step
def test_resume_after_sigterm_equals_an_uninterrupted_run(tmp_path, monkeypatch):
  """Stopped after step 3 (SIGTERM at the step boundary: checkpointed), resumed: the same losses and final params
  as 4 steps without a stop (the step's rng redraws eps, u and the caption dropout alike)."""
  config = tiny_run("pretrain", steps=4, **{"checkpoint.every": 2})
  reference = trainer.train(config, str(tmp_path / "reference"))
  position, calls = checkpointing.DataPosition, []

  def stop_after_step_3(data):   # taken before step 1 and after each step
    if len(calls) == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    calls.append(1)
    return position(data)

  monkeypatch.setattr(checkpointing, "DataPosition", stop_after_step_3)
  workdir = str(tmp_path / "stopped")
  with pytest.raises(trainer.Interrupted) as e:
    trainer.train(config, workdir)
  assert (e.value.step, e.value.latest) == (3, 3)
  assert sorted(losses(workdir)) == [1, 2, 3]
  monkeypatch.undo()
  resumed = trainer.train(config, workdir)
  assert losses(workdir) == losses(tmp_path / "reference")
  for a, b in zip(jax.tree.leaves(jax.device_get(resumed.params)), jax.tree.leaves(jax.device_get(reference.params)),
                  strict=True):
    np.testing.assert_array_equal(a, b)
