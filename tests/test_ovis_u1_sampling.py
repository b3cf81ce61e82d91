"""Ovis-U1's pipeline (sampling/ovis_u1.py) on the converted fixture model: the prompts, images and conditions it
builds equal the original's stored ones (cases a, b, d of tests/fixtures/ovis_u1), one batched forward of the
guidance branches equals one forward each, and the CLIs convert / sample / edit / chat end to end."""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from PIL import Image

from unimm_jax import api, sharding
from unimm_jax.convert import hf
from unimm_jax.convert.maps.ovis_u1 import FAMILY
from unimm_jax.models import ovis_u1, yak
from unimm_jax.sampling import SamplerConfig, flow
from unimm_jax.sampling import ovis_u1 as S
from scripts_run import ROOT, run

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "ovis_u1")
SIDE_FILES = ("config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json")


def case(name: str) -> dict[str, np.ndarray]:
  with np.load(os.path.join(FIXTURES, f"case_{name}.npz")) as z:
    return {k: z[k] for k in z.files}


def close(got, want, what: str) -> None:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
  err, bound = np.max(np.abs(got - want)), 1e-4 * np.max(np.abs(want)) + 1e-6
  assert err <= bound, f"{what}: max|diff| {err:.3g} > {bound:.3g}"


def user_text(prompt: np.ndarray) -> str:
  """The user turn's text of a stored prompt string."""
  return str(prompt).split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> str:
  root = tmp_path_factory.mktemp("ovis_release")
  shutil.copy(os.path.join(FIXTURES, "weights.safetensors"), root / "model.safetensors")
  for n in SIDE_FILES:
    shutil.copy(os.path.join(FIXTURES, n), root)
  return str(root)


@pytest.fixture(scope="module")
def ckpt(release, tmp_path_factory) -> str:
  dst = str(tmp_path_factory.mktemp("ovis_ckpt") / "ckpt")
  hf.convert_to_orbax(release, dst)
  return dst


@pytest.fixture(scope="module")
def pipe(ckpt) -> S.OvisU1Pipeline:
  return api.load_pipeline(ckpt)


def test_prompts_and_images_are_the_originals(pipe):
  """Token ids with placeholders, NaViT patches (processor, the generation scripts' double resize, the blank
  image), the edit canvas and its VAE pixels: exactly the stored ones."""
  a, b, d = case("a_understanding"), case("b_t2i_condition"), case("d_edit_sampling")
  assert S.prompt_ids(pipe.tokenizer, user_text(a["prompt_text"]), answer=True) == a["input_ids"].tolist()
  for z, branch in ((b, "cond"), (b, "uncond"), (d, "cond"), (d, "no_txt"), (d, "no_both")):
    got = S.prompt_ids(pipe.tokenizer, user_text(z[f"{branch}_prompt_text"]), answer=False)
    assert got == z[f"{branch}_input_ids"][0].tolist(), branch
  patches = [pipe.processor(a[f"image{i}_uint8_hwc"]) for i in range(2)]
  np.testing.assert_array_equal(np.concatenate([p for p, _ in patches]), a["pixel_values"])
  assert [g for _, g in patches] == [tuple(g) for g in a["grid_thws"]]
  np.testing.assert_array_equal(pipe.processor(pipe.tokenizer_image(S.blank(48, 64)))[0], b["cond_pixel_values"])
  size = S.smart_resize(*d["source_uint8_hwc"].shape[:2], factor=S.EDIT_FACTOR)
  assert size == d["source_resized_uint8_hwc"].shape[:2]
  canvas = S.cover_crop(S.resize(d["source_uint8_hwc"], *size), *size)
  np.testing.assert_array_equal(canvas, d["source_resized_uint8_hwc"])
  np.testing.assert_array_equal(np.transpose(S.vae_pixels(canvas), (0, 3, 1, 2)), d["vae_pixel_values_source"])
  np.testing.assert_array_equal(pipe.processor(pipe.tokenizer_image(canvas))[0], d["cond_pixel_values"])
  np.testing.assert_array_equal(pipe.processor(pipe.tokenizer_image(S.blank(*size)))[0], d["no_both_pixel_values"])
  # a wider source is scaled to cover the canvas and center-cropped
  wide = S.cover_crop(np.arange(40 * 90 * 3, dtype=np.uint8).reshape(40, 90, 3), 64, 96)
  assert wide.shape == (64, 96, 3)
  with pytest.raises(ValueError, match="multiples of 16"):
    pipe.generate(["x"], (40, 64), pipe.sampler_config(steps=1))


def test_conditions_from_raw_inputs(pipe):
  """Prompt text + image -> the decoder condition of cases b (t2i, null) and d (the three edit branches)."""
  b, d = case("b_t2i_condition"), case("d_edit_sampling")
  close(pipe.condition(S.T2I.format("a cute cat"), S.blank(48, 64)), b["cond_llm_txt_cond"], "b cond")
  close(pipe.condition(S.UNCOND, S.blank(48, 64)), b["uncond_llm_txt_cond"], "b uncond")
  canvas = d["source_resized_uint8_hwc"]
  close(pipe.condition(S.EDIT.format("add a hat to this cat."), canvas), d["cond_llm_txt_cond"], "d full")
  close(pipe.condition(S.UNCOND, canvas), d["no_txt_llm_txt_cond"], "d no_txt")
  close(pipe.condition(S.UNCOND, S.blank(*canvas.shape[:2])), d["no_both_llm_txt_cond"], "d no_both")


def test_answer_greedy_and_sampled(pipe):
  """Case a's two images and question through `answer`: the original's greedy tokens; sampling is seeded."""
  a = case("a_understanding")
  images, q = [a["image0_uint8_hwc"], a["image1_uint8_hwc"]], user_text(a["prompt_text"])
  n = a["greedy_new_ids"].shape[1]
  want = pipe.tokenizer.decode(a["greedy_new_ids"][0].tolist(), skip_special_tokens=True)
  assert pipe.answer([images], [q], max_new_tokens=n) == [want]
  hot = dict(max_new_tokens=6, sampler=SamplerConfig(temperature=1.0, top_k=20), seed=3)
  first = pipe.answer([images, None], [q, "Describe each image."], **hot)
  assert first == pipe.answer([images, None], [q, "Describe each image."], **hot)
  with pytest.raises(ValueError, match="1 <image> placeholder"):
    pipe.answer([[images[0], images[1]]], ["<image> only one marker"])


@pytest.mark.slow   # t2i ~33 s, edit ~60 s (5 compiles) on 2 cores: over the default suite's budget
@pytest.mark.parametrize("name", ["t2i", "edit"])
def test_one_batched_forward_equals_one_per_branch(pipe, name):
  """The guidance branches in one forward (text conditions of unequal lengths, padded and masked) give the
  numbers of the original's one forward per branch."""
  z = case(f"d_{name}_sampling")
  noise = jnp.asarray(np.transpose(z["noise_nchw"], (0, 2, 3, 1)))
  if name == "t2i":
    branches = [S.Branch(jnp.asarray(z["txt_cond"])), S.Branch(jnp.asarray(z["txt_uncond"]))]
    weights = flow.text_guidance(5.0)
  else:
    cond = jnp.asarray(z["vae_cond_tokens"])
    branches = [S.Branch(jnp.asarray(z[f"{b}_llm_txt_cond"]), c)
                for b, c in (("cond", cond), ("no_txt", cond), ("no_both", None))]
    weights = flow.image_text_guidance(6.0, 1.5)
  grid = z["timesteps"][:3]   # two steps
  one = pipe.sampler.sample(noise, branches, weights, grid)
  batched = pipe.sampler.sample(noise, branches, weights, grid, batch_branches=True)
  for i in range(len(grid) - 1):
    for k in range(len(branches)):
      np.testing.assert_allclose(batched.velocities[i][k], one.velocities[i][k], rtol=0,
                                 atol=1e-5 * float(np.max(np.abs(one.velocities[i][k]))))
  np.testing.assert_allclose(batched.final, one.final, rtol=0, atol=1e-5 * float(np.max(np.abs(one.final))))


def test_sampler_config_defaults(pipe):
  cfg = pipe.sampler_config(steps=None, guidance=None, shift=None)
  assert (cfg.steps, cfg.text_scale(edit=False), cfg.text_scale(edit=True), cfg.image_guidance) == (50, 5.0, 6.0, 1.5)
  g = pipe.cfg.generator
  np.testing.assert_allclose(cfg.grid(4096, g), S.schedule(50, 4096, g))
  np.testing.assert_allclose(pipe.sampler_config(steps=2, shift=3.0).grid(16, g), [1.0, 0.75, 0.0])
  with pytest.raises(ValueError, match="steps must be >= 1"):
    pipe.sampler_config(steps=0)


def _sharded_edit(model, boxed, params, mesh_shape, noise, branches, grid):
  """The final tokens of a guided edit (three branches, one batched forward) with the decoder's params laid out
  by their logical annotations on `mesh_shape` (None: one device), and one kernel's spec."""
  def run(p):
    out = S.OvisImageSampler(model, p).sample(noise, branches, flow.image_text_guidance(6.0, 1.5), grid,
                                              batch_branches=True)
    return np.asarray(out.final), p["visual_generator"]["double_blocks_0"]["attn"]["img_q_proj"]["kernel"]
  if mesh_shape is None:
    return run(jax.tree.map(jnp.asarray, params))
  mesh = sharding.make_mesh(mesh_shape)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    shards = sharding.logical_shardings(boxed["visual_generator"], mesh)
    return run(dict(params, visual_generator=jax.device_put(params["visual_generator"], shards)))


@pytest.mark.slow   # ~70 s on 2 cores (alone): four compiles of a width-128 decoder
def test_sharded_sampling_on_fsdp_and_tensor_meshes_equals_one_device_and_bf16_stays_close():
  """Edit sampling (VAE-condition tokens, text conditions of unequal lengths) on 8 devices as (1, 8, 1) FSDP and
  (1, 2, 4) FSDP x tensor equals one device. Width 128 / 4 heads so that every sharded axis splits over 8."""
  assert jax.device_count() >= 8, "tests/conftest.py gives 8 fake CPU devices"
  cfg = dataclasses.replace(ovis_u1.OvisU1Config.tiny(), generator=yak.YakConfig.tiny(hidden=128, heads=4,
                                                                                     vec_in_dim=128))
  model = ovis_u1.OvisU1(cfg)
  boxed = jax.eval_shape(model.init, jax.random.key(0), *FAMILY.example_inputs(cfg))["params"]
  rng = np.random.default_rng(1)
  # host-drawn values: the release's zero-initialised modulations would hide the blocks
  params = jax.tree.map(lambda x: (rng.standard_normal(x.shape) * (0.5 / np.sqrt(x.shape[0]) if x.ndim > 1 else 0.1)
                                   ).astype(x.dtype), nn.meta.unbox(boxed))
  b, h, w = 2, 4, 6
  noise = jnp.asarray(rng.standard_normal((b, 2 * h, 2 * w, cfg.vae.latent_channels)), jnp.float32)
  txt = [jnp.asarray(rng.standard_normal((b, t, cfg.generator.context_dim)), jnp.float32) for t in (9, 7, 7)]
  cond = jnp.asarray(rng.standard_normal((b, h * w, cfg.generator.in_channels)), jnp.float32)
  branches = [S.Branch(txt[0], cond), S.Branch(txt[1], cond), S.Branch(txt[2])]
  grid = S.schedule(2, h * w, cfg.generator)
  want, _ = _sharded_edit(model, boxed, params, None, noise, branches, grid)
  for mesh_shape in [(1, 8, 1), (1, 2, 4)]:
    got, kernel = _sharded_edit(model, boxed, params, mesh_shape, noise, branches, grid)
    assert kernel.sharding.spec == P("fsdp", "tensor", None), mesh_shape   # the params really are sharded
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=str(mesh_shape))
  # bf16 compute (the 3b config's dtype), fp32 params and sampler state: close to fp32
  bf16 = ovis_u1.OvisU1(dataclasses.replace(cfg, dtype="bfloat16"))
  assert bf16.cfg.generator.dtype == "bfloat16"
  got, _ = _sharded_edit(bf16, boxed, params, None, noise, branches, grid)
  assert got.dtype == np.float32 and np.abs(got - want).max() < 0.05 * np.abs(want).max()


@pytest.mark.slow   # ~60 s: four processes, each compiling its part of the model
def test_convert_sample_edit_chat_scripts(release, tmp_path):
  ckpt = str(tmp_path / "ckpt")
  run("scripts/convert.py", "--src", release, "--dst", ckpt)
  out = tmp_path / "samples"
  run("scripts/sample.py", "--ckpt", ckpt, "--prompt", "a red circle", "--prompt", "a blue square", "--size", "32x48",
      "--steps", "2", "--out", str(out))
  images = [np.asarray(Image.open(out / n)) for n in ("000.png", "001.png", "grid.png")]
  assert [i.shape for i in images] == [(32, 48, 3), (32, 48, 3), (32, 96, 3)]
  assert images[0].std() > 0 and not np.array_equal(images[0], images[1])
  src = tmp_path / "src.png"
  Image.fromarray((np.random.RandomState(0).rand(44, 90, 3) * 255).astype(np.uint8)).save(src)
  edited = tmp_path / "edited.png"
  run("scripts/edit.py", "--ckpt", ckpt, "--image", str(src), "--instruction", "add a hat", "--steps", "2",
      "--out", str(edited))
  assert np.asarray(Image.open(edited)).shape == (64, 96, 3)   # smart_resize(44, 90, factor=32)
  answer = run("scripts/chat.py", "--ckpt", ckpt, "--image", str(src), "--prompt", "what is it?", "--max_new_tokens",
               "3")
  # the fixture model's greedy answer is whitespace (case a's greedy ids), so only the echo is checked
  assert answer.startswith("> what is it?\n")


def test_config_file_names_the_model_constructors(pipe):
  sys.path.insert(0, ROOT)
  from configs import ovis_u1 as config_file
  from unimm_jax.models.ovis_u1 import OvisU1Config
  tiny, big = config_file.get_config("tiny"), config_file.get_config("3b")
  assert getattr(OvisU1Config, tiny.preset)() == pipe.cfg == OvisU1Config.from_dict(tiny.model.to_dict())
  assert getattr(OvisU1Config, big.preset)().generator.hidden == 1536
  assert (big.sampling.steps, big.sampling.guidance, big.sampling.edit_guidance) == (50, 5.0, 6.0)
  with pytest.raises(KeyError, match="unknown variant"):
    config_file.get_config("7b")
