"""Wan 2.1 / 2.2 VAE against diffusers AutoencoderKLWan, fp32, tiny random weights (4 levels: 8x
spatial, 4x temporal; 2.2 adds the 2x2 patchify and residual blocks). Videos have 5 frames, so encode
runs the first frame and one cached 4-frame chunk, and decode runs two cached latent frames."""

import functools
import os
import re
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
from unimm_jax import sharding
from unimm_jax.convert import engine, hf, original
from unimm_jax.convert.errors import ConversionError
from unimm_jax.convert.maps import vae_wan as wan_map
from unimm_jax.models import vae_wan

from vae_tiny import autoencoder_wan, convert, nchw, nhwc, picture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATOL = 1e-4


@functools.partial(jax.jit, static_argnums=(0, 3))
def _apply(cfg, params, x, method="__call__"):
  return vae_wan.WanVAE(cfg).apply({"params": params}, x, method=method)


def _reference(ref, x):
  """diffusers posterior mean and decode(mean), channels-last."""
  with torch.no_grad():
    post = ref.encode(nchw(x)).latent_dist
    return nhwc(post.mean), nhwc(post.logvar), nhwc(ref.decode(post.mean).sample)


def _check_parity(ref, cfg, params, x):
  mean, logvar, dec = _reference(ref, x)
  ours = _apply(cfg, params, x, "encode")
  np.testing.assert_allclose(ours.mean, mean, atol=ATOL, rtol=0)
  np.testing.assert_allclose(ours.logvar, logvar, atol=ATOL, rtol=0)
  got = _apply(cfg, params, jnp.asarray(mean), "decode")
  assert np.mean(np.abs(dec) < 1) > 0.9, "decoder output mostly clamped: the parity check would see little"
  np.testing.assert_allclose(got, dec, atol=ATOL, rtol=0)


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_video_encode_and_decode_through_the_chunk_cache_match_diffusers(version):
  ref = autoencoder_wan(version)
  cfg, params = convert(ref, "vae_wan")
  x = np.random.default_rng(0).uniform(-1, 1, (1, 5, 32, 32, 3)).astype(np.float32)
  _check_parity(ref, cfg, params, x)


@pytest.mark.slow
@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_image_is_the_one_frame_case_and_round_trip_matches_torch(version):
  ref = autoencoder_wan(version)
  cfg, params = convert(ref, "vae_wan")
  x = picture(32, 48)[None]                      # [1 1 32 48 3]
  _check_parity(ref, cfg, params, x)
  with torch.no_grad():
    want = nhwc(ref(nchw(x)).sample)               # decode(encode(x).mode())
  np.testing.assert_allclose(_apply(cfg, params, x), want, atol=ATOL, rtol=0)


def test_video_round_trip_of_drawn_frames_matches_torch_round_trip():
  ref = autoencoder_wan("2.2")
  cfg, params = convert(ref, "vae_wan")
  x = picture(32, 32, frames=5)[None]
  with torch.no_grad():
    want = nhwc(ref(nchw(x)).sample)               # decode(encode(x).mode())
  z = _apply(cfg, params, x, "encode").mode()      # same shapes as the parity test: compiled once
  np.testing.assert_allclose(_apply(cfg, params, z, "decode"), want, atol=ATOL, rtol=0)


def _to_original_naming(key: str, num_res_blocks: int) -> str:
  """diffusers -> original Wan 2.2 key: the inverse of diffusers scripts/convert_wan_to_diffusers.py
  (convert_vae_22), written from that script's renames."""
  for ours, orig in ((".norm1.gamma", ".residual.0.gamma"), (".conv1.", ".residual.2."),
                     (".norm2.gamma", ".residual.3.gamma"), (".conv2.", ".residual.6."),
                     (".conv_shortcut.", ".shortcut."), ("norm_out.gamma", "head.0.gamma"),
                     ("conv_out.", "head.2."), ("conv_in.", "conv1."), ("mid_block.resnets.0.", "middle.0."),
                     ("mid_block.attentions.0.", "middle.1."), ("mid_block.resnets.1.", "middle.2.")):
    key = key.replace(ours, orig)
  key = re.sub(r"^quant_conv\.", "conv1.", re.sub(r"^post_quant_conv\.", "conv2.", key))
  key = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.downsamples.\1.downsamples.", key)
  key = re.sub(r"encoder\.down_blocks\.(\d+)\.downsampler\.",
               rf"encoder.downsamples.\1.downsamples.{num_res_blocks}.", key)
  key = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", r"decoder.upsamples.\1.upsamples.", key)
  return re.sub(r"decoder\.up_blocks\.(\d+)\.upsampler\.",
                rf"decoder.upsamples.\1.upsamples.{num_res_blocks + 1}.", key)


def _to_original_naming_21(key: str, num_res_blocks: int) -> str:
  """diffusers -> original Wan 2.1 key: the inverse of convert_wan_to_diffusers.py::convert_vae, whose
  decoder regrouping (flat entries 0-2 -> up_blocks.0.resnets.0-2, 3 -> up_blocks.0.upsamplers.0, 4-6 ->
  up_blocks.1 ...) is k * (num_res_blocks + 2) + j for its 2 resnets a block."""
  per = num_res_blocks + 2
  key = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
               lambda m: f"decoder.upsamples.{int(m[1]) * per + int(m[2])}.", key)
  key = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
               lambda m: f"decoder.upsamples.{int(m[1]) * per + num_res_blocks + 1}.", key)
  key = _to_original_naming(key, num_res_blocks)    # the renames shared with 2.2
  return key.replace("encoder.down_blocks.", "encoder.downsamples.")   # 2.1 keeps the encoder's flat indices


@pytest.mark.parametrize("version, num_res_blocks, key", [
    ("2.2", 1, "encoder.downsamples.0.downsamples.1.resample.1.weight"),
    ("2.1", 2, "decoder.upsamples.7.resample.1.weight"),   # decoder block 1's upsampler, flat entry 1 * 4 + 3
])
def test_original_pth_converts_loads_and_matches_diffusers(tmp_path, version, num_res_blocks, key):
  ref = autoencoder_wan(version, num_res_blocks=num_res_blocks)
  rename = _to_original_naming if version == "2.2" else _to_original_naming_21
  state = {rename(k, num_res_blocks): v for k, v in ref.state_dict().items()}
  assert key in state and "conv2.weight" in state
  path = tmp_path / f"Wan{version}_VAE.pth"
  torch.save(state, path)
  cfg = vae_wan.config_from_diffusers(dict(ref.config))
  original.convert_wan_vae_to_orbax(str(path), str(tmp_path / "ours"), cfg)
  loaded = unimm_jax.load(str(tmp_path / "ours"))
  assert loaded.family == "vae_wan" and loaded.config == cfg
  x = np.random.default_rng(0).uniform(-1, 1, (1, 5, 32, 32, 3)).astype(np.float32)
  _check_parity(ref, loaded.config, loaded.params, x)
  # The table runs backwards: export gives the original keys and tensors again.
  back = engine.export({k: np.asarray(v) for k, v in engine.flatten(loaded.params).items()},
                       wan_map.original_rules(cfg))
  assert set(back) == set(state)
  np.testing.assert_array_equal(back["decoder.middle.1.norm.gamma"], state["decoder.middle.1.norm.gamma"].numpy())


def test_original_pth_with_a_wrong_tensor_is_refused_with_its_name(tmp_path):
  ref = autoencoder_wan("2.2")
  state = {_to_original_naming(k, 1): v for k, v in ref.state_dict().items()}
  state["decoder.head.0.gamma"] = torch.ones(5, 1, 1, 1)
  state["encoder.extra.weight"] = torch.ones(1)
  torch.save(state, tmp_path / "bad.pth")
  with pytest.raises(ConversionError) as err:
    original.convert_wan_vae(str(tmp_path / "bad.pth"), vae_wan.config_from_diffusers(dict(ref.config)))
  assert "encoder.extra.weight" in str(err.value) and "decoder.head.0.gamma" in str(err.value)
  # The command line: a file of another size than the preset is refused, naming a tensor and both shapes,
  # and nothing is written.
  r = subprocess.run([sys.executable, "scripts/convert.py", "--wan_vae", "wan2.2", "--src", str(tmp_path / "bad.pth"),
                      "--dst", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2 and "decoder.head.2.weight" in r.stderr and not (tmp_path / "out").exists(), r.stderr[-2000:]


def test_diffusers_folder_loads_through_class_name(tmp_path):
  ref = autoencoder_wan("2.1")
  ref.save_pretrained(tmp_path / "hf")
  loaded = unimm_jax.load(str(tmp_path / "hf"))
  assert loaded.family == "vae_wan" and not loaded.config.is_residual
  x = np.random.default_rng(0).uniform(-1, 1, (1, 5, 32, 32, 3)).astype(np.float32)
  _check_parity(ref, loaded.config, loaded.params, x)
  hf.convert_to_orbax(str(tmp_path / "hf"), str(tmp_path / "ours"))
  hf.export_to_hf(str(tmp_path / "ours"), str(tmp_path / "back"))   # a folder diffusers opens as it is
  back = diffusers.AutoencoderKLWan.from_pretrained(tmp_path / "back")
  for k, v in ref.state_dict().items():
    torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_tiled_encode_and_decode_match_diffusers_tiling(version):
  ref = autoencoder_wan(version)
  # 2.1: 32-px tiles every 24 px (8x); 2.2: 32 patchified px (64 px) every 24 (16x).
  ref.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=24,
                    tile_sample_stride_width=24)
  cfg, params = convert(ref, "vae_wan")
  cfg = vae_wan.WanVAEConfig.from_dict({**cfg.to_dict(), "tile_sample_min_size": 32, "tile_sample_stride": 24})
  side = 48 if version == "2.1" else 96
  x = np.random.default_rng(0).uniform(-1, 1, (1, 5, side, side, 3)).astype(np.float32)
  mean, _, dec = _reference(ref, x)                # diffusers tiles both ways at this size
  np.testing.assert_allclose(_apply(cfg, params, x, "tiled_encode").mean, mean, atol=ATOL, rtol=0)
  np.testing.assert_allclose(_apply(cfg, params, jnp.asarray(mean), "tiled_decode"), dec, atol=ATOL, rtol=0)


def test_frame_count_and_shape_errors_name_the_input():
  cfg = vae_wan.preset("wan2.1")
  with pytest.raises(ValueError, match=r"6 frames; need 1 \+ 4k"):
    jax.eval_shape(vae_wan.WanVAE(cfg).init, jax.random.key(0), jnp.zeros((1, 6, 16, 16, 3)))
  with pytest.raises(ValueError, match=r"video \(1, 5, 12, 16, 3\)"):
    jax.eval_shape(vae_wan.WanVAE(cfg).init, jax.random.key(0), jnp.zeros((1, 5, 12, 16, 3)))


def test_latent_normalisation_per_channel_and_tuna_quirk():
  z = jax.random.normal(jax.random.key(0), (1, 2, 2, 2, 48))
  mean, std = np.asarray(vae_wan.WAN22_MEAN), np.asarray(vae_wan.WAN22_STD)
  wan = vae_wan.WanVAE(vae_wan.preset("wan2.2"))
  np.testing.assert_allclose(wan.apply({}, z, method="normalize"), (z - mean) / std, rtol=1e-5, atol=1e-6)
  from unimm_jax.models import tuna  # TUNA's setting, not the codec's (configs/tuna.py "2b" is latent TUNA)
  from configs import tuna as tuna_configs
  norm = tuna_configs.model_config("2b").latent_norm(vae_wan.preset("wan2.2"))
  normed = norm.apply(z)
  np.testing.assert_allclose(normed, (z - std) / std, rtol=1e-5, atol=1e-6)   # TUNA: mean = std
  np.testing.assert_allclose(norm.invert(normed), z, rtol=1e-5, atol=1e-5)
  assert tuna.TunaConfig.from_dict({**tuna_configs.model_config("2b").to_dict(), "latent_stats": "codec"}).latent_norm(
      vae_wan.preset("wan2.2")) == vae_wan.preset("wan2.2").latent_norm()


def test_params_carry_conv_axes_from_the_vocabulary():
  cfg = vae_wan.config_from_diffusers(dict(autoencoder_wan("2.2").config))
  boxed = jax.eval_shape(vae_wan.WanVAE(cfg).init, jax.random.key(0), jnp.zeros((1, 5, 16, 16, 3)))
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]:
    assert isinstance(leaf, nn.Partitioned), f"{jax.tree_util.keystr(path)} has no logical axes"
    sharding.check_logical_names(leaf.names, jax.tree_util.keystr(path))
    if leaf.value.ndim >= 2:
      assert leaf.names[-2:] == ("conv_in", "conv_out"), jax.tree_util.keystr(path)


@pytest.mark.slow
def test_bf16_compute_stays_close_to_fp32():
  cfg, params = convert(autoencoder_wan("2.2"), "vae_wan")
  x = picture(32, 32)[None]
  bf16 = vae_wan.WanVAEConfig.from_dict({**cfg.to_dict(), "dtype": "bfloat16"})
  got = _apply(bf16, params, x)
  assert got.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(got - _apply(cfg, params, x)))) < 0.1


@pytest.mark.parametrize("kind", ["causal", "upsample", "bf16"])
def test_kernel_transforms_are_not_all_live_at_once(kind):
  # 8 wide convs over a tiny activation: if the tap slices / phase folds / bf16 casts of every kernel
  # were computed before the first conv (XLA's choice for weight-only work), temporaries would hold all 8.
  from unimm_jax.layers.conv import CausalConv3D, Conv

  c, n = 256, 8

  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
      for i in range(n):
        if kind == "causal":
          x = CausalConv3D(c, name=f"c{i}")(x)
        elif kind == "upsample":
          x = Conv(c, (3, 3), upsample=True, name=f"c{i}")(x)[:, ::2, ::2]
        else:
          x = Conv(c, (3, 3), dtype=jnp.bfloat16, name=f"c{i}")(x)
      return x

  x = jax.ShapeDtypeStruct((1, 1, 4, 4, c) if kind == "causal" else (1, 4, 4, c), jnp.float32)
  params = jax.eval_shape(Stack().init, jax.random.key(0), x)
  compiled = jax.jit(Stack().apply).lower(params, x).compile()
  transformed = {"causal": 9 * 4, "upsample": 16 * 4, "bf16": 9 * 2}[kind] * c * c   # bytes of one transform
  assert compiled.memory_analysis().temp_size_in_bytes < 2.5 * transformed
