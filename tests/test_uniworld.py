"""UniWorld-V1 against the golden fixtures of the original PyTorch code (tests/fixtures/uniworld/README.md):
the checkpoint converted with our converter, then every stored array of the conditioning cases (a) and (b)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import unimm_jax

from unimm_jax.convert import uniworld as convert_uniworld
from unimm_jax.convert.errors import ConversionError
from unimm_jax.data.qwen_vl import QwenVLImageProcessor
from unimm_jax.models import flux, qwen_vl, uniworld, vae_kl
from unimm_jax.sampling import flux as flux_sampling
from unimm_jax.sampling import uniworld as sampling

from uniworld_tiny import FIXTURES, release_dirs, task_head_file, tiny_flux_dir

TOL = dict(rtol=1e-4, atol=1e-5)


def fixture(name):
  return dict(np.load(os.path.join(FIXTURES, name)))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  dirs, c = release_dirs(str(tmp_path_factory.mktemp("release")))
  cfg, params, vae_cfg, vae_params, report = convert_uniworld.convert(dirs["uniworld"], siglip=dirs["siglip"],
                                                                      flux=dirs["flux"])
  tok = transformers.AutoTokenizer.from_pretrained(os.path.join(FIXTURES, "qwen_processor"))
  with open(os.path.join(FIXTURES, "qwen_processor", "chat_template.json")) as f:
    template = json.load(f)["chat_template"]
  return dict(dirs=dirs, c=c, cfg=cfg, params=jax.tree.map(jnp.asarray, params), vae_cfg=vae_cfg,
              vae_params=vae_params, report=report, tok=tok, template=template)


def apply(conv, method, *args, **kw):
  model = uniworld.UniWorld(conv["cfg"])
  return model.apply({"params": conv["params"]}, *args, method=method, **kw)


def test_conversion_reports_sources_and_config(converted):
  cfg = converted["cfg"]
  assert cfg.image_end_token_id == 384 and cfg.context_dim == 32 and cfg.siglip.embed == 32
  assert set(converted["report"]) == {"uniworld", "siglip", "vae"}
  assert all(p.endswith("model.safetensors") for v in converted["report"].values() for p in v)


def test_case_a_text_to_image_conditioning(converted):
  a, cfg, tok = fixture("case_a_t2i_conditioning.npz"), converted["cfg"], converted["tok"]
  prompt = converted["c"]["cases"]["prompt"]
  assert sampling.chat_text(tok, prompt, 0, converted["template"]) == converted["c"]["cases"]["texts"]["a_fed"]
  ids = np.asarray([sampling.prompt_ids(tok, cfg, prompt, [], converted["template"])])
  np.testing.assert_array_equal(ids, a["input_ids"])
  np.testing.assert_array_equal(np.ones_like(ids), a["attention_mask"])
  kw = qwen_vl.prepare(ids, cfg.vlm)
  np.testing.assert_array_equal(np.moveaxis(np.asarray(kw["positions"]), -1, 0), a["lm_position_ids"])
  model = uniworld.UniWorld(cfg)
  variables = {"params": converted["params"]}
  emb = model.apply(variables, ids, method=lambda m, i: m.vlm.embed(i))
  np.testing.assert_allclose(emb, a["lm_inputs_embeds"], **TOL)
  out = model.apply(variables, ids, positions=kw["positions"], method=lambda m, i, positions: m.vlm(i, positions=positions))
  np.testing.assert_allclose(out.last_hidden_state, a["lm_last_hidden"], **TOL)
  np.testing.assert_allclose(out.logits[:, -1:], a["lm_logits_last"], **TOL)
  proj = model.apply(variables, jnp.asarray(a["lm_last_hidden"]), method=lambda m, h: m.denoise_projector(h))
  np.testing.assert_allclose(proj, a["denoise_projector_out"], **TOL)
  embeds = model.apply(variables, ids, positions=kw["positions"], method=uniworld.UniWorld.denoise_embeds)
  np.testing.assert_allclose(embeds, a["denoise_projector_out"], **TOL)
  np.testing.assert_allclose(embeds, a["vlm_embeds"], **TOL)
  joined = sampling.join_t5(a["t5_embeds"], embeds)
  np.testing.assert_allclose(joined, a["prompt_embeds"], **TOL)


def test_case_b_edit_conditioning_with_siglip_insertion(converted):
  b, cfg, tok, c = fixture("case_b_edit_conditioning.npz"), converted["cfg"], converted["tok"], converted["c"]
  proc = QwenVLImageProcessor.from_hf(c["qwen_image_processor"])
  patches, grid = proc(b["ref_image_uint8"][0])
  np.testing.assert_allclose(patches, b["pixel_values"], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal([grid], b["image_grid_thw"])
  tokens = grid[0] * grid[1] * grid[2] // cfg.vlm.vision.merge ** 2
  ids = np.asarray([sampling.prompt_ids(tok, cfg, c["cases"]["edit_prompt"], [tokens], converted["template"])])
  np.testing.assert_array_equal(ids, b["input_ids"])
  np.testing.assert_array_equal(np.ones_like(ids), b["attention_mask"])
  kw = qwen_vl.prepare(ids, cfg.vlm, pixel_values=patches, image_grid_thw=[grid])
  np.testing.assert_array_equal(np.moveaxis(np.asarray(kw["positions"]), -1, 0), b["lm_position_ids"])
  np.testing.assert_array_equal(kw["deltas"][:, None], b["rope_deltas"])
  model, variables = uniworld.UniWorld(cfg), {"params": converted["params"]}
  vision = kw["vision"]
  visual = model.apply(variables, method=lambda m: m.vlm.visual(vision.patches, vision.positions, vision.frame_ids,
                                                                vision.window_ids).pooler_output)
  visual = np.asarray(visual).reshape(-1, visual.shape[-1])[np.asarray(vision.image_tokens)]
  np.testing.assert_allclose(visual, b["visual_out"], **TOL)
  emb = model.apply(variables, ids, vision, method=lambda m, i, v: m.vlm.embed(i, v))
  np.testing.assert_allclose(emb, b["lm_inputs_embeds"], **TOL)
  hidden = model.apply(variables, ids, vision, positions=kw["positions"], method=uniworld.UniWorld.hidden)
  np.testing.assert_allclose(hidden, b["lm_last_hidden"], **TOL)
  proj = model.apply(variables, hidden, method=lambda m, h: m.denoise_projector(h))
  np.testing.assert_allclose(proj, b["denoise_projector_out"], **TOL)
  size = tuple(c["siglip_processor"]["size"][k] for k in ("height", "width"))
  sig = sampling.siglip_pixels(b["ref_image_uint8"][0], size)[None]
  np.testing.assert_allclose(sig, b["siglip_pixel_values"].transpose(0, 2, 3, 1), atol=1e-6)
  last = model.apply(variables, jnp.asarray(sig), method=lambda m, x: m.siglip(x).last_hidden_state)
  np.testing.assert_allclose(last, b["siglip_last_hidden"], **TOL)
  feats = model.apply(variables, jnp.asarray(sig), method=uniworld.UniWorld.siglip_features)
  np.testing.assert_allclose(feats, b["siglip_projector_out"], **TOL)
  insertion = uniworld.siglip_insertion(ids, cfg.image_end_token_id, 1, cfg.siglip_tokens)
  embeds = model.apply(variables, ids, vision, positions=kw["positions"], siglip_pixels=jnp.asarray(sig),
                       insertion=insertion, method=uniworld.UniWorld.denoise_embeds)
  np.testing.assert_allclose(embeds, b["vlm_embeds"], **TOL)
  np.testing.assert_allclose(sampling.join_t5(b["t5_embeds"], embeds), b["prompt_embeds"], **TOL)


def test_siglip_insertion_left_pads_and_orders_images_row_major():
  end = 9
  ids = np.asarray([[1, end, 2, end], [3, 4, 5, 6]])
  ins = uniworld.siglip_insertion(ids, end, 2, 2)
  # rows of [8 text tokens; 2 images x 2 tokens; zero row 12]
  np.testing.assert_array_equal(ins.index, [[0, 8, 9, 1, 2, 10, 11, 3], [12, 12, 12, 12, 4, 5, 6, 7]])
  np.testing.assert_array_equal(ins.mask, [[1] * 8, [0] * 4 + [1] * 4])
  with pytest.raises(ValueError, match="1 reference image.*2 <\\|vision_end"):
    uniworld.siglip_insertion(ids, end, 1, 2)


def test_conversion_names_missing_sources(tmp_path):
  dirs, _ = release_dirs(str(tmp_path), with_weights=False)
  os.symlink(os.path.join(FIXTURES, "uniworld.safetensors"), os.path.join(dirs["uniworld"], "model.safetensors"))
  dst = str(tmp_path / "out")
  with pytest.raises(ConversionError, match="--flux"):
    convert_uniworld.convert_cli("v1", dirs["uniworld"], dst, {"flux": None, "siglip": dirs["siglip"]}, False)
  with pytest.raises(ConversionError, match="task_head"):
    convert_uniworld.convert(dirs["uniworld"], siglip=dirs["siglip"], flux=dirs["flux"],
                             task_head=os.path.join(FIXTURES, "uniworld.safetensors"))
  assert not os.path.exists(dst)


@pytest.mark.parametrize("case, cond", [("case_c_t2i_sampling.npz", "case_a_t2i_conditioning.npz"),
                                        pytest.param("case_d_edit_sampling.npz", "case_b_edit_conditioning.npz",
                                                     marks=pytest.mark.slow)])
def test_flux_sampling_every_step_and_decode(converted, case, cond):
  """Cases c / d: the schedule, each step's transformer call on the stored input (velocity) and Euler step, then
  the whole chain from the stored noise to the final latents, the VAE input, the decoded and the uint8 image."""
  s, a, cfg = fixture(case), fixture(cond), converted["cfg"]
  steps = len(s["timesteps"])
  sampler = flux_sampling.FluxSampler(flux.FluxTransformer2DModel(cfg.denoiser), converted["params"]["denoiser"],
                                      converted["c"]["flux_scheduler_config"], vae_kl.AutoencoderKL(converted["vae_cfg"]),
                                      jax.tree.map(jnp.asarray, converted["vae_params"]))
  noise = jnp.asarray(s["init_latents_unpacked"].transpose(0, 2, 3, 1))
  packed = flux.pack_latents(noise)
  np.testing.assert_allclose(packed, s["init_packed_latents"], atol=0)
  h, w = noise.shape[1:3]
  np.testing.assert_array_equal(flux.image_ids(h, w), s["img_ids"])
  np.testing.assert_array_equal(flux.text_ids(a["prompt_embeds"].shape[1]), s["txt_ids"])
  scheduler = sampler.scheduler(steps, None, packed.shape[1])
  np.testing.assert_allclose(scheduler.sigmas, s["sigmas"], rtol=1e-6)
  np.testing.assert_allclose(scheduler.timesteps, s["timesteps"], rtol=1e-6)
  np.testing.assert_allclose(s["transformer_timestep"][:, 0], s["timesteps"] / 1000, rtol=1e-6)
  np.testing.assert_allclose(s["step_sigma"], s["sigmas"][:-1], rtol=1e-6)
  np.testing.assert_allclose(s["step_timestep"], s["timesteps"], rtol=1e-6)
  np.testing.assert_allclose(s["transformer_guidance"], 3.5)
  model = flux.FluxTransformer2DModel(cfg.denoiser)
  context, pooled = jnp.asarray(a["prompt_embeds"]), jnp.asarray(a["pooled_embeds"])
  state = scheduler.init(packed)
  for i in range(steps):
    np.testing.assert_allclose(s["transformer_in"][i], s["init_packed_latents"] if i == 0 else s["step_prev_sample"][i - 1])
    v = model.apply({"params": sampler.params}, jnp.asarray(s["transformer_in"][i]), context, pooled,
                    jnp.asarray(s["transformer_timestep"][i]), jnp.asarray(s["img_ids"]), jnp.asarray(s["txt_ids"]),
                    jnp.asarray(s["transformer_guidance"][i]))
    np.testing.assert_allclose(v, s["velocity"][i], **TOL)
    x, state = scheduler.step(state, jnp.asarray(s["velocity"][i]), jnp.int32(i), jnp.asarray(s["transformer_in"][i]))
    np.testing.assert_allclose(x, s["step_prev_sample"][i], **TOL)
  out = sampler.generate(context, pooled, flux_sampling.FluxSamplerConfig(steps=steps, guidance=3.5), latents=noise)
  np.testing.assert_allclose(flux.pack_latents(jnp.asarray(out.latents)), s["final_packed_latents"], atol=1e-4)
  vae = converted["vae_cfg"]
  np.testing.assert_allclose(out.latents / vae.scaling_factor + vae.shift_factor,
                             s["vae_decoder_in"].transpose(0, 2, 3, 1), atol=1e-4)
  decoded = vae_kl.AutoencoderKL(vae).apply({"params": sampler.vae_params}, jnp.asarray(s["vae_decoder_in"].transpose(0, 2, 3, 1)),
                                            method="decode")
  np.testing.assert_allclose(decoded, s["decoded"].transpose(0, 2, 3, 1), atol=1e-4)
  np.testing.assert_allclose(out.images, s["image_float"], atol=1e-4)
  assert np.abs(np.round(255 * out.images).astype(int) - s["image_uint8"]).max() <= 1


@pytest.mark.slow   # orbax save + restore of three checkpoints
def test_convert_cli_writes_a_loadable_directory(tmp_path, converted):
  dirs, _ = release_dirs(str(tmp_path))
  dst = str(tmp_path / "out")
  report = convert_uniworld.convert_cli("v1", dirs["uniworld"], dst, {"flux": dirs["flux"], "siglip": dirs["siglip"],
                                                                       "task_head": None}, False)
  assert report["sources"]["t5"] == [] and report["sources"]["clip"] == []   # no text encoders in this FLUX dir
  loaded = unimm_jax.load(dst)
  assert loaded.family == "uniworld" and loaded.config == converted["cfg"]
  np.testing.assert_array_equal(loaded.params["denoise_projector"]["layers_0"]["kernel"],
                                converted["params"]["denoise_projector"]["layers_0"]["kernel"])
  assert unimm_jax.load(os.path.join(dst, "vae")).family == "vae_kl"
  for name in ("scheduler_config.json", "tokenizer.json", "chat_template.json", "preprocessor_config.json"):
    assert os.path.isfile(os.path.join(dst, name)), name
  with pytest.raises(ConversionError):   # an existing destination is left as it is without --overwrite
    convert_uniworld.convert_cli("v1", dirs["uniworld"], dst, {"flux": dirs["flux"], "siglip": dirs["siglip"]}, False)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipeline")
  dirs, _ = release_dirs(str(root))
  tiny_flux_dir(dirs["flux"])
  head = task_head_file(str(root / "task_head_final.pt"))
  dst = str(root / "uniworld_tiny")
  report = convert_uniworld.convert_cli("v1", dirs["uniworld"], dst, {
      "flux": dirs["flux"], "siglip": dirs["siglip"], "task_head": str(root / "task_head_final.pt")}, False)
  return dst, report, head


@pytest.mark.slow   # converts and saves five checkpoints, compiles the whole pipeline
def test_pipeline_conditioning_generate_edit_answer(pipeline_dir, converted):
  dst, report, _ = pipeline_dir
  assert report["task_head"] and report["sources"]["t5"] and report["sources"]["clip"]
  pipe = unimm_jax.load_pipeline(dst)
  b, c = fixture("case_b_edit_conditioning.npz"), converted["c"]
  ref = b["ref_image_uint8"][0]
  context, pooled = pipe.conditioning(c["cases"]["edit_prompt"], [ref])
  # the VLM part is the fixture's; the T5 part the stand-in text encoder's over t5_len padded tokens
  assert context.shape == (1, pipe.t5_len + b["vlm_embeds"].shape[1], 32) and pooled.shape == (1, 24)
  np.testing.assert_allclose(context[:, pipe.t5_len:], b["vlm_embeds"], **TOL)
  cfg = pipe.sampler_config(steps=2, guidance=None, shift=None, image_guidance=None, strength=None)  # as the CLIs
  assert cfg.steps == 2 and cfg.guidance == 3.5
  with pytest.raises(ValueError, match="--strength"):
    pipe.sampler_config(strength=0.5)
  pipe.anchor_pixels = 64 * 64
  edited = pipe.edit([ref], [c["cases"]["edit_prompt"]], cfg, seed=1)[0]
  assert edited.shape == (64, 64, 3) and edited.dtype == np.uint8
  image = pipe.generate(["a dog"], (32, 48), cfg)[0]
  assert image.shape == (32, 48, 3)
  answer = pipe.answer([ref], ["what is this?"], max_new_tokens=3)
  assert len(answer) == 1 and isinstance(answer[0], str)
  with pytest.raises(ValueError, match="negative"):
    pipe.generate(["a dog"], (32, 32), cfg, negative="blurry")


@pytest.mark.slow   # shares pipeline_dir's conversion
def test_task_head_route_reads_the_last_assistant_token(pipeline_dir, converted):
  """cli.py: task_head(hidden of the last `assistant` token) with logit 1 > logit 0 = generate. The position comes
  from the tokenizer (Qwen2.5's one token 77091; the last piece where a vocabulary splits the word)."""
  import torch
  dst, _, head = pipeline_dir
  pipe = unimm_jax.load_pipeline(dst)
  b, c = fixture("case_b_edit_conditioning.npz"), converted["c"]
  ids = b["input_ids"][0]
  pieces = pipe.tokenizer("assistant", add_special_tokens=False)["input_ids"]
  index = sampling.assistant_index(ids, pipe.tokenizer)
  assert list(ids[index - len(pieces) + 1:index + 1]) == pieces and index == len(ids) - 2   # before the "\n"
  logits = uniworld.UniWorld(pipe.cfg).apply({"params": pipe.params}, jnp.asarray(b["lm_last_hidden"]),
                                             jnp.asarray([index]), method=uniworld.UniWorld.route)
  with torch.no_grad():
    want = head.eval()(torch.from_numpy(b["lm_last_hidden"][:, index])).numpy()
  np.testing.assert_allclose(logits, want, **TOL)
  choice = pipe.route(c["cases"]["edit_prompt"], [b["ref_image_uint8"][0]])
  assert choice == ("generate" if want[0, 0] < want[0, 1] else "answer")
  with pytest.raises(ValueError, match="no `assistant`"):
    sampling.assistant_index(ids[:-3], pipe.tokenizer)


@pytest.mark.slow   # loads the pipeline twice
def test_sampling_as_trained_drops_t5_and_pools_the_empty_prompt(pipeline_dir):
  """The train/infer asymmetry: cli.py samples with [T5(prompt), VLM] and CLIP(prompt) pooled; the yamls trained
  with drop_t5_rate 1.0 (no T5, CLIP("") pooled), which load(t5=False) reproduces."""
  dst, _, _ = pipeline_dir
  joint, trained = sampling.load(dst), sampling.load(dst, t5=False)
  t5, pooled = joint.text_embeds("a dog")
  assert t5.shape == (1, joint.t5_len, 32)
  none, pooled_trained = trained.text_embeds("a dog")
  assert none is None
  np.testing.assert_allclose(pooled_trained, joint.text_embeds("")[1], atol=0)
  assert np.abs(np.asarray(pooled_trained) - np.asarray(pooled)).max() > 1e-3
  context, _ = trained.conditioning("a dog")
  np.testing.assert_allclose(context, joint.conditioning("a dog")[0][:, joint.t5_len:], **TOL)


def test_dynamic_resize_as_anyres_util():
  assert sampling.dynamic_resize(112, 112, 64 * 64) == (64, 64)
  assert sampling.dynamic_resize(1080, 1920) == (32 * 9 * 3, 32 * 16 * 3)   # 16:9, scale round(2.67)
  assert sampling.dynamic_resize(1000, 760) == (32 * 4 * 9, 32 * 3 * 9)    # w/h 0.76 -> 3:4, scale 9
