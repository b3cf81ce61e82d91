"""Tiny random diffusers autoencoders for the VAE parity tests, and a PIL-drawn test picture."""

from __future__ import annotations

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import torch
from PIL import Image, ImageDraw

from unimm_jax import registry
from unimm_jax.convert.family import abstract_params
from unimm_jax.convert import engine

KL_TINY = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
               up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, layers_per_block=1, sample_size=32)
# 4 levels: 8x spatial, 4x temporal (two temporal down/up samplings), as the real configs.
WAN21_TINY = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                  temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                  latents_std=[1.5, 0.5, 2.0, 1.0])
WAN22_TINY = dict(base_dim=8, decoder_base_dim=12, z_dim=6, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                  temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
                  patch_size=2, scale_factor_spatial=16, latents_mean=[0.1, -0.2, 0.3, 0.0, 0.2, -0.1],
                  latents_std=[1.5, 0.5, 2.0, 1.0, 0.8, 1.2])
# 3 levels (4x): a ResBlock level, then EfficientViT levels with 5x5 multi-scale attention (head_dim 8), as
# dc-ae-f32c32-sana's layout at a toy width.
_VIT = ("ResBlock", "EfficientViTBlock", "EfficientViTBlock")
DC_TINY = dict(latent_channels=4, attention_head_dim=8, encoder_block_types=_VIT, decoder_block_types=_VIT,
               encoder_block_out_channels=(8, 16, 32), decoder_block_out_channels=(8, 16, 32),
               encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 2),
               encoder_qkv_multiscales=((), (5,), (5,)), decoder_qkv_multiscales=((), (5,), (5,)),
               downsample_block_type="Conv", upsample_block_type="interpolate", scaling_factor=0.41407)


def randomize(model: torch.nn.Module, out_scale: float = 1.0) -> torch.nn.Module:
  """diffusers inits norms to 1 and biases to 0; random values make parity see every tensor.

  `out_scale` shrinks the decoder's last conv so decoded pixels mostly stay inside [-1, 1] (the Wan
  decoder clamps, which would hide differences).
  """
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1 or "gamma" in name:
        base = 1.0 if ("norm" in name or "gamma" in name) and not name.endswith("bias") else 0.0
        p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
      if name.startswith("decoder.conv_out"):
        p.mul_(out_scale)
  return model.eval()


def autoencoder_kl(**kw) -> diffusers.AutoencoderKL:
  torch.manual_seed(0)
  return randomize(diffusers.AutoencoderKL(**{**KL_TINY, **kw}))


def autoencoder_wan(version: str, **kw) -> diffusers.AutoencoderKLWan:
  torch.manual_seed(0)
  base = WAN21_TINY if version == "2.1" else WAN22_TINY
  return randomize(diffusers.AutoencoderKLWan(**{**base, **kw}), out_scale=0.3)


def autoencoder_dc(**kw) -> diffusers.AutoencoderDC:
  torch.manual_seed(0)
  return randomize(diffusers.AutoencoderDC(**{**DC_TINY, **kw}))


def convert(ref: torch.nn.Module, family: str, rules=None) -> tuple:
  """diffusers model -> (our config, params) through OUR converter and the family's table."""
  fam = registry.family(family)
  cfg = fam.config_from_hf(dict(ref.config))
  abstract = engine.flatten(abstract_params(fam, cfg))
  source = {k: (lambda v=v: v.detach().numpy()) for k, v in ref.state_dict().items()}
  params = engine.unflatten(engine.convert(source, rules or fam.rules(cfg), abstract))
  return cfg, jax.tree.map(jnp.asarray, params)


def picture(h: int, w: int, frames: int = 1) -> np.ndarray:
  """A drawn scene (gradient sky, sun, hills; moving across frames) as [t h w 3] in [-1, 1]."""
  out = []
  for f in range(frames):
    img = Image.new("RGB", (w, h))
    draw = ImageDraw.Draw(img)
    for y in range(h):
      draw.line([(0, y), (w, y)], fill=(40 + 150 * y // h, 90, 220 - 120 * y // h))
    cx = w // 4 + 2 * f
    draw.ellipse([cx - w // 6, h // 6, cx + w // 6, h // 6 + w // 3], fill=(250, 210, 40))
    draw.polygon([(0, h), (w // 2, h // 2 + f), (w, h)], fill=(30, 140, 60))
    out.append(np.asarray(img, np.float32) / 127.5 - 1.0)
  return np.stack(out)


def nchw(x: np.ndarray) -> torch.Tensor:
  """[b (t) h w c] numpy -> [b c (t) h w] torch."""
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


def nhwc(t: torch.Tensor) -> np.ndarray:
  return np.moveaxis(t.detach().numpy(), 1, -1)
