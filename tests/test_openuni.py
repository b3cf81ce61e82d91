"""OpenUni against the golden fixtures of the original PyTorch code (tests/fixtures/openuni/README.md): the weights are
read by our converter, every stored array of every case is matched at the README's tolerances."""

from __future__ import annotations

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from PIL import Image

from unimm_jax import registry
from unimm_jax.convert import openuni as convert_openuni
from unimm_jax.convert import sources
from unimm_jax.convert.errors import ConversionError
from unimm_jax.convert.safetensors_writer import save_safetensors
from unimm_jax.models import openuni
from unimm_jax.models.internvl import Projector
from unimm_jax.sampling import flow
from unimm_jax.sampling import openuni as ou
from scripts_run import run

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "openuni")
TOL = dict(rtol=1e-4, atol=1e-5)      # hidden states, embeddings, velocities
LATENT = dict(rtol=0, atol=1e-4)      # sampled latents, decoded images


def fixture(name: str) -> dict[str, np.ndarray]:
  with np.load(os.path.join(FIX, name + ".npz")) as z:
    return dict(z)


def nhwc(x) -> jnp.ndarray:
  return jnp.asarray(np.moveaxis(np.asarray(x), -3, -1))


def nchw(x) -> np.ndarray:
  return np.moveaxis(np.asarray(x), -1, -3)


def config_of_fixture(c: dict) -> openuni.OpenUniConfig:
  return openuni.config_from_hf(
      c["internvl_chat_config"], c["connector_config"], c["sana_transformer_config"], c["dcae_config"],
      num_queries=c["num_queries"], vit_input_size=c["model_kwargs"]["vit_input_size"],
      image_token_id=c["tokenizer"]["specials"]["<IMG_CONTEXT>"], image_size=c["cases"]["height"])


@pytest.fixture(scope="module")
def meta() -> dict:
  with open(os.path.join(FIX, "config.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def model(meta):
  cfg = config_of_fixture(meta)
  params, counts = convert_openuni.convert_release(os.path.join(FIX, "openuni.safetensors"), cfg)
  assert counts == {"release": meta["n_tensors"], "lmm": 0, "sana": 0, "vae": 0}
  tok = transformers.AutoTokenizer.from_pretrained(os.path.join(FIX, "tokenizer"))
  return ou.OpenUniPipeline(openuni.OpenUni(cfg), params, tok, FIX)


def condition(pipe, ids, mask, pixels=None):
  return pipe.module.apply({"params": pipe.params}, jnp.asarray(ids), jnp.asarray(mask), pixels,
                           method=openuni.OpenUni.condition)


def check_conditioning(pipe, case, ids, mask, pixels=None):
  llm_mask, positions = openuni.query_layout(jnp.asarray(mask), pipe.cfg.num_queries)
  np.testing.assert_array_equal(np.asarray(llm_mask).astype(bool), case["llm_attention_mask"])
  np.testing.assert_array_equal(np.asarray(positions), case["llm_position_ids"])
  cond = condition(pipe, ids, mask, pixels)
  np.testing.assert_allclose(cond.query_hidden, case["llm_query_hidden"], **TOL)
  np.testing.assert_allclose(cond.connector_out, case["connector_out"], **TOL)
  np.testing.assert_allclose(cond.prompt_embeds, case["prompt_embeds"], **TOL)
  return cond.prompt_embeds


def check_sampling(pipe, case, embeds, steps, guidance, size, init_latents):
  """Every step of SanaPipeline's loop (rows [uncond; cond] as the reference batches them) and the final latents."""
  sampler = ou.OpenUniSamplerConfig(steps=steps, guidance=guidance)
  sched = sampler.scheduler()
  if "dpm_timesteps" in case:
    np.testing.assert_array_equal(sched.timesteps, case["dpm_timesteps"])
    np.testing.assert_allclose(sched.sigmas, case["dpm_sigmas"], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.broadcast_to(sched.timesteps[:, None], (steps, 2)), case["transformer_timestep"])
    np.testing.assert_array_equal(sched.timesteps, case["step_timestep"])
  uncond, cond = embeds[1:], embeds[:1]
  velocity = jax.jit(lambda p, x, c, t: pipe.module.apply({"params": p}, x, c, t, method=openuni.OpenUni.velocity))
  for i in range(steps):
    x = nhwc(case["step_sample"][i])
    if "transformer_in" in case:
      np.testing.assert_allclose(nchw(jnp.concatenate([x, x])), case["transformer_in"][i], **TOL)
    v = velocity(pipe.params, jnp.concatenate([x, x]), jnp.concatenate([uncond, cond]),
                 jnp.full((2,), float(sched.timesteps[i]) * pipe.cfg.transformer.timestep_scale))
    np.testing.assert_allclose(nchw(v), case["transformer_out"][i], **TOL)
    guided = flow.combine([v[1:], v[:1]], flow.text_guidance(guidance))
    np.testing.assert_allclose(nchw(guided), case["guided_velocity"][i], **TOL)
    if "step_x0_pred" in case:
      np.testing.assert_allclose(nchw(x - sched.sigmas[i] * guided), case["step_x0_pred"][i], **TOL)
  seen = []
  final, image = pipe.sample(cond, uncond, size, sampler, latents=nhwc(init_latents),
                             on_step=lambda i, x: seen.append(np.asarray(x)))
  np.testing.assert_allclose(nchw(np.stack(seen)), case["step_prev_sample"], **LATENT)
  np.testing.assert_allclose(nchw(np.stack([nhwc(case["init_latents"] if "init_latents" in case else init_latents)[0]]
                                           + [s[0] for s in seen[:-1]])[:, None]), case["step_sample"], **LATENT)
  np.testing.assert_allclose(nchw(final), case["final_latents"], **LATENT)
  return final, image


def test_case_a_prompt_conditioning(model, meta):
  a = fixture("case_a_prompt_conditioning")
  texts = [ou.t2i_prompt(meta["cases"]["prompt"]), ou.cfg_prompt(meta["cases"]["cfg_prompt"] or "")]
  ids, mask = ou.tokenize(model.tokenizer, texts)
  np.testing.assert_array_equal(ids, a["input_ids"])
  np.testing.assert_array_equal(mask.astype(bool), a["attention_mask"])
  check_conditioning(model, a, ids, mask)


@pytest.mark.slow   # ~30 s: the DC-AE decoder compiles
def test_case_b_sampling_every_step_and_decode(model, meta):
  a, b, c = fixture("case_a_prompt_conditioning"), fixture("case_b_t2i_sampling"), meta["cases"]
  embeds = jnp.asarray(a["prompt_embeds"])
  _, image = check_sampling(model, b, embeds, c["steps"], c["cfg_scale"], (c["height"], c["width"]), b["init_latents"])
  decoded = model.module.apply({"params": model.params}, nhwc(b["final_latents"]), method=openuni.OpenUni.decode)
  np.testing.assert_allclose(nchw(decoded), b["decoded"], **LATENT)
  np.testing.assert_array_equal(ou.to_uint8(nhwc(b["decoded"])), b["image_uint8"])   # the conversion itself
  assert np.abs(image.astype(int) - b["image_uint8"].astype(int)).max() <= 1


@pytest.mark.slow   # ~30 s: InternViT, the LLM and the sampler compile
def test_case_c_edit_conditioning_and_sampling(model, meta):
  e, b, c = fixture("case_c_edit"), fixture("case_b_t2i_sampling"), meta["cases"]
  cfg = model.cfg
  np.testing.assert_array_equal(e["edit_input_image_uint8"], e["src_image_uint8"])   # square: PIL's (w, h) is moot
  pix = ou.vit_pixels(e["edit_input_image_uint8"], cfg.edit_size)
  np.testing.assert_allclose(nchw(pix), e["vit_pixel_values"], **TOL)
  lmm, lp = model.module.lmm_module, model.params["lmm"]
  hidden = lmm.apply({"params": lp}, pix, method=lambda m, x: m.vision_tower(x).last_hidden_state)
  np.testing.assert_allclose(hidden, e["vit_last_hidden_state"], **TOL)
  shuffled = []

  def grab(next_fun, args, kwargs, context):
    if isinstance(context.module, Projector) and context.method_name == "__call__":
      shuffled.append(args[0])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(grab):
    feats = lmm.apply({"params": lp}, pix, method=lambda m, x: m.image_features(x))
  np.testing.assert_allclose(shuffled[0], e["vit_pixel_shuffled"], **TOL)
  np.testing.assert_allclose(feats, e["vit_embeds"], **TOL)
  assert cfg.image_tokens == e["vit_embeds"].shape[1]
  texts = [ou.edit_prompt(c["edit_prompt"], cfg.image_tokens), ou.edit_prompt(c["edit_cfg_prompt"], cfg.image_tokens)]
  ids, mask = ou.tokenize(model.tokenizer, texts)
  np.testing.assert_array_equal(ids, e["input_ids"])
  np.testing.assert_array_equal(mask, e["attention_mask"])
  pix2 = jnp.concatenate([pix, pix])
  embeds_in = model.module.apply({"params": model.params}, jnp.asarray(ids), pix2,
                                 method=openuni.OpenUni.inputs_embeds)
  np.testing.assert_allclose(embeds_in, e["inputs_embeds"], **TOL)
  embeds = check_conditioning(model, e, ids, mask, pix2)
  np.testing.assert_allclose(model.prompt_embeds(texts, np.concatenate([e["edit_input_image_uint8"]] * 2)),
                             e["prompt_embeds"], **TOL)
  check_sampling(model, e, embeds, c["steps"], c["cfg_scale"], (c["height"], c["width"]), b["init_latents"])


@pytest.mark.slow   # ~30 s each: DC-AE encoder, InternViT, LLM and SANA compile
@pytest.mark.parametrize("kind", ["t2i", "i2i"])
def test_case_d_training_loss(model, meta, kind):
  d = fixture("case_d_train_loss")
  g = lambda k: d[f"{kind}_{k}"]   # noqa: E731
  p, apply = model.params, model.module.apply
  if kind == "t2i":   # both batches share the target images (i2i_image_latents = t2i_image_latents)
    np.testing.assert_array_equal(d["i2i_image_latents"], d["t2i_image_latents"])
    target_images = d["t2i_images_uint8"].astype(np.float32) / 127.5 - 1   # 2 * (x / 255) - 1
    latents = apply({"params": p}, jnp.asarray(target_images), method=openuni.OpenUni.encode)
    np.testing.assert_allclose(nchw(latents), g("image_latents"), **TOL)
  np.testing.assert_array_equal(np.floor(g("u") * 1000).astype(np.int64), g("indices"))
  timestep, sigma, noisy, target = openuni.flow_training_inputs(nhwc(g("image_latents")), nhwc(g("noise")),
                                                                jnp.asarray(g("u")))
  np.testing.assert_array_equal(np.asarray(timestep), g("timesteps"))
  np.testing.assert_allclose(sigma, g("sigmas"), rtol=1e-6)
  np.testing.assert_allclose(nchw(noisy), g("noisy"), **TOL)
  np.testing.assert_allclose(nchw(target), g("target"), **TOL)
  ids, mask = g("input_ids"), g("attention_mask")
  pixels = None
  if kind == "i2i":
    pixels = ou.vit_pixels(d["i2i_src_images_uint8"], model.cfg.edit_size)
    feats = model.module.lmm_module.apply({"params": p["lmm"]}, pixels, method=lambda m, x: m.image_features(x))
    np.testing.assert_allclose(feats, g("vit_embeds"), **TOL)
  _, positions = openuni.query_layout(jnp.asarray(mask), model.cfg.num_queries)
  np.testing.assert_array_equal(np.asarray(positions), g("llm_position_ids"))
  embeds = condition(model, ids, mask, pixels).prompt_embeds
  np.testing.assert_allclose(embeds, g("prompt_embeds"), **TOL)
  np.testing.assert_array_equal(np.asarray(timestep), d["t2i_fed_timestep"] if kind == "t2i" else g("timesteps"))
  pred = apply({"params": p}, noisy, embeds, timestep, method=openuni.OpenUni.velocity)
  np.testing.assert_allclose(nchw(pred), g("model_pred"), **TOL)
  np.testing.assert_allclose(openuni.flow_loss(pred, target), g("loss"), rtol=1e-5)
  np.testing.assert_allclose(g("loss"), meta["cases"][f"loss_{kind}"], rtol=1e-6)


def test_aux_schedules():
  s = fixture("aux_schedules")
  sched = ou.OpenUniSamplerConfig(steps=len(s["dpm20_timesteps"])).scheduler()
  np.testing.assert_array_equal(sched.timesteps, s["dpm20_timesteps"])
  np.testing.assert_allclose(sched.sigmas, s["dpm20_sigmas"], rtol=1e-6, atol=1e-7)
  index = jnp.arange(1000)
  timestep, sigma, _, _ = openuni.flow_training_inputs(jnp.zeros((1000, 1)), jnp.zeros((1000, 1)), (index + 0.5) / 1000)
  np.testing.assert_array_equal(np.asarray(timestep), s["train_timesteps"])
  np.testing.assert_allclose(sigma, s["train_sigmas"], rtol=1e-6)


# --- the converter: only trained tensors in the release, the rest from base directories ---

@pytest.fixture(scope="module")
def split_release(tmp_path_factory, meta):
  """The fixture state dict as a pre-training release (queries, connector, projector) plus base directories."""
  root = tmp_path_factory.mktemp("openuni_release")
  src = sources.open_weights(os.path.join(FIX, "openuni.safetensors"))
  tensors = {k: src[k]() for k in src}
  groups = {"lmm.": "lmm", "transformer.": "sana", "vae.": "vae"}
  dirs = {}
  for prefix, name in groups.items():
    d = root / name
    d.mkdir()
    part = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    save_safetensors(str(d / ("model.safetensors" if name == "lmm" else "diffusion_pytorch_model.safetensors")), part)
    dirs[name] = str(d)
  cfgs = {"lmm": meta["internvl_chat_config"], "sana": meta["sana_transformer_config"], "vae": meta["dcae_config"]}
  for name, c in cfgs.items():
    with open(os.path.join(dirs[name], "config.json"), "w") as f:
      json.dump(c, f)
  for n in os.listdir(os.path.join(FIX, "tokenizer")):
    with open(os.path.join(FIX, "tokenizer", n), "rb") as f, open(os.path.join(dirs["lmm"], n), "wb") as g:
      g.write(f.read())
  release = str(root / "release.safetensors")
  trained = {k: v for k, v in tensors.items() if not k.startswith(tuple(groups))}
  save_safetensors(release, trained)
  return release, dirs, len(trained), tensors


def test_release_with_only_trained_tensors_fills_the_rest_from_base_dirs(split_release, model, meta):
  release, dirs, n_trained, tensors = split_release
  cfg = convert_openuni.with_parts(openuni.OpenUniConfig.tiny(), dirs)
  cfg = convert_openuni.with_release_shapes(cfg, sources.open_weights(release).shapes, release)
  assert dataclasses.replace(cfg, vit_input_size=112, image_size=128) == model.cfg   # what the shapes cannot say
  params, counts = convert_openuni.convert_release(release, cfg, dirs)
  n = {p: sum(k.startswith(p) for k in tensors) for p in ("lmm.", "transformer.", "vae.")}
  assert counts == {"release": n_trained, "lmm": n["lmm."], "sana": n["transformer."], "vae": n["vae."]}
  jax.tree.map(np.testing.assert_array_equal, params, jax.tree.map(np.asarray, model.params))


def test_convert_cli_reports_mismatches_and_leaves_the_destination(split_release, tmp_path):
  release, dirs, _, tensors = split_release
  fam = registry.family("openuni")
  assert fam.reference.flag == "openuni" and set(fam.reference.parts) == {"lmm", "sana", "vae"}
  dst = tmp_path / "out"
  dst.mkdir()
  (dst / "keep.txt").write_text("old")
  with pytest.raises(ConversionError, match="destination exists"):
    convert_openuni.convert_cli("tiny", release, str(dst), dirs, overwrite=False)
  bad = str(tmp_path / "bad.safetensors")
  wrong = {k: v for k, v in tensors.items() if k.startswith(("meta_queries", "connector.", "projector.bias"))}
  save_safetensors(bad, {**wrong, "projector.weight": np.zeros((47, 64), np.float32)})
  with pytest.raises(ConversionError, match=r"'projector.weight'.*\(64, 47\).*\(64, 48\)"):
    convert_openuni.convert_cli("tiny", bad, str(dst), dirs, overwrite=True)
  assert os.listdir(dst) == ["keep.txt"] and (dst / "keep.txt").read_text() == "old"
  with pytest.raises(ConversionError, match="pass those directories"):
    convert_openuni.convert_cli("tiny", release, str(tmp_path / "new"), {}, overwrite=False)
  assert not (tmp_path / "new").exists()
  with pytest.raises(ConversionError, match="is not one of"):
    convert_openuni.convert_cli("xl", release, str(tmp_path / "new"), dirs, overwrite=False)


# --- the CLIs on a converted tiny release ---

@pytest.mark.slow   # ~90 s: four processes, each compiling its part of the model
def test_convert_sample_edit_chat_scripts(split_release, tmp_path):
  release, dirs, _, _ = split_release
  ckpt = str(tmp_path / "ckpt")
  report = run("scripts/convert.py", "--openuni", "tiny", "--src", release, "--lmm", dirs["lmm"], "--sana",
               dirs["sana"], "--vae", dirs["vae"], "--dst", ckpt)
  assert '"lmm": ' in report and '"release": ' in report
  out = tmp_path / "samples"
  run("scripts/sample.py", "--ckpt", ckpt, "--prompt", "a red circle", "--prompt", "a blue square", "--size", "64x32",
      "--steps", "2", "--out", str(out))
  images = [np.asarray(Image.open(out / n)) for n in ("000.png", "001.png", "grid.png")]
  assert [i.shape for i in images] == [(64, 32, 3), (64, 32, 3), (64, 64, 3)]
  assert images[0].std() > 0 and not np.array_equal(images[0], images[1])
  src = tmp_path / "src.png"
  Image.fromarray((np.random.RandomState(0).rand(40, 50, 3) * 255).astype(np.uint8)).save(src)
  edited = tmp_path / "edited.png"
  run("scripts/edit.py", "--ckpt", ckpt, "--image", str(src), "--instruction", "make it blue", "--steps", "2",
      "--out", str(edited))
  size = openuni.OpenUniConfig.tiny().image_size   # the tiny variant's default size, as the release's 512
  assert np.asarray(Image.open(edited)).shape == (size, size, 3)
  answer = run("scripts/chat.py", "--ckpt", ckpt, "--image", str(src), "--prompt", "what is it?", "--max_new_tokens",
               "3")
  assert "what is it?" in answer and len(answer.strip().splitlines()) >= 2
