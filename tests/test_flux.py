"""FLUX transformer and text-to-image against diffusers (fp32, tiny random weights through OUR converter),
conversion, bad input, and sampling under FSDP / tensor-parallel meshes (8 fake CPU devices)."""

import dataclasses
import functools
import json
import os
import subprocess
import sys

import diffusers
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import unimm_jax
from flux_tiny import FLUX_DEV_SCHEDULER, FLUX_SCHNELL_SCHEDULER, flux_transformer
from unimm_jax import registry, sharding
from unimm_jax.convert import engine, hf
from unimm_jax.convert.errors import ConversionError
from unimm_jax.convert.family import abstract_params
from unimm_jax.convert.sources import open_weights
from unimm_jax.layers import apply_rope
from unimm_jax.layers.rope import rope_angles_axes
from unimm_jax.models import flux, vae_kl
from unimm_jax.sampling.flux import FluxSampler, FluxSamplerConfig
from vae_tiny import autoencoder_kl, convert

ATOL = 1e-4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FluxPipeline = diffusers.FluxPipeline
P = jax.sharding.PartitionSpec


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, *inputs):
  """Jitted: one compile per config is cheaper than the op-by-op compiles of a first eager apply."""
  return flux.FluxTransformer2DModel(cfg).apply({"params": params}, *inputs)


def _inputs(cfg, b=2, h=6, w=8, t=5, seed=0):
  rng = np.random.default_rng(seed)
  return dict(x=rng.standard_normal((b, h * w // 4, cfg.in_channels)).astype(np.float32),
              context=rng.standard_normal((b, t, cfg.context_dim)).astype(np.float32),
              pooled=rng.standard_normal((b, cfg.pooled_dim)).astype(np.float32),
              timestep=np.array([0.7, 0.25][:b], np.float32), img_ids=flux.image_ids(h, w), txt_ids=flux.text_ids(t),
              guidance=np.array([3.5, 1.5][:b], np.float32) if cfg.guidance_embeds else None)


def _torch_forward(ref, a):
  with torch.no_grad():
    return ref(hidden_states=torch.from_numpy(a["x"]), encoder_hidden_states=torch.from_numpy(a["context"]),
               pooled_projections=torch.from_numpy(a["pooled"]), timestep=torch.from_numpy(a["timestep"]),
               img_ids=torch.from_numpy(a["img_ids"]), txt_ids=torch.from_numpy(a["txt_ids"]),
               guidance=None if a["guidance"] is None else torch.from_numpy(a["guidance"])).sample.numpy()


@pytest.mark.parametrize("guidance", [True, False], ids=["dev_guidance", "schnell"])
def test_transformer_matches_diffusers_fp32(guidance):
  ref = flux_transformer(guidance_embeds=guidance)
  cfg, params = convert(ref, "flux")
  a = _inputs(cfg)
  got = _forward(cfg, params, *a.values())
  np.testing.assert_allclose(got, _torch_forward(ref, a), atol=ATOL, rtol=0)


def test_each_block_and_the_embeddings_match_diffusers():
  ref = flux_transformer()
  cfg, params = convert(ref, "flux")
  rng = np.random.default_rng(1)
  b, n, t, d = 2, 12, 5, cfg.embed
  img, txt = (rng.standard_normal((b, k, d)).astype(np.float32) for k in (n, t))
  temb = rng.standard_normal((b, d)).astype(np.float32)
  ids = np.concatenate([flux.text_ids(t), flux.image_ids(6, 8)])
  rotary = ref.pos_embed(torch.from_numpy(ids))
  angles = rope_angles_axes(jnp.asarray(ids), cfg.axes_dims, cfg.rope_theta)[None]
  block = (d, cfg.heads, cfg.head_dim, cfg.mlp)
  with torch.no_grad():
    want_txt, want_img = ref.transformer_blocks[1](torch.from_numpy(img), torch.from_numpy(txt), torch.from_numpy(temb),
                                                   rotary)
    want_single = ref.single_transformer_blocks[1](torch.from_numpy(img), torch.from_numpy(txt),
                                                   torch.from_numpy(temb), rotary)
    a = _inputs(cfg)
    want_vec = ref.time_text_embed(torch.from_numpy(a["timestep"]) * 1000, torch.from_numpy(a["guidance"]) * 1000,
                                   torch.from_numpy(a["pooled"]))
  apply = lambda module, p, *args: jax.jit(lambda p, *a: module.apply({"params": p}, *a))(p, *args)  # noqa: E731
  (got_img, got_txt), _ = apply(flux.DoubleStreamBlock(*block), params["transformer_blocks_1"], (img, txt), None,
                                temb, angles)
  np.testing.assert_allclose(got_img, want_img.numpy(), atol=ATOL, rtol=0)
  np.testing.assert_allclose(got_txt, want_txt.numpy(), atol=ATOL, rtol=0)
  got_single, _ = apply(flux.SingleStreamBlock(*block), params["single_transformer_blocks_1"],
                        np.concatenate([txt, img], 1), None, temb, angles)
  np.testing.assert_allclose(got_single, torch.cat(want_single, 1).numpy(), atol=ATOL, rtol=0)
  got_vec = apply(flux.TimeTextEmbed(d, cfg.pooled_dim, True), params["time_text_embed"], a["timestep"],
                  a["pooled"], a["guidance"])
  np.testing.assert_allclose(got_vec, want_vec.numpy(), atol=ATOL, rtol=0)


def test_rope_packing_and_ids_match_diffusers():
  ids = np.concatenate([flux.text_ids(3), flux.image_ids(4, 6)])
  cos, sin = diffusers.models.transformers.transformer_flux.FluxPosEmbed(10000, [4, 6, 6])(torch.from_numpy(ids))
  x = np.random.default_rng(0).standard_normal((2, len(ids), 3, 16)).astype(np.float32)
  want = diffusers.models.embeddings.apply_rotary_emb(torch.from_numpy(x), (cos, sin), sequence_dim=1).numpy()
  got = apply_rope(jnp.asarray(x), rope_angles_axes(jnp.asarray(ids), (4, 6, 6), 10000.0)[None], interleaved=True)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(flux.image_ids(4, 6), FluxPipeline._prepare_latent_image_ids(1, 2, 3, "cpu",
                                                                                              torch.float32).numpy())
  z = np.random.default_rng(1).standard_normal((2, 4, 6, 3)).astype(np.float32)
  packed = FluxPipeline._pack_latents(torch.from_numpy(z).permute(0, 3, 1, 2), 2, 3, 4, 6).numpy()
  np.testing.assert_array_equal(flux.pack_latents(z), packed)
  unpacked = FluxPipeline._unpack_latents(torch.from_numpy(packed), 4 * 8, 6 * 8, 8).permute(0, 2, 3, 1).numpy()
  np.testing.assert_array_equal(flux.unpack_latents(jnp.asarray(packed), 4, 6), unpacked)


def test_release_configs_have_flux1_sizes_and_read_back_from_diffusers():
  dev = flux.FluxConfig.dev()
  with torch.device("meta"):
    ref = diffusers.FluxTransformer2DModel(guidance_embeds=True)
  n_ref = sum(p.numel() for p in ref.parameters())
  n_ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params(registry.family("flux"), dev)))
  assert n_ours == n_ref == dev.num_params() and 11.8e9 < n_ours < 12.0e9
  assert flux.config_from_diffusers(dict(ref.config)) == dev
  assert flux.config_from_diffusers(flux.diffusers_config(flux.FluxConfig.schnell())) == flux.FluxConfig.schnell()
  with pytest.raises(ValueError, match=r"\['use_magic'\]"):
    flux.config_from_diffusers({**flux.diffusers_config(dev), "use_magic": True})
  with pytest.raises(ValueError, match="axes_dims"):
    flux.FluxConfig(head_dim=64)


def test_diffusers_directory_loads_converts_exports_bit_exact_and_sharded_index_reads(tmp_path):
  ref = flux_transformer()
  ref.save_pretrained(tmp_path / "hf", max_shard_size="100KB")     # sharded: an index + several files
  assert (tmp_path / "hf" / "diffusion_pytorch_model.safetensors.index.json").exists()
  loaded = unimm_jax.load(str(tmp_path / "hf"))
  assert loaded.family == "flux" and loaded.tokenizer is None
  a = _inputs(loaded.config)
  want = _torch_forward(ref, a)
  np.testing.assert_allclose(_forward(loaded.config, loaded.params, *a.values()), want, atol=ATOL, rtol=0)
  r = subprocess.run([sys.executable, "scripts/convert.py", "--src", str(tmp_path / "hf"), "--dst",
                      str(tmp_path / "ours")], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  assert json.loads(r.stdout)["tensors"] == len(ref.state_dict())
  hf.export_to_hf(str(tmp_path / "ours"), str(tmp_path / "back"))
  exported = open_weights(str(tmp_path / "back"))
  assert set(exported) == set(ref.state_dict())
  for k, v in ref.state_dict().items():       # torch -> ours -> torch is bit-exact
    np.testing.assert_array_equal(exported[k](), v.numpy())
  back = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path / "back").eval()
  np.testing.assert_array_equal(_torch_forward(back, a), want)


def test_wrong_shape_and_missing_key_are_named():
  ref = flux_transformer()
  fam = registry.family("flux")
  cfg = fam.config_from_hf(dict(ref.config))
  abstract = engine.flatten(abstract_params(fam, cfg))
  state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  state["transformer_blocks.0.attn.add_k_proj.weight"] = state["transformer_blocks.0.attn.add_k_proj.weight"][:32]
  del state["single_transformer_blocks.1.proj_mlp.bias"]
  with pytest.raises(ConversionError) as e:
    engine.convert({k: (lambda v=v: v) for k, v in state.items()}, fam.rules(cfg), abstract)
  key = "'transformer_blocks.0.attn.add_k_proj.weight' -> 'transformer_blocks_0/attn/txt_k_proj/kernel'"
  assert key in str(e.value)
  assert "single_transformer_blocks_1/proj_mlp/bias" in str(e.value)


def _sampler(guidance=True, scheduler=FLUX_DEV_SCHEDULER, **kw):
  ref = flux_transformer(guidance_embeds=guidance, num_layers=1, num_single_layers=1)
  vae = autoencoder_kl(latent_channels=4, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611,
                       shift_factor=0.1159)
  cfg, params = convert(ref, "flux")
  vcfg, vparams = convert(vae, "vae_kl")
  pipe = FluxPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_config(scheduler), vae=vae,
                      text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=ref)
  ours = FluxSampler(flux.FluxTransformer2DModel(cfg), params, scheduler, vae_kl.AutoencoderKL(vcfg), vparams)
  return pipe, ours


def _pipeline_case(pipe, ours, steps, true_cfg=1.0, size=(32, 48)):
  rng = np.random.default_rng(0)
  b = 2
  z = rng.standard_normal((b, size[0] // 2, size[1] // 2, 4)).astype(np.float32)   # the tiny VAE is 2x
  emb = {k: rng.standard_normal(s).astype(np.float32) for k, s in (
      ("prompt_embeds", (b, 7, 32)), ("pooled_prompt_embeds", (b, 24)), ("negative_prompt_embeds", (b, 7, 32)),
      ("negative_pooled_prompt_embeds", (b, 24)))}
  if true_cfg == 1.0:
    emb = {k: v for k, v in emb.items() if not k.startswith("negative")}
  packed = FluxPipeline._pack_latents(torch.from_numpy(z).permute(0, 3, 1, 2), b, 4, *z.shape[1:3])
  kw = dict(**{k: torch.from_numpy(v) for k, v in emb.items()}, latents=packed, height=size[0], width=size[1],
            num_inference_steps=steps, guidance_scale=3.5, true_cfg_scale=true_cfg)
  with torch.no_grad():
    want_latents = pipe(**kw, output_type="latent").images.numpy()
    want_images = pipe(**kw, output_type="np").images
  got = ours.generate(**{k: jnp.asarray(v) for k, v in emb.items()},
                      cfg=FluxSamplerConfig(steps=steps, true_cfg=true_cfg), latents=jnp.asarray(z), progress=True)
  np.testing.assert_allclose(flux.pack_latents(got.latents), want_latents, atol=ATOL, rtol=0)
  np.testing.assert_allclose(got.images, want_images, atol=ATOL, rtol=0)


def test_text_to_image_final_latents_and_image_match_flux_pipeline(capsys):
  pipe, ours = _sampler()
  _pipeline_case(pipe, ours, steps=3)
  assert "denoise" in capsys.readouterr().err      # the progress bar


@pytest.mark.slow  # ~15 s: another compile of the step and the decoder
def test_schnell_with_true_cfg_matches_flux_pipeline():
  pipe, ours = _sampler(guidance=False, scheduler=FLUX_SCHNELL_SCHEDULER)
  _pipeline_case(pipe, ours, steps=2, true_cfg=4.0, size=(16, 32))


def test_bad_latents_sizes_and_guidance_are_named():
  ref = flux_transformer(num_layers=0, num_single_layers=0)
  cfg, params = convert(ref, "flux")
  ours = FluxSampler(flux.FluxTransformer2DModel(cfg), params, FLUX_DEV_SCHEDULER)
  emb, pooled = jnp.zeros((1, 3, 32)), jnp.zeros((1, 24))
  run = lambda **kw: ours.generate(emb, pooled, FluxSamplerConfig(steps=1), **kw)  # noqa: E731
  with pytest.raises(ValueError, match=r"latents \(1, 4, 4, 16\) must be \[b h w 4\]"):
    run(latents=jnp.zeros((1, 4, 4, 16)))
  with pytest.raises(ValueError, match=r"latent size \(4, 3\) must be even"):
    run(latents=jnp.zeros((1, 4, 3, 4)))
  with pytest.raises(ValueError, match=r"image size \(64, 72\) must be a multiple of 16"):
    run(size=(64, 72))
  with pytest.raises(ValueError, match="true_cfg 3.0 needs negative_prompt_embeds"):
    ours.generate(emb, pooled, FluxSamplerConfig(steps=1, true_cfg=3.0), size=(16, 16))
  model = flux.FluxTransformer2DModel(cfg)
  a = _inputs(cfg)
  with pytest.raises(ValueError, match=r"latents \(2, 12, 8\) must be \[b n 16\]"):
    model.apply({"params": params}, a["x"][..., :8], *list(a.values())[1:])
  with pytest.raises(ValueError, match="guidance is required"):
    model.apply({"params": params}, *list(a.values())[:-1], None)
  with pytest.raises(ValueError, match=r"pack_latents: latents \(1, 3, 4, 4\)"):
    flux.pack_latents(jnp.zeros((1, 3, 4, 4)))


def test_every_param_is_annotated_and_fsdp_replicates_under_2_percent():
  cfg = flux.FluxConfig.dev(depth=1, single_depth=1)
  boxed = jax.eval_shape(flux.FluxTransformer2DModel(cfg).init, jax.random.key(0), *flux.example_inputs(cfg))["params"]
  for path, leaf in jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
    assert isinstance(leaf, nn.Partitioned), f"{jax.tree_util.keystr(path)} has no logical names"
    sharding.check_logical_names(leaf.names, jax.tree_util.keystr(path))
    assert leaf.value.ndim < 2 or any(n is not None for n in leaf.names), jax.tree_util.keystr(path)
  mesh = sharding.make_mesh((1, 8, 1))
  assert sharding.replicated_fraction(nn.meta.unbox(boxed), sharding.logical_shardings(boxed, mesh)) <= 0.02


def _random_params(abstract, seed=1):
  """Host-drawn random values for every leaf (the released init zeroes the modulations, which would hide the
  blocks; and jitted jax.random over ~100 leaves compiles for longer than the test runs)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: (rng.standard_normal(x.shape) * (0.5 / np.sqrt(x.shape[0]) if x.ndim > 1 else 0.1)
                                 ).astype(x.dtype), abstract)


def _sample(cfg, mesh_shape, steps, b=8, hw=(4, 4), t=4):
  """Latents after `steps` steps, params born sharded from the logical annotations on `mesh_shape` (None: one
  device), and a few params' specs."""
  model = flux.FluxTransformer2DModel(cfg)
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.standard_normal((b, *hw, cfg.in_channels // 4)), jnp.float32)
  emb = jnp.asarray(rng.standard_normal((b, t, cfg.context_dim)), jnp.float32)
  pooled = jnp.asarray(rng.standard_normal((b, cfg.pooled_dim)), jnp.float32)
  boxed = jax.eval_shape(model.init, jax.random.key(0), *flux.example_inputs(cfg))["params"]
  abstract = nn.meta.unbox(boxed)

  def run(params):
    out = FluxSampler(model, params, FLUX_DEV_SCHEDULER).generate(emb, pooled, FluxSamplerConfig(steps=steps),
                                                                  latents=z)
    return out.latents, params

  if mesh_shape is None:
    return run(jax.tree.map(jnp.asarray, _random_params(abstract)))
  mesh = sharding.make_mesh(mesh_shape)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    # each param goes straight to its shards, laid out by its logical annotations
    return run(jax.device_put(_random_params(abstract), sharding.logical_shardings(boxed, mesh)))


def _check_meshes(cfg, meshes, steps):
  want, _ = _sample(cfg, None, steps)
  for mesh_shape in meshes:
    got, params = _sample(cfg, mesh_shape, steps)
    # names of size-1 mesh axes stay in the spec
    assert params["transformer_blocks_0"]["attn"]["img_q_proj"]["kernel"].sharding.spec == P("fsdp", "tensor", None)
    assert params["single_transformer_blocks_0"]["proj_out"]["kernel"].sharding.spec == P("tensor", "fsdp")
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=str(mesh_shape))


def test_a_second_generate_call_reuses_the_compiled_step():
  from unimm_jax.sampling import diffusion
  before = diffusion._step._cache_size()
  cfg = flux.FluxConfig.tiny(depth=1, single_depth=1)
  first, _ = _sample(cfg, None, steps=2)
  again, _ = _sample(cfg, None, steps=2)    # a new sampler and scheduler over the same shapes: no recompile
  assert diffusion._step._cache_size() == before + 1
  np.testing.assert_array_equal(again, first)


def test_sampling_on_an_fsdp_x_tensor_parallel_mesh_equals_one_device_tiny():
  _check_meshes(flux.FluxConfig.tiny(depth=1, single_depth=1), [(1, 2, 4)], steps=1)


@pytest.mark.slow  # ~3-6 min on 2 cores: FLUX.1 width (3072, 24 x 128), 1 double + 1 single block, 4 x 2 steps
def test_sampling_under_fsdp_and_tensor_parallel_meshes_equals_one_device_full_width():
  _check_meshes(flux.FluxConfig.dev(depth=1, single_depth=1), [(1, 8, 1), (1, 4, 2), (1, 2, 4)], steps=2)


def test_bf16_compute_stays_close_and_returns_bf16():
  ref = flux_transformer()
  cfg, params = convert(ref, "flux")
  a = _inputs(cfg)
  out = _forward(dataclasses.replace(cfg, dtype="bfloat16"), params, *a.values())
  assert out.dtype == jnp.bfloat16
  want = _torch_forward(ref, a)
  assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - want))) < 0.05 * np.abs(want).max()


def _script(name):
  import importlib.util
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_param_memory_script_reports_bytes_per_device_from_the_shardings(capsys):
  rows = _script("param_memory").main(["--size", "dev", "--mesh", "1,8,1", "--mesh", "1,2,4", "--dtypes", "bfloat16"])
  assert [r["mesh"] for r in rows] == [(1, 8, 1), (1, 2, 4)]
  for r in rows:   # FLUX.1-dev: 22.2 GiB in bf16; only norm scales and a few biases stay whole on every device
    assert 22.1 < r["total_gib"] < 22.2
    assert r["total_gib"] / 8 <= r["per_device_gib"] <= r["total_gib"] / 8 * 1.01, r
  assert "GiB per device" in capsys.readouterr().out
