"""DC-AE (SANA's f32c32 autoencoder) against diffusers' AutoencoderDC, fp32, tiny random weights."""

import dataclasses
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
from unimm_jax.convert.family import abstract_params
from unimm_jax.models import dc_ae
from unimm_jax.models.codec import Deterministic

from vae_tiny import autoencoder_dc, convert, nchw, nhwc, picture

ATOL = 1e-4
LAYOUTS = {
    "sana": dict(),   # stride-2 conv down, nearest-upsample conv up (the f32c32-sana releases)
    "shuffle": dict(downsample_block_type="pixel_unshuffle", upsample_block_type="pixel_shuffle",
                    decoder_act_fns=("relu", "silu", "silu")),
}


@functools.partial(jax.jit, static_argnums=(0, 3))
def _apply(cfg, params, x, method):
  return dc_ae.AutoencoderDC(cfg).apply({"params": params}, x, method=method)


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_encode_and_decode_match_diffusers(layout):
  ref = autoencoder_dc(**layout)
  cfg, params = convert(ref, "dc_ae")
  # 48 x 32: every attention is linear (h w > head_dim); 8 x 8: the 2 x 2 latent level takes the quadratic branch
  for x in (picture(48, 32), picture(8, 8))[:2 if layout is LAYOUTS["sana"] else 1]:
    with torch.no_grad():
      z = ref.encode(nchw(x)).latent
      dec = ref.decode(z).sample
    np.testing.assert_allclose(_apply(cfg, params, x, "encode").mean, nhwc(z), atol=ATOL, rtol=0)
    np.testing.assert_allclose(_apply(cfg, params, nhwc(z), "decode"), nhwc(dec), atol=ATOL, rtol=0)


def _tiled():
  ref = autoencoder_dc()
  ref.enable_tiling(32, 32, 24, 24)             # 32-px tiles every 24 px (8-px blend), as cfg.tiny's tiling
  cfg, params = convert(ref, "dc_ae")
  return ref, dataclasses.replace(cfg, tile_sample_size=32, tile_sample_stride=24), params


def test_tiled_decode_matches_diffusers_tiling():
  ref, cfg, params = _tiled()
  # one row of 8-latent tiles every 6 columns (two tile shapes to compile); the slow encode test blends in 2D
  z = np.random.default_rng(0).standard_normal((1, 6, 14, 4)).astype(np.float32)
  with torch.no_grad():
    dec = ref.tiled_decode(nchw(z)).sample
  np.testing.assert_allclose(_apply(cfg, params, z, "tiled_decode"), nhwc(dec), atol=ATOL, rtol=0)


@pytest.mark.slow   # ~10-20 s: four more tile shapes compiled
def test_tiled_encode_matches_diffusers_tiling():
  ref, cfg, params = _tiled()
  x = picture(56, 40)
  with torch.no_grad():
    z = ref.tiled_encode(nchw(x)).latent
  np.testing.assert_allclose(_apply(cfg, params, x, "tiled_encode").mean, nhwc(z), atol=ATOL, rtol=0)


def test_latents_are_deterministic_and_scaled_as_the_sana_pipeline():
  cfg = dc_ae.AutoencoderDCConfig.sana_1_1()
  assert (cfg.spatial_downscale, cfg.temporal_downscale, cfg.latent_channels) == (32, 1, 32)
  model = dc_ae.AutoencoderDC(cfg)
  z = jax.random.normal(jax.random.key(0), (1, 2, 2, 32))
  np.testing.assert_allclose(model.apply({}, z, method="normalize"), z * 0.41407, atol=1e-6)
  np.testing.assert_allclose(model.apply({}, z * 0.41407, method="denormalize"), z, atol=1e-6)
  tiny = dc_ae.AutoencoderDC(dc_ae.AutoencoderDCConfig.tiny())
  x = jnp.zeros((1, 8, 8, 3))
  params = jax.eval_shape(tiny.init, jax.random.key(0), x)["params"]
  post = jax.eval_shape(lambda p: tiny.apply({"params": p}, x, method="encode"), params)
  assert isinstance(post, Deterministic) and post.mean.shape == (1, 2, 2, 4)
  z = Deterministic(jnp.ones((1, 2, 2, 4)))
  np.testing.assert_array_equal(z.sample(jax.random.key(1)), z.mode())


@pytest.mark.parametrize("name", ["sana_1_0", "sana_1_1"])
def test_release_config_builds_the_same_parameters_as_diffusers(name):
  ref_cfg = dict(in_channels=3, latent_channels=32, attention_head_dim=32,
                 encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
                 decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
                 encoder_layers_per_block=(2, 2, 2, 3, 3, 3), decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
                 downsample_block_type="Conv", upsample_block_type="interpolate", scaling_factor=0.41407)
  with torch.device("meta"):
    ref = diffusers.AutoencoderDC(**ref_cfg)
  cfg = getattr(dc_ae.AutoencoderDCConfig, name)()
  assert cfg == dc_ae.config_from_diffusers(dict(ref.config))
  ours = engine.flatten(abstract_params(unimm_jax.registry.family("dc_ae"), cfg))
  assert sum(int(np.prod(v.shape)) for v in ours.values()) == sum(p.numel() for p in ref.parameters())
  assert len(ours) == len(ref.state_dict())


def test_diffusers_directory_loads_converts_and_exports_back(tmp_path):
  ref = autoencoder_dc()
  ref.save_pretrained(tmp_path / "hf", max_shard_size="50KB")
  x = picture(16, 16)
  with torch.no_grad():
    want = nhwc(ref(nchw(x)).sample)
  direct = unimm_jax.load(str(tmp_path / "hf"))
  assert direct.family == "dc_ae" and direct.config.decoder_norm_types == ("rms_norm",) * 3
  np.testing.assert_allclose(_apply(direct.config, direct.params, x, "__call__"), want, atol=ATOL, rtol=0)
  hf.convert_to_orbax(str(tmp_path / "hf"), str(tmp_path / "ours"))
  loaded = unimm_jax.load(str(tmp_path / "ours"))
  assert loaded.config == direct.config                  # nested multiscales survive unimm_config.json
  hf.export_to_hf(str(tmp_path / "ours"), str(tmp_path / "back"))
  back = diffusers.AutoencoderDC.from_pretrained(tmp_path / "back")
  for k, v in ref.state_dict().items():
    torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0)


def test_bad_input_and_unsupported_options_are_named(tmp_path):
  model = dc_ae.AutoencoderDC(dc_ae.AutoencoderDCConfig.tiny())
  with pytest.raises(ValueError, match=r"image \(1, 14, 16, 3\) must be \[b h w 3\] with h, w multiples of 4"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 14, 16, 3)))
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
  with pytest.raises(ValueError, match=r"latent \(1, 2, 2, 3\) must be \[b h w 4\]"):
    jax.eval_shape(lambda p: model.apply({"params": p}, jnp.zeros((1, 2, 2, 3)), method="decode"), params)
  with pytest.raises(NotImplementedError, match=r"decoder_norm_types \['batch_norm'\]"):
    dc_ae.AutoencoderDCConfig.tiny(decoder_norm_types="batch_norm")
  with pytest.raises(NotImplementedError, match="upsample_block_type 'bilinear'"):
    dc_ae.AutoencoderDCConfig.tiny(upsample_block_type="bilinear")
  with pytest.raises(NotImplementedError, match=r"config fields \['use_slicing'\] are not supported"):
    dc_ae.config_from_diffusers({"use_slicing": True})
  with pytest.raises(ValueError, match="unknown activation 'relu6'"):
    dc_ae.AutoencoderDCConfig.tiny(decoder_act_fns="relu6")
  ref = autoencoder_dc()
  ref.save_pretrained(tmp_path / "hf")
  path = tmp_path / "hf" / "config.json"
  path.write_text(json.dumps({**json.loads(path.read_text()), "latent_channels": 8}))
  with pytest.raises(ConversionError, match=r"'encoder\.conv_out\.weight' -> 'encoder/conv_out/kernel': conv2d gave "
                                            r"\(3, 3, 32, 4\), model expects \(3, 3, 32, 8\)"):
    unimm_jax.load(str(tmp_path / "hf"))


def test_params_carry_vocabulary_axes():
  cfg = dc_ae.AutoencoderDCConfig.tiny()
  boxed = jax.eval_shape(dc_ae.AutoencoderDC(cfg).init, jax.random.key(0), jnp.zeros((1, 4, 4, 3)))
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]:
    assert isinstance(leaf, nn.Partitioned), f"{jax.tree_util.keystr(path)} has no logical axes"
    sharding.check_logical_names(leaf.names, jax.tree_util.keystr(path))
    assert any(n is not None for n in leaf.names), jax.tree_util.keystr(path)
