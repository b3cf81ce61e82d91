"""Latent TUNA's clips through the Wan 2.2 VAE (sampling/tuna.py image_to_tokens / tokens_to_image): 1 + 4k frames
become 1 + k latent frames of tokens and come back as 1 + 4k frames, equal to diffusers' AutoencoderKLWan round
trip; the causal VAE encodes a clip's first frame as the image alone."""

import dataclasses
import types

import numpy as np
import pytest
import torch

from unimm_jax.data import video
from unimm_jax.models import tuna, vae_wan
from unimm_jax.sampling import tuna as tuna_sampling

from vae_tiny import autoencoder_wan, convert, nchw, nhwc


@pytest.fixture(scope="module")
def latent():
  ref = autoencoder_wan("2.2")
  vcfg, vparams = convert(ref, "vae_wan")
  base = tuna.TunaConfig.tiny()
  cfg = dataclasses.replace(base, space="latent", channels=vcfg.z_dim, patch=1,
                            head=dataclasses.replace(base.head, out_features=vcfg.z_dim))
  return ref, cfg, types.SimpleNamespace(module=vae_wan.WanVAE(vcfg), params=vparams, config=vcfg)


@pytest.mark.slow   # ~35 s: compiles the Wan encoder and decoder over a clip
def test_clip_tokens_round_trip_through_the_wan_vae_as_diffusers(latent):
  ref, cfg, vae = latent
  rng = np.random.default_rng(0)
  frames = rng.uniform(-1, 1, (5, 32, 32, 3)).astype(np.float32)       # 1 + 4 frames
  toks = tuna_sampling.image_to_tokens(frames, cfg, vae)
  s = vae.config.spatial_downscale
  assert toks.shape == (2, 32 // s, 32 // s, cfg.token_features)       # 1 + 1 latent frames
  # the causal VAE: the first latent frame is the first frame encoded alone (the image path)
  np.testing.assert_allclose(toks[0], tuna_sampling.image_to_tokens(frames[0], cfg, vae), atol=1e-5, rtol=0)
  back = tuna_sampling.tokens_to_image(toks, cfg, vae)
  assert back.shape == frames.shape
  with torch.no_grad():
    x = nchw(frames[None])
    want = nhwc(ref.decode(ref.encode(x).latent_dist.mode()).sample)[0]
  np.testing.assert_allclose(back, np.clip(want, -1, 1), atol=1e-4, rtol=0)


def test_a_latent_model_reads_only_frame_counts_the_vae_encodes(latent, tmp_path):
  _, cfg, vae = latent
  clip = np.random.default_rng(1).integers(0, 255, (6, 32, 32, 3), np.uint8)
  path = str(tmp_path / "clip.gif")
  video.write_gif(path, clip)
  loaded = tuna_sampling.LoadedTuna(sampler=None, cfg=cfg, tokenizer=None, vae=vae)
  assert loaded.read_video(path, 5).shape == (5, 32, 32, 3)
  with pytest.raises(ValueError, match=r"read_video: 4 frames per clip; the VAE encodes 1 \+ 4k frames"):
    loaded.read_video(path, 4)
