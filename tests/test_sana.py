"""SANA transformer and text-to-image sampling against diffusers, fp32, tiny random weights through our converter."""

import functools
import json

import diffusers
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import unimm_jax
from unimm_jax import sharding
from unimm_jax.convert import engine, hf
from unimm_jax.convert.errors import ConversionError
from unimm_jax.models import dc_ae, sana
from unimm_jax.sampling import sana as sana_sampling
from unimm_jax.sampling import schedulers

from vae_tiny import autoencoder_dc, convert, nchw, nhwc, randomize

ATOL = 1e-4
SANA_TINY = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                 num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=12,
                 sample_size=8)
LAYOUTS = {
    "sana_1_0": dict(),
    # SANA 1.5: q/k RMSNorm over all heads in both attentions; plus the affine pre-FFN norm and q/k/v biases
    "sana_1_5_options": dict(qk_norm="rms_norm_across_heads", norm_elementwise_affine=True, attention_bias=True),
    "sincos_patch2": dict(interpolation_scale=1.0, patch_size=2),   # the 2K / 4K position table, 2x2 patches
    "guidance_embeds": dict(guidance_embeds=True),                  # SANA-Sprint's guidance embedding
}


def transformer(**kw) -> diffusers.SanaTransformer2DModel:
  torch.manual_seed(0)
  return randomize(diffusers.SanaTransformer2DModel(**{**SANA_TINY, **kw}))


def inputs(guidance: bool, seed: int = 0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, 8, 12, 4)).astype(np.float32)
  caption = rng.standard_normal((2, 5, 12)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int64)         # padded captions
  t = np.array([999.0, 437.0], np.float32)
  g = np.array([4.5, 3.0], np.float32) if guidance else None
  return x, caption, mask, t, g


@functools.partial(jax.jit, static_argnums=0)
def _apply(cfg, params, x, caption, t, mask, g):
  return sana.SanaTransformer(cfg).apply({"params": params}, x, caption, t, mask, g)


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_transformer_matches_diffusers(layout):
  ref = transformer(**layout)
  cfg, params = convert(ref, "sana")
  x, caption, mask, t, g = inputs(layout.get("guidance_embeds", False))
  with torch.no_grad():
    want = ref(nchw(x), torch.from_numpy(caption), torch.from_numpy(t), encoder_attention_mask=torch.from_numpy(mask),
               guidance=None if g is None else torch.from_numpy(g)).sample
  np.testing.assert_allclose(_apply(cfg, params, x, caption, t, mask, g), nhwc(want), atol=ATOL, rtol=0)


def test_each_block_matches_diffusers_block():
  ref = transformer(**LAYOUTS["sana_1_5_options"])
  cfg, params = convert(ref, "sana")
  x, caption, mask, t, _ = inputs(False)
  with torch.no_grad():
    t6, _ = ref.time_embed(torch.from_numpy(t), batch_size=2, hidden_dtype=torch.float32)
    cap = ref.caption_norm(ref.caption_projection(torch.from_numpy(caption)))
  bias = (1 - torch.from_numpy(mask).float())[:, None] * -10000.0
  for i, block in enumerate(ref.transformer_blocks):
    h = torch.randn(2, 8 * 12, 16, generator=torch.Generator().manual_seed(i))
    with torch.no_grad():
      want = block(h, None, cap, bias, t6, 8, 12)
    got, _ = sana.SanaBlock(cfg).apply({"params": params[f"layers_{i}"]}, h.numpy().reshape(2, 8, 12, 16), None,
                                       t6.numpy(), cap.numpy(), mask)
    np.testing.assert_allclose(np.asarray(got).reshape(2, 96, 16), want.numpy(), atol=ATOL, rtol=0)


def test_scan_layout_equals_loop_layout():
  ref = transformer()
  cfg, params = convert(ref, "sana")
  x, caption, mask, t, _ = inputs(False)
  loop = _apply(cfg, params, x, caption, t, mask, None)
  scan_cfg = sana.SanaConfig(**{**cfg.to_dict(), "scan_layers": True})
  from unimm_jax import checkpoint
  scanned = _apply(scan_cfg, checkpoint.stack_layers(params, cfg.num_layers), x, caption, t, mask, None)
  np.testing.assert_allclose(scanned, loop, atol=1e-6, rtol=0)


def _pipeline_and_ours(guidance_scale: float, steps: int = 5):
  tr, vae = transformer(), autoencoder_dc()
  sched = diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
  pipe = diffusers.SanaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=tr, scheduler=sched)
  rng = np.random.default_rng(0)
  latents = rng.standard_normal((2, 4, 8, 12)).astype(np.float32)
  pos, neg = rng.standard_normal((2, 2, 5, 12)).astype(np.float32)
  pos_mask, neg_mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]), np.array([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
  ref_steps = []

  def record(pipe, i, t, kw):
    ref_steps.append(nhwc(kw["latents"]))
    return {}

  out = pipe(negative_prompt=None, prompt_embeds=torch.from_numpy(pos), prompt_attention_mask=torch.from_numpy(pos_mask),
             negative_prompt_embeds=torch.from_numpy(neg), negative_prompt_attention_mask=torch.from_numpy(neg_mask),
             latents=torch.from_numpy(latents), num_inference_steps=steps, guidance_scale=guidance_scale, height=32,
             width=32, use_resolution_binning=False, output_type="pt", callback_on_step_end=record)
  (tcfg, tparams), (acfg, aparams) = convert(tr, "sana"), convert(vae, "dc_ae")
  scheduler = schedulers.from_config({**dict(sched.config), "_class_name": "DPMSolverMultistepScheduler"}, steps)
  our_steps = []
  final, images = sana_sampling.text_to_image(
      sana.SanaTransformer(tcfg), tparams, dc_ae.AutoencoderDC(acfg), aparams, scheduler, nhwc(torch.from_numpy(latents)),
      pos, pos_mask, negative_embeds=neg[:, :2], negative_mask=neg_mask[:, :2], guidance_scale=guidance_scale,
      on_step=lambda i, x: our_steps.append(np.asarray(x)))
  return ref_steps, nhwc(out.images), our_steps, final, images


def test_text_to_image_matches_sana_pipeline_every_step_and_decoded_image():
  # CFG 4.5 batched [cond; uncond]; the negative captions are given 2 tokens only (ours pads them: the pipeline
  # got the same captions padded to 5 with mask 0), DPM-Solver++ 2M, 5 steps, then DC-AE decode.
  ref_steps, ref_image, our_steps, final, images = _pipeline_and_ours(4.5)
  assert len(our_steps) == len(ref_steps) == 5
  for i, (ours, want) in enumerate(zip(our_steps, ref_steps)):
    np.testing.assert_allclose(ours, want, atol=ATOL, rtol=0, err_msg=f"step {i}")
  np.testing.assert_allclose(final, ref_steps[-1], atol=ATOL, rtol=0)
  np.testing.assert_allclose((np.asarray(images) + 1) / 2, ref_image, atol=ATOL, rtol=0)


@pytest.mark.slow   # ~10 s: a second pipeline run
def test_guidance_scale_one_runs_the_conditional_branch_alone_like_the_pipeline():
  ref_steps, ref_image, our_steps, _, images = _pipeline_and_ours(1.0, steps=3)
  np.testing.assert_allclose(our_steps[-1], ref_steps[-1], atol=ATOL, rtol=0)
  np.testing.assert_allclose((np.asarray(images) + 1) / 2, ref_image, atol=ATOL, rtol=0)


@pytest.mark.slow   # ~60 s on 2 shared cores: two compiles of the tiny step
def test_a_second_sampling_call_reuses_the_compiled_step():
  """Equal schedulers (rebuilt per call, as a pipeline does per image) and an equal model reuse one jitted step; a
  different guidance scale is another step. Without the cache every image traced and compiled its step again."""
  from unimm_jax.sampling import diffusion
  cfg = sana.SanaConfig.tiny()
  model = sana.SanaTransformer(cfg)
  x, caption = jnp.ones((1, 4, 4, cfg.in_channels)), jnp.ones((1, 3, cfg.caption_channels))
  params = model.init(jax.random.key(0), x, caption, jnp.zeros((1,)))["params"]
  from unimm_jax.sampling.openuni import SCHEDULER   # SANA 512px's scheduler_config.json
  config = {"_class_name": "DPMSolverMultistepScheduler", **SCHEDULER}

  def run(guidance):
    return sana_sampling.sample_latents(model, params, schedulers.from_config(config, 2), x, caption,
                                        guidance_scale=guidance, negative_embeds=caption)

  before = diffusion._step.cache_info()
  first = run(4.5)
  np.testing.assert_array_equal(run(4.5), first)
  run(2.0)
  after = diffusion._step.cache_info()
  assert (after.hits - before.hits, after.misses - before.misses) == (1, 2)


def test_bad_latents_and_image_sizes_are_named():
  cfg = sana.SanaConfig.tiny(patch_size=2)
  model = sana.SanaTransformer(cfg)
  caption = jnp.zeros((1, 3, cfg.caption_channels))
  with pytest.raises(ValueError, match=r"latents \(1, 8, 8, 3\) must be \[b h w 4\]"):
    sana_sampling.sample_latents(model, {}, None, jnp.zeros((1, 8, 8, 3)), caption)
  with pytest.raises(ValueError, match=r"latent size \(8, 7\) is not a multiple of the patch size 2"):
    sana_sampling.sample_latents(model, {}, None, jnp.zeros((1, 8, 7, 4)), caption)
  with pytest.raises(ValueError, match=r"latents \(1, 8, 8, 3\) must be \[b H W 4\]"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)), caption, jnp.zeros((1,)))
  with pytest.raises(ValueError, match=r"caption \(1, 3, 5\) must be \[1 l 12\]"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 4)), caption[..., :5], jnp.zeros((1,)))
  with pytest.raises(ValueError, match=r"image size 512x496 is not a multiple of 64 pixels"):
    sana_sampling.latent_shape(cfg, 32, 1, 512, 496)
  assert sana_sampling.latent_shape(sana.SanaConfig.sana_1600m_512(), 32, 2, 512, 768) == (2, 16, 24, 32)
  with pytest.raises(ValueError, match="needs negative_embeds"):
    sana_sampling.sample_latents(model, {}, None, jnp.zeros((1, 8, 8, 4)), caption, guidance_scale=4.5)
  with pytest.raises(ValueError, match="qk_norm 'layer_norm' is not one of"):
    sana.SanaConfig.tiny(qk_norm="layer_norm")
  with pytest.raises(NotImplementedError, match="dropout 0.1"):
    sana.config_from_diffusers({**SANA_TINY, "dropout": 0.1})
  with pytest.raises(NotImplementedError, match=r"config fields \['cross_attention_type'\] are not supported"):
    sana.config_from_diffusers({**SANA_TINY, "cross_attention_type": "flash", "_diffusers_version": "0.42"})


@pytest.mark.parametrize("name,kw", [
    ("sana_600m_512", dict(num_attention_heads=36, attention_head_dim=32, num_layers=28, num_cross_attention_heads=16,
                           cross_attention_head_dim=72, cross_attention_dim=1152, sample_size=16)),
    ("sana_1600m_512", dict(num_layers=20, sample_size=16)),
    ("sana1_5_1600m_1024", dict(num_layers=20, sample_size=32, qk_norm="rms_norm_across_heads")),
])
def test_release_sizes_build_the_same_parameters_as_diffusers(name, kw):
  with torch.device("meta"):
    ref = diffusers.SanaTransformer2DModel(**kw)
  cfg = getattr(sana.SanaConfig, name)()
  assert cfg == sana.config_from_diffusers(dict(ref.config))
  fam = unimm_jax.registry.family("sana")
  from unimm_jax.convert.family import abstract_params
  ours = {k: v.shape for k, v in engine.flatten(abstract_params(fam, cfg)).items()}
  assert sum(int(np.prod(s)) for s in ours.values()) == sum(p.numel() for p in ref.parameters())
  assert len(ours) == len(ref.state_dict())


def test_diffusers_directory_loads_converts_and_exports_back(tmp_path):
  ref = transformer(**LAYOUTS["sana_1_5_options"])
  ref.save_pretrained(tmp_path / "hf", max_shard_size="20KB")          # sharded: an index + several files
  assert (tmp_path / "hf" / "diffusion_pytorch_model.safetensors.index.json").exists()
  x, caption, mask, t, _ = inputs(False)
  with torch.no_grad():
    want = nhwc(ref(nchw(x), torch.from_numpy(caption), torch.from_numpy(t),
                    encoder_attention_mask=torch.from_numpy(mask)).sample)
  direct = unimm_jax.load(str(tmp_path / "hf"))
  assert direct.family == "sana" and direct.config.qk_norm == "rms_norm_across_heads"
  np.testing.assert_allclose(direct.module.apply({"params": direct.params}, x, caption, t, mask), want, atol=ATOL,
                             rtol=0)
  hf.convert_to_orbax(str(tmp_path / "hf"), str(tmp_path / "ours"))
  hf.export_to_hf(str(tmp_path / "ours"), str(tmp_path / "back"))
  back = diffusers.SanaTransformer2DModel.from_pretrained(tmp_path / "back")
  for k, v in ref.state_dict().items():
    torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0)


def test_wrong_shape_and_missing_key_are_named(tmp_path):
  ref = transformer()
  ref.save_pretrained(tmp_path / "hf")
  path = tmp_path / "hf" / "config.json"
  cfg = json.loads(path.read_text())
  (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "mlp_ratio": 3.0}))
  with pytest.raises(ConversionError, match=r"'transformer_blocks\.0\.ff\.conv_inverted\.weight' -> "
                                            r"'layers_0/ff/conv_inverted/kernel': pointwise gave \(16, 80\), "
                                            r"model expects \(16, 96\)"):
    unimm_jax.load(str(tmp_path / "hf"))
  path.write_text(json.dumps({**cfg, "num_layers": 3}))
  with pytest.raises(ConversionError, match=r"not filled: \['layers_2/"):
    unimm_jax.load(str(tmp_path / "hf"))


def test_params_carry_vocabulary_axes():
  cfg = sana.SanaConfig.tiny(qk_norm="rms_norm_across_heads", norm_elementwise_affine=True)
  fam = unimm_jax.registry.family("sana")
  boxed = jax.eval_shape(sana.SanaTransformer(cfg).init, jax.random.key(0), *fam.example_inputs(cfg))
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]:
    assert isinstance(leaf, nn.Partitioned), f"{jax.tree_util.keystr(path)} has no logical axes"
    sharding.check_logical_names(leaf.names, jax.tree_util.keystr(path))
    if len(leaf.value.shape) > 1:
      assert any(n is not None for n in leaf.names), jax.tree_util.keystr(path)


def test_bf16_compute_stays_close_to_fp32():
  ref = transformer(**LAYOUTS["sana_1_5_options"])
  cfg, params = convert(ref, "sana")
  x, caption, mask, t, _ = inputs(False)
  full = _apply(cfg, params, x, caption, t, mask, None)
  half = _apply(sana.SanaConfig(**{**cfg.to_dict(), "dtype": "bfloat16"}), params, x, caption, t, mask, None)
  assert half.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(half - full))) < 0.05 * float(jnp.max(jnp.abs(full)))
