"""SANA text-to-image from conditioning embeddings: what diffusers' SanaPipeline does after its text encoder.

Reference: diffusers pipelines/sana/pipeline_sana.py (SanaPipeline.__call__ with prompt_embeds,
negative_prompt_embeds and latents given, use_resolution_binning=False).
The caption embeddings come from whatever conditions SANA (Gemma-2 in SANA itself; OpenUni's connector,
Ming's MLP in the unified models). Latents are NHWC: [b h w c], h = H / (autoencoder factor).
Guidance: the conditional and unconditional branches run as one batch and combine as u + g (c - u)
(sampling/flow.py); like the pipeline, g <= 1 runs the conditional branch alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unimm_jax.models.dc_ae import AutoencoderDC
from unimm_jax.models.sana import SanaConfig, SanaTransformer
from unimm_jax.sampling import diffusion, flow


def latent_shape(cfg: SanaConfig, downscale: int, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
  """[b h w c] latents of a height x width image; the size must be a multiple of downscale * patch pixels."""
  step = downscale * cfg.patch_size
  if height % step or width % step:
    raise ValueError(f"image size {height}x{width} is not a multiple of {step} pixels "
                     f"(autoencoder factor {downscale} x patch {cfg.patch_size})")
  return batch, height // downscale, width // downscale, cfg.in_channels


def _pad_to(x: jax.Array, mask: jax.Array, length: int) -> tuple[jax.Array, jax.Array]:
  extra = length - x.shape[1]
  return (jnp.pad(x, ((0, 0), (0, extra), (0, 0))), jnp.pad(mask, ((0, 0), (0, extra))))


def sample_latents(model: SanaTransformer, params: Any, scheduler: Any, latents: jax.Array, prompt_embeds: jax.Array,
                   prompt_mask: jax.Array | None = None, *, guidance_scale: float = 4.5,
                   negative_embeds: jax.Array | None = None, negative_mask: jax.Array | None = None,
                   progress: bool = False, on_step: Callable[[int, jax.Array], None] | None = None) -> jax.Array:
  """Initial noise `latents` [b h w c] + caption embeddings [b l k] (mask [b l], 1 = token) -> final latents.

  With guidance_scale > 1 the negative embeddings [b l' k] (mask [b l']) are required; captions of different
  lengths are padded (padding is masked). `scheduler` is a sampling/schedulers.py scheduler.
  """
  cfg = model.cfg
  if latents.ndim != 4 or latents.shape[-1] != cfg.in_channels:
    raise ValueError(f"sana: latents {latents.shape} must be [b h w {cfg.in_channels}] (transformer in_channels)")
  if latents.shape[1] % cfg.patch_size or latents.shape[2] % cfg.patch_size:
    raise ValueError(f"sana: latent size {latents.shape[1:3]} is not a multiple of the patch size {cfg.patch_size}")
  if cfg.out_channels != cfg.in_channels:
    raise NotImplementedError(f"sana: out_channels {cfg.out_channels} != in_channels {cfg.in_channels} "
                              "(a learned-sigma output) is not supported")
  if cfg.guidance_embeds:
    raise NotImplementedError("sana: a guidance-embedding transformer (SANA-Sprint) samples with SanaSprintPipeline's "
                              "SCM scheduler, not this pipeline")
  b = latents.shape[0]
  if prompt_embeds.shape[0] != b:
    raise ValueError(f"sana: {prompt_embeds.shape[0]} prompt embeddings for {b} latents")
  prompt_mask = jnp.ones(prompt_embeds.shape[:2], jnp.int32) if prompt_mask is None else jnp.asarray(prompt_mask)
  weights = flow.text_guidance(guidance_scale) if guidance_scale > 1.0 else (1.0,)
  caption, mask = jnp.asarray(prompt_embeds), prompt_mask.astype(jnp.int32)
  if len(weights) == 2:
    if negative_embeds is None or negative_embeds.shape[0] != b:
      raise ValueError(f"sana: guidance_scale {guidance_scale} > 1 needs negative_embeds for the {b} latents")
    negative_mask = (jnp.ones(negative_embeds.shape[:2], jnp.int32) if negative_mask is None
                     else jnp.asarray(negative_mask).astype(jnp.int32))
    length = max(caption.shape[1], negative_embeds.shape[1])
    caption, mask = _pad_to(caption, mask, length)
    neg, neg_mask = _pad_to(jnp.asarray(negative_embeds), negative_mask, length)
    caption, mask = jnp.concatenate([caption, neg]), jnp.concatenate([mask, neg_mask])   # [cond; uncond]
  return diffusion.denoise(GuidedVelocity(model, tuple(weights)), params, scheduler,
                           jnp.asarray(latents, jnp.float32), (caption, mask),
                           progress=progress, on_step=on_step)


@dataclasses.dataclass(frozen=True)
class GuidedVelocity:
  """denoise's model_fn: SANA on the latents repeated per guidance branch, combined by `weights`. Hashed by value,
  so a pipeline's later images reuse the compiled step."""

  model: SanaTransformer
  weights: tuple[float, ...]

  def __call__(self, params: Any, x: jax.Array, timestep: jax.Array, cond: tuple[jax.Array, jax.Array]) -> jax.Array:
    caption, mask = cond
    branches = len(self.weights)
    xs = jnp.concatenate([x] * branches)
    t = jnp.full((xs.shape[0],), timestep * self.model.cfg.timestep_scale)
    v = self.model.apply({"params": params}, xs, caption, t, mask)
    return flow.combine(jnp.split(v, branches), self.weights)


def decode_latents(vae: AutoencoderDC, vae_params: Any, latents: jax.Array, *, tiled: bool = False) -> jax.Array:
  """Diffusion latents [b h w c] -> images [b H W 3] in [-1, 1] (the pipeline's decode(z / scaling_factor), clamped).
  `tiled` decodes in the autoencoder's overlapping tiles (large images in bounded memory)."""
  z = vae.apply({}, latents, method=AutoencoderDC.denormalize)
  method = AutoencoderDC.tiled_decode if tiled else AutoencoderDC.decode
  return jnp.clip(jax.jit(lambda p, z: vae.apply({"params": p}, z, method=method))(vae_params, z), -1.0, 1.0)


def to_uint8(images: jax.Array) -> np.ndarray:
  """[-1, 1] -> uint8 (as the pipeline's PIL output: round((x + 1) / 2 * 255))."""
  return np.round((np.asarray(images) + 1.0) * 127.5).astype(np.uint8)


def text_to_image(model: SanaTransformer, params: Any, vae: AutoencoderDC, vae_params: Any, scheduler: Any,
                  latents: jax.Array, prompt_embeds: jax.Array, prompt_mask: jax.Array | None = None, *,
                  tiled: bool = False, **kw) -> tuple[jax.Array, jax.Array]:
  """sample_latents then decode_latents: -> (final latents [b h w c], images [b H W 3] in [-1, 1])."""
  final = sample_latents(model, params, scheduler, latents, prompt_embeds, prompt_mask, **kw)
  return final, decode_latents(vae, vae_params, final, tiled=tiled)
