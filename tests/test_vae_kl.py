"""AutoencoderKL (SD / SDXL 4-channel, FLUX 16-channel) against diffusers, fp32, tiny random weights."""

import functools
import json

import diffusers
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from unimm_jax.convert.family import DIFFUSERS_WEIGHTS
import unimm_jax
from unimm_jax import sharding
from unimm_jax.convert import hf
from unimm_jax.convert.errors import ConversionError
from unimm_jax.models import vae_kl

from vae_tiny import autoencoder_kl, convert, nchw, nhwc, picture

ATOL = 1e-4


@functools.partial(jax.jit, static_argnums=(0, 3))
def _apply(cfg, params, x, method="__call__"):
  return vae_kl.AutoencoderKL(cfg).apply({"params": params}, x, method=method)


@pytest.mark.parametrize("layout", [
    dict(),                                                                      # SD / SDXL: 4 ch, quant convs
    dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,   # FLUX: 16 ch, shifted
         scaling_factor=0.3611, shift_factor=0.1159),
], ids=["sd_4ch", "flux_16ch"])
def test_encode_mean_logvar_and_decode_match_diffusers(layout):
  ref = autoencoder_kl(**layout)
  cfg, params = convert(ref, "vae_kl")
  x = np.random.default_rng(0).uniform(-1, 1, (2, 24, 16, 3)).astype(np.float32)
  with torch.no_grad():
    post = ref.encode(nchw(x)).latent_dist
    dec = ref.decode(post.mean).sample
  ours = _apply(cfg, params, x, "encode")
  np.testing.assert_allclose(ours.mean, nhwc(post.mean), atol=ATOL, rtol=0)
  np.testing.assert_allclose(ours.logvar, nhwc(post.logvar), atol=ATOL, rtol=0)
  np.testing.assert_allclose(_apply(cfg, params, nhwc(post.mean), "decode"), nhwc(dec), atol=ATOL, rtol=0)


def test_round_trip_of_a_drawn_picture_matches_torch_round_trip():
  ref = autoencoder_kl()
  cfg, params = convert(ref, "vae_kl")
  x = picture(32, 48)
  with torch.no_grad():
    want = nhwc(ref(nchw(x)).sample)                 # decode(posterior mode)
  got = _apply(cfg, params, x)
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_posterior_sample_uses_mean_plus_std_noise():
  ref = autoencoder_kl()
  cfg, params = convert(ref, "vae_kl")
  post = _apply(cfg, params, picture(16, 16), "encode")
  z = post.sample(jax.random.key(3))
  eps = jax.random.normal(jax.random.key(3), post.mean.shape)
  np.testing.assert_allclose(z, post.mean + jnp.exp(0.5 * post.logvar) * eps, atol=1e-6)
  assert not np.allclose(z, post.mean)


@pytest.mark.slow  # ~15-30 s: four tile shapes, each a compiled encoder / decoder
def test_tiled_encode_and_decode_match_diffusers_tiling():
  ref = autoencoder_kl(sample_size=16)          # 16 px tiles (8 latent), 25% overlap
  ref.enable_tiling()
  cfg, params = convert(ref, "vae_kl")
  x = picture(40, 56)
  with torch.no_grad():
    moments = ref._tiled_encode(nchw(x))
    z = torch.chunk(moments, 2, dim=1)[0]
    dec = ref.tiled_decode(z).sample
  ours = _apply(cfg, params, x, "tiled_encode")
  np.testing.assert_allclose(ours.mean, nhwc(z), atol=ATOL, rtol=0)
  np.testing.assert_allclose(_apply(cfg, params, nhwc(z), "tiled_decode"), nhwc(dec), atol=ATOL, rtol=0)


@pytest.mark.slow
def test_tiled_output_stays_close_to_untiled_on_stationary_input():
  # Tiles see less context and their own GroupNorm / attention statistics, so tiling approximates.
  # Stated tolerance: relative L2 error < 0.1 for 128-px tiles (25% overlap) on a 256-px input whose
  # statistics do not change across the image (measured: decode 0.056, encode 0.043).
  ref = autoencoder_kl(sample_size=128)
  cfg, params = convert(ref, "vae_kl")
  z = jax.random.normal(jax.random.key(0), (1, 128, 128, 4))
  x = jax.random.uniform(jax.random.key(1), (1, 256, 256, 3), minval=-1, maxval=1)
  rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a))
  full, tiled = _apply(cfg, params, z, "decode"), _apply(cfg, params, z, "tiled_decode")
  assert full.shape == tiled.shape == (1, 256, 256, 3)
  assert rel(full, tiled) < 0.1
  assert rel(_apply(cfg, params, x, "encode").mean, _apply(cfg, params, x, "tiled_encode").mean) < 0.1


def test_latent_scaling_matches_flux_and_sdxl_pipelines():
  z = jax.random.normal(jax.random.key(0), (1, 2, 2, 16))
  flux = vae_kl.AutoencoderKL(vae_kl.preset("flux"))
  scaled = flux.apply({}, z, method="normalize")
  np.testing.assert_allclose(scaled, (z - 0.1159) * 0.3611, atol=1e-6)
  np.testing.assert_allclose(flux.apply({}, scaled, method="denormalize"), z, atol=1e-5)
  sdxl = vae_kl.AutoencoderKL(vae_kl.preset("sdxl"))
  np.testing.assert_allclose(sdxl.apply({}, z[..., :4], method="normalize"), z[..., :4] * 0.13025, atol=1e-6)


def test_diffusers_folder_loads_directly_and_after_conversion(tmp_path):
  ref = autoencoder_kl()
  ref.save_pretrained(tmp_path / "hf")
  x = picture(16, 16)
  with torch.no_grad():
    want = nhwc(ref(nchw(x)).sample)
  direct = unimm_jax.load(str(tmp_path / "hf"))
  assert direct.family == "vae_kl" and direct.config.norm_num_groups == 4
  np.testing.assert_allclose(direct.module.apply({"params": direct.params}, x), want, atol=ATOL, rtol=0)
  hf.convert_to_orbax(str(tmp_path / "hf"), str(tmp_path / "ours"))
  loaded = unimm_jax.load(str(tmp_path / "ours"))
  np.testing.assert_allclose(loaded.module.apply({"params": loaded.params}, x), want, atol=ATOL, rtol=0)


def test_legacy_attention_names_load_and_export_reloads_in_diffusers(tmp_path):
  from safetensors.torch import load_file, save_file
  ref = autoencoder_kl()
  ref.save_pretrained(tmp_path / "hf")
  weights = tmp_path / "hf" / DIFFUSERS_WEIGHTS
  legacy = {k.replace("to_q.", "query.").replace("to_k.", "key.").replace("to_v.", "value.")
             .replace("to_out.0.", "proj_attn."): v for k, v in load_file(weights).items()}
  assert any(".proj_attn." in k for k in legacy)
  save_file(legacy, weights)                    # a pre-0.14 diffusers checkpoint
  x = picture(16, 16)
  with torch.no_grad():
    want = nhwc(ref(nchw(x)).sample)
  hf.convert_to_orbax(str(tmp_path / "hf"), str(tmp_path / "ours"))
  loaded = unimm_jax.load(str(tmp_path / "ours"))
  np.testing.assert_allclose(loaded.module.apply({"params": loaded.params}, x), want, atol=ATOL, rtol=0)
  hf.export_to_hf(str(tmp_path / "ours"), str(tmp_path / "back"))   # written under the current names
  back = diffusers.AutoencoderKL.from_pretrained(tmp_path / "back")
  for k, v in ref.state_dict().items():
    torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0)


def test_unsupported_block_type_and_unmapped_key_are_named(tmp_path):
  with pytest.raises(NotImplementedError, match="AttnDownEncoderBlock2D"):
    vae_kl.config_from_diffusers({"down_block_types": ["AttnDownEncoderBlock2D"]})
  ref = autoencoder_kl()
  ref.save_pretrained(tmp_path / "hf")
  cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
  cfg["layers_per_block"] = 2                   # the weights have one resnet per block
  (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ConversionError, match=r"not filled: \['decoder/up_blocks_0/resnets_2"):
    unimm_jax.load(str(tmp_path / "hf"))


def test_bad_input_shape_is_rejected():
  cfg = vae_kl.preset("tiny")
  with pytest.raises(ValueError, match=r"image \(1, 15, 16, 3\)"):
    jax.eval_shape(vae_kl.AutoencoderKL(cfg).init, jax.random.key(0), jnp.zeros((1, 15, 16, 3)))


def test_params_carry_vocabulary_axes_and_bf16_compute_runs():
  cfg = vae_kl.preset("tiny", dtype="bfloat16")
  boxed = jax.eval_shape(vae_kl.AutoencoderKL(cfg).init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]:
    assert isinstance(leaf, nn.Partitioned), f"{jax.tree_util.keystr(path)} has no logical axes"
    sharding.check_logical_names(leaf.names, jax.tree_util.keystr(path))
    assert any(n is not None for n in leaf.names), jax.tree_util.keystr(path)
  ref = autoencoder_kl()
  _, params = convert(ref, "vae_kl")
  x = picture(16, 16)
  out16 = _apply(cfg, params, x)
  with torch.no_grad():
    want = nhwc(ref(nchw(x)).sample)
  assert out16.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(out16 - want))) < 0.1   # bf16 activations, fp32 statistics


@pytest.mark.slow  # ~15-25 s: compiles init and apply for 8 devices
def test_params_and_activations_shard_by_logical_rules_on_8_devices():
  # RGB's 3 channels cannot split over a mesh axis of 2, so this mesh keeps tensor = 1 and the toy
  # model takes 4-channel images; conv kernels shard [. . conv_in conv_out] -> [. . fsdp tensor].
  cfg = vae_kl.preset("tiny", in_channels=4, out_channels=4)
  model = vae_kl.AutoencoderKL(cfg)
  mesh = jax.make_mesh((4, 2, 1), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
  x = jnp.zeros((8, 16, 16, 4))
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    abstract = jax.eval_shape(model.init, jax.random.key(0), x)
    variables = jax.jit(model.init, out_shardings=sharding.logical_shardings(abstract, mesh))(jax.random.key(0), x)
    params = nn.meta.unbox(variables["params"])
    out = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, x)
  P = jax.sharding.PartitionSpec
  assert params["decoder"]["conv_in"]["kernel"].sharding.spec == P(None, None, "fsdp", "tensor")
  assert params["encoder"]["mid_block"]["attentions_0"]["attn"]["q_proj"]["kernel"].sharding.spec == \
      P("fsdp", "tensor", None)
  assert out.sharding.spec[0] == ("data", "fsdp")
