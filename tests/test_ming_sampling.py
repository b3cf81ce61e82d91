"""Ming-Lite-Uni sampling against the golden fixtures (tests/fixtures/ming_lite_uni/README.md): case b (the three
T2I SANA runs, every step of the 16x16 one, the decode), case c's sampling_* arrays (the edit-conditioned runs)
and case d (greedy chat), through sampling/ming.py on the fixture directory converted by our converter. The
reference's noise is torch's, so the runs start from the stored init_latents."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from einops import rearrange

from unimm_jax.convert import hf
from unimm_jax.convert import ming as ming_convert
from unimm_jax.data.qwen_vl import QwenVLImageProcessor
from unimm_jax.models.dc_ae import AutoencoderDC
from unimm_jax.models import ming, qwen_vl
from unimm_jax.models.sana import SanaTransformer
from unimm_jax.sampling import ming as ming_sampling
from unimm_jax.sampling import schedulers

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "ming_lite_uni")
TOL = dict(rtol=1e-4, atol=1e-4)
SANA_TOL = dict(rtol=0, atol=2e-4)
with open(os.path.join(FIXTURES, "fixture_config.json")) as f:
  CASES = json.load(f)["cases"]


def load(case: str) -> dict:
  with np.load(os.path.join(FIXTURES, f"{case}.npz")) as z:
    return {k: z[k] for k in z.files}


def nhwc(x):
  return jnp.asarray(rearrange(np.asarray(x), "b c h w -> b h w c"))


def nchw(x):
  return rearrange(np.asarray(x), "b h w c -> b c h w")


@pytest.fixture(scope="module")
def pipe():
  import transformers
  cfg, params = ming_convert.convert_release(FIXTURES)
  module = ming.Ming(cfg)
  tokenizer = ming_convert.with_ming_tokens(transformers.AutoTokenizer.from_pretrained(
      os.path.join(FIXTURES, "qwen2_5_llm")))
  _, dit_cfg, dit_params = hf.convert_hf(os.path.join(FIXTURES, "transformer"))
  _, vae_cfg, vae_params = hf.convert_hf(os.path.join(FIXTURES, "vae"))
  pixels = CASES["processor_min_pixels"]
  tree = lambda t: jax.tree.map(jnp.asarray, t)  # noqa: E731
  return ming_sampling.MingPipeline(
      module, tree(params), tokenizer, SanaTransformer(dit_cfg), tree(dit_params), AutoencoderDC(vae_cfg),
      tree(vae_params), schedulers.read_config(os.path.join(FIXTURES, "scheduler")),
      processor=QwenVLImageProcessor(min_pixels=pixels, max_pixels=pixels))


def check_runs(pipe, ref: dict, conditions: dict, prefix: str = ""):
  """Every stored array of the three per-scale runs (keys `prefix + name`)."""
  r = {k[len(prefix):]: v for k, v in ref.items() if k.startswith(prefix)}
  cfg = pipe.sampler_config(steps=CASES["steps"], guidance=CASES["cfg"])
  sched = pipe.scheduler(cfg)
  np.testing.assert_allclose(sched.sigmas, r["sigmas"], atol=1e-7)
  np.testing.assert_allclose(sched.timesteps, r["timesteps"], atol=1e-4)
  scale = pipe.dit.cfg.timestep_scale
  np.testing.assert_allclose(np.repeat(sched.timesteps[:, None] * scale, 2, axis=1), r["model_timestep"], atol=1e-4)
  zeros = jnp.zeros((1, 1, pipe.cfg.text.embed))
  uncond = pipe._caption(pipe.params, zeros)
  np.testing.assert_allclose(uncond[0, 0], r["mlp_out_uncond_row"], **TOL)
  init = nhwc(r["init_latents"])
  vae_decode = jax.jit(lambda p, x: pipe.vae.apply(
      {"params": p}, pipe.vae.apply({}, x, method=AutoencoderDC.denormalize), method=AutoencoderDC.decode))
  dit_fn = jax.jit(lambda p, x, c, t: pipe.dit.apply({"params": p}, x, c, jnp.full((x.shape[0],), t)))
  dit = lambda x, c, t: dit_fn(pipe.dit_params, x, c, jnp.float32(t))  # noqa: E731
  for s in pipe.cfg.scales:
    k = f"{s}x{s}"
    caption = conditions[k]["caption"]
    np.testing.assert_allclose(caption[0], r[f"mlp_out_cond_{k}"], **TOL)
    steps = []
    final = pipe.sample(caption, init, cfg, on_step=lambda i, x: steps.append(nchw(x)))
    np.testing.assert_allclose(nchw(final), r[f"final_latents_{k}"], **SANA_TOL)
    t0 = float(sched.timesteps[0] * scale)
    np.testing.assert_allclose(nchw(dit(init, caption, t0)), r[f"pred_cond_step0_{k}"], **SANA_TOL)
    if s == pipe.cfg.scales[-1]:
      np.testing.assert_allclose(np.stack(steps), r[f"latents_after_step_{k}"], **SANA_TOL)
      # each step's raw predictions from the stored latents of the step before
      inputs = [init] + [nhwc(x) for x in r[f"latents_after_step_{k}"][:-1]]
      for i, x in enumerate(inputs):
        t = float(sched.timesteps[i] * scale)
        u, c = nchw(dit(x, jnp.broadcast_to(uncond, caption.shape), t)), nchw(dit(x, caption, t))
        np.testing.assert_allclose(u, r[f"pred_uncond_{k}"][i], **SANA_TOL)
        np.testing.assert_allclose(c, r[f"pred_cond_{k}"][i], **SANA_TOL)
        np.testing.assert_allclose(u + cfg.guidance * (c - u), r[f"pred_guided_{k}"][i], **SANA_TOL)
      if "sana_caption_norm_step0_16x16" in r:
        both = jnp.concatenate([jnp.broadcast_to(uncond, caption.shape), caption])
        _, inter = pipe.dit.apply({"params": pipe.dit_params}, jnp.concatenate([init] * 2), both,
                                  jnp.full((2,), t0), capture_intermediates=True, mutable=["intermediates"])
        inter = inter["intermediates"]
        t6, emb = inter["time_embed"]["__call__"][0]
        np.testing.assert_allclose(t6[:1], r["sana_time_mod_step0"], **SANA_TOL)
        np.testing.assert_allclose(emb[:1], r["sana_time_emb_step0"], **SANA_TOL)
        np.testing.assert_allclose(inter["caption_norm"]["__call__"][0], r[f"sana_caption_norm_step0_{k}"], **TOL)
        block0 = inter["layers_0"]["__call__"][0][0]
        np.testing.assert_allclose(rearrange(np.asarray(block0), "b h w d -> b (h w) d"),
                                   r[f"sana_block0_out_step0_{k}"], **SANA_TOL)
    # decode from the stored final latents (this run's own final latents are checked above)
    decoded = nchw(vae_decode(pipe.vae_params, nhwc(r[f"final_latents_{k}"])))
    np.testing.assert_array_equal(decoded.shape, r[f"decoded_shape_{k}"])
    np.testing.assert_array_equal(decoded.shape, r[f"output_shape_{k}"])
    np.testing.assert_allclose(decoded[..., :32, :32], r[f"decoded_crop32_{k}"], **SANA_TOL)
    np.testing.assert_allclose(decoded.mean(axis=(2, 3)), r[f"decoded_mean_{k}"], **SANA_TOL)
    image = pipe.decode(nhwc(r[f"final_latents_{k}"])).astype(np.int16)
    np.testing.assert_allclose(image.mean(axis=(0, 1)), r[f"image_uint8_mean_{k}"], atol=0.1)
    if f"decoded_sub8_{k}" in r:
      np.testing.assert_allclose(decoded[..., ::8, ::8], r[f"decoded_sub8_{k}"], **SANA_TOL)
      assert np.abs(image[::4, ::4] - r[f"image_uint8_sub4_{k}"]).max() <= 1
      assert np.abs(image[:64, :64] - r[f"image_uint8_crop64_{k}"]).max() <= 1


def test_t2i_sampling(pipe):
  cond = pipe.conditions(CASES["t2i_prompt"])
  check_runs(pipe, load("case_b_t2i_sampling"), cond)


@pytest.mark.slow   # ~22 s; the edit conditioning itself is checked by the default tests/test_ming.py
def test_edit_sampling(pipe):
  c = load("case_c_edit")
  cond = pipe.conditions(CASES["edit_prompt"], c["image_uint8"])
  check_runs(pipe, c, cond, prefix="sampling_")


def test_understanding(pipe):
  d = load("case_d_understanding")
  image = load("case_c_edit")["image_uint8"]
  p = pipe.prompt(CASES["und_prompt"], image, generate=False)
  np.testing.assert_array_equal(p["ids"][0], d["prompt_input_ids"])
  np.testing.assert_array_equal(np.asarray(p["positions"])[0].T, d["position_ids_step0"][:, 0])
  embeds = pipe._embed(pipe.params, jnp.asarray(p["ids"], jnp.int32), p["vision"])
  slots = np.flatnonzero(p["ids"][0] == pipe.cfg.image_token_id)
  np.testing.assert_allclose(embeds[0, slots], d["image_embeds_l2"], **TOL)
  out = pipe.decoder.apply({"params": pipe.params["llm"]}, inputs_embeds=embeds, positions=p["positions"])
  np.testing.assert_allclose(out.last_hidden_state[0], d["llm_last_hidden_step0"], **TOL)
  np.testing.assert_allclose(out.logits[0, -1], d["logits_last_per_step"][0], **TOL)
  tokens = pipe.generate_tokens(image, CASES["und_prompt"], max_new_tokens=CASES["und_max_new_tokens"])
  np.testing.assert_array_equal(tokens, d["greedy_token_ids"])
  # every step's logits: the whole sequence again, with the reference's positions of prompt + answer
  ids = np.concatenate([p["ids"][0], tokens[:-1]])[None]
  positions = qwen_vl.rope_index(ids, pipe.cfg, [tuple(int(v) for v in d["image_grid_thw"][0])])[0]
  np.testing.assert_array_equal(positions[0].T, d["position_ids_last_step"][:, 0])
  x = pipe.module.apply({"params": pipe.params}, jnp.asarray(ids), p["vision"], with_queries=False,
                        method=ming.Ming.embed)
  logits = pipe.decoder.apply({"params": pipe.params["llm"]}, inputs_embeds=x, positions=jnp.asarray(positions)).logits
  n = p["ids"].shape[1]
  np.testing.assert_allclose(logits[0, n - 1:], d["logits_last_per_step"], **TOL)
  assert pipe.tokenizer.decode(tokens, skip_special_tokens=True) == str(d["output_str"])
