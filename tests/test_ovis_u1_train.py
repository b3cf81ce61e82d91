"""Task "ovis_u1" on the trainer: each stage keeps its frozen parts out of the optimizer state, the shapes batches
condition the decoder exactly as the sampling pipeline does one prompt at a time, and the tiny config's decoder
stage and understanding stage overfit a batch with the frozen parts bitwise unchanged."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ovis_u1 as ovis_configs
from unimm_jax import registry, sharding
from unimm_jax.convert.maps.ovis_u1 import FAMILY
from unimm_jax.data import ovis_data, shapes
from unimm_jax.data.tokenizer import shapes_tokenizer
from unimm_jax.models import ovis_u1
from unimm_jax.sampling import ovis_u1 as S
from unimm_jax.sampling import vlm
from unimm_jax.schema import IGNORE
from unimm_jax.training import optim, ovis_u1_task, trainer

STEPS = 10
PARTS = ("llm", "visual_tokenizer", "vte", "visual_generator", "vae")
TRAINED = {"refiner_decoder": {"visual_generator"}, "decoder": {"visual_generator"}, "edit": {"visual_generator"},
           "understanding": {"llm", "visual_tokenizer", "vte"}}


def tiny_config(stage: str):
  c = ovis_configs.get_config("tiny")
  c.stage = stage
  c.batch_size = 2
  c.steps = STEPS
  c.ovis.cond_dropout = 0.0
  c.optim.update(warmup_steps=0, schedule="constant", lr=3e-3, weight_decay=0.0)
  return c


def build(stage: str):
  c = tiny_config(stage)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  rules = sharding.rules_from_config(c.sharding.rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return c, mesh, rules, trainer.build(c, mesh, rules)   # traced abstractly: nothing is compiled yet


@pytest.mark.parametrize("stage", sorted(TRAINED))
def test_stages_keep_their_frozen_parts_out_of_the_optimizer_state(stage):
  *_, s = build(stage)
  paths = [optim.path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(s.abstract_state.opt_state)[0]]
  assert set(s.abstract_state.params) == set(PARTS)
  for p in PARTS:
    held = any(f"/{p}/" in f"/{path}/" for path in paths)
    assert held == (p in TRAINED[stage]), (stage, p)
  refiner = [path for path in paths if "visual_generator/txt_in/" in path]
  assert bool(refiner) == (stage in ("refiner_decoder", "edit"))   # stage 5's t2i tunes the decoder alone


def test_stage_and_objective_checks():
  for field, value, match in (("stage", "pretrain", "config.stage"), ("ovis.sigma", "cosine", "config.ovis.sigma"),
                              ("ovis.cond_dropout", 1.0, "cond_dropout")):
    c = ovis_configs.get_config("tiny")
    node, key = (c, field) if "." not in field else (c.ovis, field.split(".")[1])
    setattr(node, key, value)
    with pytest.raises(ValueError, match=match):
      ovis_u1_task.build(c)


def _random_params(cfg):
  boxed = jax.eval_shape(ovis_u1.OvisU1(cfg).init, jax.random.key(0), *FAMILY.example_inputs(cfg))["params"]
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda x: jnp.asarray((rng.standard_normal(x.shape) * (0.5 / np.sqrt(x.shape[0]) if x.ndim > 1
                                                                             else 0.1)).astype(x.dtype)),
                      nn.meta.unbox(boxed))


def _items(c, stream_cls, stream):
  cfg = ovis_u1.OvisU1Config.from_dict(c.model.to_dict())
  d = c.data
  processor = S.OvisImageProcessor(patch=cfg.vision.patch, merge=cfg.vision.merge, min_pixels=d.min_pixels,
                                   max_pixels=d.max_pixels)
  src = shapes.ShapesSource(stream, 8, size=d.image_size, seed=0)
  extra = (d.image_size,) if stream == "t2i" else ()
  return cfg, processor, stream_cls(src, shapes_tokenizer(), cfg, processor, d.seq_len, *extra)


def test_t2i_batch_conditions_equal_the_pipeline_one_prompt_at_a_time():
  """Two captions of unequal lengths, right-padded, each with its white canvas in its own vision row: the
  condition at the real positions (and the null prompt's) equals the sampling pipeline's one-prompt condition."""
  c = tiny_config("refiner_decoder")
  cfg, processor, items = _items(c, ovis_data.T2IExamples, "t2i")
  lengths = [int(items[i]["txt_mask"].sum()) for i in range(len(items))]
  pick = [0, next(i for i, n in enumerate(lengths) if n != lengths[0])]
  batch = ovis_data.example_batch(items, pick)
  module, params = ovis_u1.OvisU1(cfg), _random_params(cfg)
  condition = jax.jit(lambda ids, vision: module.apply({"params": params}, ids, vision,
                                                       method=ovis_u1.OvisU1.condition))
  got = {k: condition(batch[f"{k}_ids"], ovis_data.vision_inputs(batch, cfg)) for k in ("input", "null")}
  tokenizer = shapes_tokenizer()
  canvas = S.tokenizer_image(S.blank(c.data.image_size, c.data.image_size), processor)
  patches, grid = processor(canvas)
  vision, counts = ovis_u1.prepare_vision(patches, [grid], cfg)
  for i in range(2):
    for key, mask_key, text in (("input", "txt_mask", S.T2I.format(items.source[pick[i]]["text"])),
                                ("null", "null_mask", S.UNCOND)):
      ids = vlm.expand_placeholders(S.prompt_ids(tokenizer, text, answer=False), ovis_u1.IMAGE_ATOM_ID, counts, "t")
      n = int(batch[mask_key][i].sum())
      assert n == len(ids) and batch[f"{key}_ids"][i, :n].tolist() == ids
      want = condition(jnp.asarray([ids], jnp.int32), vision)[0]
      np.testing.assert_allclose(got[key][i, :n], want, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(want))))


def test_edit_examples_are_the_pipelines_inputs():
  """An edit record -> the edit pipeline's prompt ids (instruction and null prompt with the source canvas through
  the tokenizer), the canvas as VAE pixels and the target at the canvas size."""
  c = tiny_config("edit")
  cfg, processor, items = _items(c, ovis_data.EditExamples, "edit")
  tokenizer = shapes_tokenizer()
  for i in range(2):
    ex, record = items[i], items.source[i]
    src, tgt = record["images"]
    size = S.smart_resize(*src.shape[:2], factor=S.EDIT_FACTOR)
    canvas = S.cover_crop(S.resize(src, *size), *size)
    patches, grid = processor(S.tokenizer_image(canvas, processor))
    _, counts = ovis_u1.prepare_vision(patches, [grid], cfg)
    for key, text in (("input", S.EDIT.format(record["text"].strip())), ("null", S.UNCOND)):
      ids = vlm.expand_placeholders(S.prompt_ids(tokenizer, text, answer=False), ovis_u1.IMAGE_ATOM_ID, counts, "t")
      mask = ex["txt_mask" if key == "input" else "null_mask"]
      assert ex[f"{key}_ids"][:int(mask.sum())].tolist() == ids
    np.testing.assert_array_equal(ex["source"], S.vae_pixels(canvas)[0])
    np.testing.assert_array_equal(ex["images"], S.cover_crop(tgt, *size).astype(np.float32) / 127.5 - 1)
    assert not np.array_equal(ex["source"], ex["images"])


def test_understanding_examples_target_the_answer_only():
  c = tiny_config("understanding")
  _, _, items = _items(c, ovis_data.UnderstandingExamples, "mmu")
  tokenizer = shapes_tokenizer()
  for i in range(3):
    ex, record = items[i], items.source[i]
    targets = ex["labels"][ex["labels"] != IGNORE]
    assert tokenizer.decode(targets[:-1].tolist()) == record["answer"]
    assert targets[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    start = int(np.argmax(ex["labels"] != IGNORE))   # the prompt (image, question, empty-think prefill) before
    prompt = vlm.expand_placeholders(S.prompt_ids(tokenizer, S.EDIT.format(record["text"]), answer=True),
                                     ovis_u1.IMAGE_ATOM_ID, [len(ex["vision_tokens"])], "t")
    assert ex["input_ids"][:start].tolist() == prompt
    assert (ex["labels"][start:] != IGNORE).sum() == len(targets)


def overfit(stage: str):
  """STEPS steps on one fixed batch of 2; the loss at one fixed rng before and after, params before and after."""
  c, mesh, rules, s = build(stage)
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
    return init, jax.device_get(state.params), before, after, jax.device_get(out)


def _check_parts(stage, init, params):
  for p in PARTS:
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(init[p]), jax.tree.leaves(params[p]), strict=True))
    assert same == (p not in TRAINED[stage]), (stage, p)


@pytest.mark.slow   # ~2 min CPU (400 s wall at load 10): one compile of the tiny step (VAE, LLM, towers, decoder)
def test_tiny_decoder_stage_overfits_with_the_llm_tokenizer_and_vae_frozen():
  init, params, (loss0, _), (loss1, m1), out = overfit("refiner_decoder")
  assert np.isfinite(out["loss"]) and out["finite"]
  assert loss1 < 0.7 * loss0, (loss0, loss1)
  assert m1["flow_loss"] == loss1
  _check_parts("refiner_decoder", init, params)


@pytest.mark.slow   # ~2 min CPU: one compile of the tiny edit step
def test_tiny_edit_stage_overfits_with_the_llm_tokenizer_and_vae_frozen():
  init, params, (loss0, _), (loss1, _), out = overfit("edit")
  assert np.isfinite(out["loss"]) and out["finite"]
  assert loss1 < 0.7 * loss0, (loss0, loss1)
  _check_parts("edit", init, params)


@pytest.mark.slow   # ~1.5 min CPU (255 s wall at load 10): one compile of the tiny understanding step
def test_tiny_understanding_stage_overfits_with_the_decoder_frozen():
  init, params, (loss0, _), (loss1, m1), out = overfit("understanding")
  assert np.isfinite(out["loss"]) and out["finite"]
  assert loss1 < 0.7 * loss0, (loss0, loss1)
  assert m1["accuracy"] > 0
  _check_parts("understanding", init, params)


@pytest.mark.slow   # ~25 s each: tracing the 3B model's init and optimizer abstractly
@pytest.mark.parametrize("stage", ["refiner_decoder", "understanding"])
def test_3b_builds_sharded_over_8_devices(stage):
  """The release size on an 8-way fsdp mesh: the params shard within the trainer's tolerance, and the frozen
  parts are what the stage freezes (traced abstractly, nothing is allocated)."""
  c = ovis_configs.get_config("3b")
  c.stage, c.batch_size = stage, 8
  mesh = sharding.make_mesh((1, 8, 1))
  rules = sharding.rules_from_config(c.sharding.rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    s = trainer.build(c, mesh, rules)
  q = s.state_shardings.params["visual_generator"]["double_blocks_0"]["attn"]["img_q_proj"]["kernel"]
  assert q.spec != jax.sharding.PartitionSpec()
  sizes = {p: sum(a.size for a in jax.tree.leaves(s.abstract_state.params[p])) for p in PARTS}
  trained = sum(a.size for a, t in zip(jax.tree.leaves(s.abstract_state.params), jax.tree.leaves(s.trainable)) if t)
  assert trained == sum(sizes[p] for p in TRAINED[stage])
  assert 1.0e9 < sizes["visual_generator"] < 1.3e9 and sizes["llm"] > 1.5e9   # README 3.1: a 1.127 B decoder
