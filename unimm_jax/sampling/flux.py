"""FLUX text-to-image from conditioning embeddings: the denoising loop of diffusers' FluxPipeline.

Reference: diffusers pipelines/flux/pipeline_flux.py (`__call__`, `prepare_latents`, `_pack_latents`,
`_unpack_latents`, `_prepare_latent_image_ids`, `calculate_shift`). The text encoders (T5-XXL `prompt_embeds`,
CLIP-L `pooled_prompt_embeds`) run elsewhere; this module takes their outputs.
Latents are NHWC in the transformer's space (the codec's `normalize`d latents); the loop runs on 2x2-packed
tokens. Guidance: FLUX.1-dev is guidance-distilled (the scale is a model input, one pass); "true" CFG
u + s (c - u) over negative embeddings runs both branches in one batch.
Shapes: b images, T text tokens, H W pixels, h w latent rows and columns, z latent channels, n = h w / 4 tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unimm_jax.models import flux
from unimm_jax.sampling import flow, schedulers
from unimm_jax.sampling.diffusion import denoise
from unimm_jax.sampling.flow_match_euler import DEFAULTS as FLOW_MATCH_DEFAULTS
from unimm_jax.sampling.flow_match_euler import calculate_shift


@dataclasses.dataclass(frozen=True)
class FluxSamplerConfig:
  steps: int = 28                        # FluxPipeline's num_inference_steps
  guidance: float = 3.5                  # distilled guidance, a model input (models with guidance_embeds only)
  true_cfg: float = 1.0                  # > 1: u + s (c - u) with negative embeddings
  sigmas: tuple[float, ...] | None = None   # None: linspace(1, 1/steps, steps), as FluxPipeline

  def __post_init__(self):
    if self.steps < 1:
      raise ValueError(f"FluxSamplerConfig.steps must be >= 1, got {self.steps}")


@dataclasses.dataclass(frozen=True)
class FluxSample:
  latents: np.ndarray                    # [b h w z] final latents (transformer space)
  images: np.ndarray | None              # [b H W 3] in [0, 1] (FluxPipeline output_type="np"), None without a VAE


@dataclasses.dataclass
class FluxSampler:
  """A FLUX transformer, its scheduler_config.json (dict) and optionally the VAE (a latent codec) to decode."""

  transformer: flux.FluxTransformer2DModel
  params: Any
  scheduler_config: Mapping[str, Any]
  vae: Any = None
  vae_params: Any = None

  @property
  def vae_scale_factor(self) -> int:
    return 8 if self.vae is None else self.vae.cfg.spatial_downscale   # FluxPipeline's default without a VAE

  @property
  def latent_channels(self) -> int:
    return self.transformer.cfg.in_channels // 4

  def noise(self, batch: int, size: tuple[int, int], seed: int = 0) -> jax.Array:
    """Initial latents [b h w z] for an image of size = (H, W) pixels, H and W multiples of 2 x the VAE factor."""
    f = 2 * self.vae_scale_factor
    if size[0] % f or size[1] % f:
      raise ValueError(f"FluxSampler: image size {tuple(size)} must be a multiple of {f} (2x2 packing x the VAE's "
                       f"{self.vae_scale_factor}x)")
    return jax.random.normal(jax.random.key(seed), (batch, size[0] // f * 2, size[1] // f * 2, self.latent_channels))

  def _check(self, latents: jax.Array, prompt_embeds: jax.Array, pooled: jax.Array) -> None:
    z = self.latent_channels
    if latents.ndim != 4 or latents.shape[-1] != z:
      raise ValueError(f"FluxSampler: latents {tuple(latents.shape)} must be [b h w {z}] "
                       f"(the transformer takes {self.transformer.cfg.in_channels} = 4 x {z} packed channels)")
    if latents.shape[1] % 2 or latents.shape[2] % 2:
      raise ValueError(f"FluxSampler: latent size {tuple(latents.shape[1:3])} must be even (2x2 packing)")
    b = latents.shape[0]
    if prompt_embeds.shape[0] != b or pooled.shape[0] != b:
      raise ValueError(f"FluxSampler: {b} latents for prompt_embeds {tuple(prompt_embeds.shape)} and "
                       f"pooled_prompt_embeds {tuple(pooled.shape)}")

  def scheduler(self, steps: int, sigmas: tuple[float, ...] | None, image_seq_len: int) -> Any:
    """The scheduler of scheduler_config for `steps`, with FluxPipeline's sigmas and resolution-dependent mu."""
    c = self.scheduler_config
    if sigmas is None and not c.get("use_flow_sigmas", False):
      sigmas = np.linspace(1.0, 1 / steps, steps)
    # FluxPipeline reads these with FlowMatchEuler's defaults whatever the scheduler
    get = lambda k: c.get(k, FLOW_MATCH_DEFAULTS[k])  # noqa: E731
    mu = calculate_shift(image_seq_len, get("base_image_seq_len"), get("max_image_seq_len"), get("base_shift"),
                         get("max_shift"))
    return schedulers.from_config(dict(c), steps, sigmas=sigmas, mu=mu)

  def generate(self, prompt_embeds: jax.Array, pooled_prompt_embeds: jax.Array, cfg: FluxSamplerConfig, *,
               latents: jax.Array | None = None, size: tuple[int, int] | None = None, seed: int = 0,
               negative_prompt_embeds: jax.Array | None = None,
               negative_pooled_prompt_embeds: jax.Array | None = None, progress: bool = False) -> FluxSample:
    """prompt_embeds [b T context_dim], pooled_prompt_embeds [b p]; initial `latents` [b h w z] or a `size`
    (H, W) in pixels with `seed`. Returns the final latents and, with a VAE, the decoded images."""
    if (latents is None) == (size is None):
      raise ValueError("FluxSampler.generate: pass latents or size")
    if latents is None:
      latents = self.noise(prompt_embeds.shape[0], size, seed)
    self._check(latents, prompt_embeds, pooled_prompt_embeds)
    b, h, w, _ = latents.shape
    mcfg = self.transformer.cfg
    weights = flow.text_guidance(cfg.true_cfg)
    context, pooled = prompt_embeds, pooled_prompt_embeds
    if len(weights) == 2:
      if negative_prompt_embeds is None or negative_pooled_prompt_embeds is None:
        raise ValueError(f"FluxSampler: true_cfg {cfg.true_cfg} needs negative_prompt_embeds and "
                         "negative_pooled_prompt_embeds")
      if negative_prompt_embeds.shape != prompt_embeds.shape:
        raise ValueError(f"FluxSampler: negative_prompt_embeds {tuple(negative_prompt_embeds.shape)} must have "
                         f"the shape of prompt_embeds {tuple(prompt_embeds.shape)}")
      context = jnp.concatenate([prompt_embeds, negative_prompt_embeds])
      pooled = jnp.concatenate([pooled_prompt_embeds, negative_pooled_prompt_embeds])
    rows = context.shape[0]
    cond = dict(context=jnp.asarray(context, jnp.float32), pooled=jnp.asarray(pooled, jnp.float32),
                guidance=jnp.full((rows,), cfg.guidance, jnp.float32) if mcfg.guidance_embeds else None,
                img_ids=jnp.asarray(flux.image_ids(h, w)), txt_ids=jnp.asarray(flux.text_ids(context.shape[1])))
    x = flux.pack_latents(jnp.asarray(latents, jnp.float32))
    scheduler = self.scheduler(cfg.steps, cfg.sigmas, x.shape[1])
    velocity = _GuidedVelocity(self.transformer, weights)
    x = flux.unpack_latents(denoise(velocity, self.params, scheduler, x, cond, progress=progress), h, w)
    images = None
    if self.vae is not None:
      images = np.asarray(_decode(self.vae, self.vae_params, x))
    return FluxSample(latents=np.asarray(x), images=images)


@dataclasses.dataclass(frozen=True)
class _GuidedVelocity:
  """FluxSampler.generate's model: equal across calls, so diffusion.denoise compiles its step once."""

  transformer: flux.FluxTransformer2DModel
  weights: tuple[float, ...]

  def __call__(self, params: Any, x: jax.Array, timestep: jax.Array, cond: Mapping[str, Any]) -> jax.Array:
    xs = jnp.concatenate([x] * len(self.weights))
    t = jnp.full((xs.shape[0],), timestep, x.dtype) / 1000     # FluxPipeline: timestep / 1000, x1000 inside
    out = self.transformer.apply({"params": params}, xs, cond["context"], cond["pooled"], t, cond["img_ids"],
                                 cond["txt_ids"], cond["guidance"])
    return flow.combine(jnp.split(out, len(self.weights)), self.weights)


@functools.partial(jax.jit, static_argnums=0)   # compiled once per VAE and shape
def _decode(vae: Any, params: Any, z: jax.Array) -> jax.Array:
  """Transformer latents -> images in [0, 1]: denormalize (z / scale + shift), decode, (x + 1) / 2 clipped."""
  pixels = vae.apply({"params": params}, vae.cfg.latent_norm().invert(z), method="decode")
  return jnp.clip(pixels / 2 + 0.5, 0.0, 1.0)
