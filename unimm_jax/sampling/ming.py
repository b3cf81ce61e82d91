"""Ming-Lite-Uni sampling: text-to-image, editing and image chat over a converted Ming directory (convert/ming.py).

Reference: MingUniInference.py `image_gen_generate`, sana_loss.py `SANALoss.sample`, pipeline_sana.py (a copy of
diffusers' SanaPipeline). Generation: the prompt's conditions per scale (models/ming.py) -> SANA with
FlowMatchEulerDiscreteScheduler read from the release's scheduler/ (SANA's DPM config there: only
num_train_timesteps is a FlowMatch field, so shift stays 1.0), CFG u + g (c - u) with the unconditional caption
= the SANA-side MLP of zeros, 30 steps, g 5, 512^2, then DC-AE decode. The reference runs SANA once per scale from
the same noise and returns only the last (16x16) image; `all_scales` runs the three, the default runs only the
one it returns (the images are the same; two of three SANA runs and decodes are saved). Measured per image on 2
shared CPU cores, warm process (sampling/diffusion.denoise compiles its step once: the first call of a size pays
it, ~10-25 s here for the tiny model): the tiny fixture model, 30 steps, 64^2: 0.07-0.09 s vs 0.18-0.20 s with
all_scales. SANA-1.6B widths cut to 2 of its 20 layers with DC-AE f32c32 at 512^2 (the MLLM side the fixture's;
measured when each call still compiled): ~1.1 s per step per scale run, so at the release's 20 layers and 30 steps
the default saves very nearly 2/3 of the SANA time (the 7B prefill, run once either way, comes on top of both).
Chat: greedy decoding of the LLM over the prompt with the image in its slots, stopped at `<|im_end|>`.
Resolution binning: the requested size is sampled as it is (512^2 and the other sizes of the bin tables are
what the reference samples too; other sizes it would sample at the nearest bin and resize).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from unimm_jax.data.qwen_vl import QwenVLImageProcessor
from unimm_jax.models import ming, qwen
from unimm_jax.models.dc_ae import AutoencoderDC
from unimm_jax.models.sana import SanaTransformer
from unimm_jax.sampling import flow_match_euler, sana, schedulers, vlm
from unimm_jax.sampling.text import SamplerConfig, generate_from_embeddings

RELEASE_PIXELS = 451584   # qwen2vl_processor.py: min = max pixels of an edit / question image (672^2)


@dataclasses.dataclass(frozen=True)
class MingSamplerConfig:
  steps: int = 30                  # README of the release
  guidance: float = 5.0
  shift: float | None = None       # None: the scheduler config's (FlowMatch default 1.0 for the release's)
  size: tuple[int, int] = (512, 512)   # edit output (H, W); generate takes its size
  all_scales: bool = False         # also sample the 4x4 and 8x8 conditions (the reference's discarded runs)

  def __post_init__(self):
    if self.steps < 1 or self.guidance < 1.0:
      raise ValueError(f"MingSamplerConfig: need steps >= 1 and guidance >= 1, got {self}")


def flow_match_config(config: dict) -> dict:
  """What FlowMatchEulerDiscreteScheduler.from_pretrained keeps of a scheduler config: its own fields (diffusers
  ignores the others, e.g. the DPM-Solver fields of SANA's config that the release ships)."""
  return {k: v for k, v in config.items() if k in flow_match_euler.DEFAULTS}


@dataclasses.dataclass
class MingPipeline:
  module: ming.Ming
  params: Any
  tokenizer: Any
  dit: SanaTransformer
  dit_params: Any
  vae: AutoencoderDC
  vae_params: Any
  scheduler_config: dict
  processor: QwenVLImageProcessor = QwenVLImageProcessor(min_pixels=RELEASE_PIXELS, max_pixels=RELEASE_PIXELS)
  where: str = "Ming"
  max_images_per_prompt: ClassVar[int] = 1
  default_size: ClassVar[tuple[int, int]] = (512, 512)   # scripts/sample.py without --size: the release's

  def __post_init__(self):
    cfg = self.cfg
    for field, token in (("image_token_id", "<imagePatch>"), ("image_start_token_id", "<image>"),
                         ("image_end_token_id", "</image>")):
      got = vlm.token_id(self.tokenizer, token, self.where)
      if got != getattr(cfg, field):
        raise ValueError(f"{self.where}: the tokenizer's {token} is {got}, the config's {field} {getattr(cfg, field)}")
    if self.dit.cfg.caption_channels != cfg.caption_channels:
      raise ValueError(f"{self.where}: transformer/ caption_channels {self.dit.cfg.caption_channels} != the MLP's "
                       f"output width {cfg.caption_channels}")
    module = self.module
    self._conditions = jax.jit(lambda p, ids, kw: module.apply({"params": p}, ids, **kw))
    self._caption = jax.jit(lambda p, x: module.apply({"params": p}, x, method=lambda m, x: m.mlp(x)))
    self._embed = jax.jit(lambda p, ids, vision: module.apply(
        {"params": p}, ids, vision, with_queries=False, method=ming.Ming.embed))
    self.decoder = qwen.Qwen(cfg.text)

  @property
  def cfg(self) -> ming.MingConfig:
    return self.module.cfg

  @property
  def downsample(self) -> int:
    """Pixels per latent cell (DC-AE factor x SANA patch): sizes must be multiples of it."""
    return self.vae.cfg.spatial_downscale * self.dit.cfg.patch_size

  def sampler_config(self, **overrides) -> MingSamplerConfig:
    """MingSamplerConfig with the CLI's overrides; None keeps the release's (30 steps, guidance 5)."""
    return MingSamplerConfig(**{k: v for k, v in overrides.items() if v is not None})

  def read_image(self, path: str) -> np.ndarray:
    return vlm.read_rgb(path)

  # -- conditioning -------------------------------------------------------------------------------

  def prompt(self, question: str, image: np.ndarray | None = None, *, generate: bool = True) -> dict[str, Any]:
    """-> {ids [1 t], and models/ming.prepare's keyword arguments}: the reference's prompt, expanded for generation."""
    cfg = self.cfg
    patches, grid = self.processor(image) if image is not None else (None, None)
    slots = ming.image_slots(grid, cfg.vision.merge) if grid else 0
    ids = ming.prompt_ids(self.tokenizer, question, image_slots=slots, generate=generate)
    if generate:
      ids = ming.expand_generation(ids, cfg)
    ids = np.asarray([ids])
    kw = ming.prepare(ids, cfg, pixel_values=patches, image_grid_thw=[grid] if grid else (), generate=generate)
    return {"ids": ids, **kw}

  def conditions(self, question: str, image: np.ndarray | None = None) -> dict[str, Any]:
    """-> models/ming.Ming's output: per scale the condition and its SANA caption embedding [1 n e]."""
    p = self.prompt(question, image)
    return self._conditions(self.params, jnp.asarray(p.pop("ids"), jnp.int32), p)

  # -- diffusion ----------------------------------------------------------------------------------

  def scheduler(self, cfg: MingSamplerConfig) -> flow_match_euler.FlowMatchEuler:
    c = flow_match_config(self.scheduler_config)
    if cfg.shift is not None:
      c["shift"] = cfg.shift
    return flow_match_euler.FlowMatchEuler.from_config(c, cfg.steps)

  def noise(self, size: tuple[int, int], seed: int) -> jax.Array:
    shape = sana.latent_shape(self.dit.cfg, self.vae.cfg.spatial_downscale, 1, *size)
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)

  def sample(self, caption: jax.Array, latents: jax.Array, cfg: MingSamplerConfig, *, progress: bool = False,
             on_step: Callable[[int, jax.Array], None] | None = None) -> jax.Array:
    """One SANA run: caption [1 n e] (the MLP's output), noise [1 h w c] -> final latents."""
    uncond = self._caption(self.params, jnp.zeros((*caption.shape[:2], self.cfg.text.embed), caption.dtype))
    return sana.sample_latents(self.dit, self.dit_params, self.scheduler(cfg), latents, caption,
                               guidance_scale=cfg.guidance, negative_embeds=uncond, progress=progress, on_step=on_step)

  def decode(self, latents: jax.Array) -> np.ndarray:
    return sana.to_uint8(sana.decode_latents(self.vae, self.vae_params, latents))[0]

  def _check_negative(self, negative: str) -> None:
    if negative:
      raise ValueError(f"{self.where}: Ming's unconditional branch is the MLP of zero conditions; it takes no negative "
                       "prompt")

  def images_per_scale(self, question: str, image: np.ndarray | None, size: tuple[int, int], cfg: MingSamplerConfig,
                       seed: int, progress: bool) -> dict[str, np.ndarray]:
    """-> {scale name: uint8 image}: the last scale, or with cfg.all_scales every scale, from the same noise."""
    cond = self.conditions(question, image)
    names = [f"{s}x{s}" for s in self.cfg.scales]
    latents = self.noise(size, seed)
    return {k: self.decode(self.sample(cond[k]["caption"], latents, cfg, progress=progress))
            for k in (names if cfg.all_scales else names[-1:])}

  def generate_scales(self, prompts: Sequence[str], size: tuple[int, int], cfg: MingSamplerConfig, *,
                      negative: str = "", seed: int = 0, progress: bool = False) -> list[dict[str, np.ndarray]]:
    self._check_negative(negative)
    return [self.images_per_scale(p, None, size, cfg, seed, progress) for p in prompts]

  def generate(self, prompts: Sequence[str], size: tuple[int, int], cfg: MingSamplerConfig, *, negative: str = "",
               seed: int = 0, progress: bool = False) -> list[np.ndarray]:
    """Prompts -> uint8 images [H W 3] of the last scale (the reference's output); each from the noise of `seed`."""
    return [list(out.values())[-1] for out in self.generate_scales(prompts, size, cfg, negative=negative, seed=seed,
                                                                    progress=progress)]

  def edit(self, images: Sequence[np.ndarray], instructions: Sequence[str], cfg: MingSamplerConfig, *,
           negative: str = "", seed: int = 0, progress: bool = False) -> list[np.ndarray]:
    """Source images + instructions -> uint8 images of cfg.size (the image in its slots of the prompt)."""
    self._check_negative(negative)
    if len(images) != len(instructions):
      raise ValueError(f"edit: {len(images)} images for {len(instructions)} instructions")
    return [list(self.images_per_scale(t, i, cfg.size, cfg, seed, progress).values())[-1]
            for i, t in zip(images, instructions)]

  # -- chat ---------------------------------------------------------------------------------------

  def generate_tokens(self, image: np.ndarray | None, question: str, *, max_new_tokens: int = 100,
                      sampler: SamplerConfig = SamplerConfig(), seed: int = 0,
                      on_step: Callable[[Any], None] | None = None) -> list[int]:
    """Answer tokens (the stop token excluded). New tokens take the positions after the prompt's largest, as the
    reference's get_rope_index over prompt + answer gives them."""
    p = self.prompt(question, image, generate=False)
    ids = jnp.asarray(p["ids"], jnp.int32)
    embeds = self._embed(self.params, ids, p.get("vision"))
    out = generate_from_embeddings(self.decoder, self.params["llm"], embeds, np.ones(ids.shape, np.int32),
                                   positions=p["positions"], max_new_tokens=max_new_tokens, sampler=sampler,
                                   stop_tokens=[self.cfg.eos_token_id], seed=seed, on_step=on_step)
    return out.as_lists()[0]

  def answer(self, images: Sequence[np.ndarray], questions: Sequence[str], *, max_new_tokens: int = 100,
             sampler: SamplerConfig = SamplerConfig(), seed: int = 0,
             on_step: Callable[[Any], None] | None = None) -> list[str]:
    """An image per question -> the decoded answers (greedy by default, as the reference)."""
    if len(images) != len(questions):
      raise ValueError(f"answer: {len(images)} images for {len(questions)} questions")
    return [self.tokenizer.decode(self.generate_tokens(i, q, max_new_tokens=max_new_tokens, sampler=sampler,
                                                       seed=seed, on_step=on_step), skip_special_tokens=True)
            for i, q in zip(images, questions)]


def load(path: str, **kw) -> MingPipeline:
  """A converted Ming directory: the MLLM side, transformer/ (SANA), vae/ (DC-AE), scheduler/, tokenizer."""
  from unimm_jax import api
  from unimm_jax.convert import ming as ming_convert
  loaded = api.load(path)
  if loaded.family != "ming":
    raise ValueError(f"{path}: a {loaded.family!r} checkpoint, not a Ming one")
  if loaded.tokenizer is None:
    raise ValueError(f"{path}: no tokenizer files beside the Ming checkpoint")
  parts = {}
  for name in (ming_convert.DIT_DIR, ming_convert.VAE_DIR):
    part = os.path.join(path, name)
    if not os.path.isdir(part):
      raise ValueError(f"{path}: no {name}/ (convert the release with scripts/convert.py --ming)")
    parts[name] = api.load(part)
  dit, vae = parts[ming_convert.DIT_DIR], parts[ming_convert.VAE_DIR]
  return MingPipeline(loaded.module, loaded.params, ming_convert.with_ming_tokens(loaded.tokenizer), dit.module,
                      dit.params, vae.module, vae.params,
                      schedulers.read_config(os.path.join(path, ming_convert.SCHEDULER_DIR)), where=path, **kw)
