"""OpenUni text-to-image, editing and image chat, as the original scripts do them.

Reference: wusize/OpenUni src/models/openuni/internvl3_sana_hf.py (prepare_text_conditions, generate,
get_semantic_features), scripts/text2image.py, scripts/image_edit.py, configs/datasets/*/processors.py
(the prompt template). Conventions: fixtures/openuni README ("Conventions" 1-11).

Prompts: `INSTRUCTION.format(input="Generate an image: " + prompt) + "<img>"`; the unconditional prompt is the literal
`INSTRUCTION.format(input="Generate an image.") + "<img>"`, or a user one wrapped like a prompt. Edits put the source
image's InternViT features before the instruction (`<img>` `<IMG_CONTEXT>` x n `</img>\n`), its CFG prompt
"Keep the image as it is." with the same image. Sampling: SanaPipeline's DPM-Solver++(2M) over flow sigmas (shift
3), guidance u + g (c - u), decode vae.decode(z / scaling_factor), pixels clamp(127.5 x + 128) truncated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unimm_jax.data.internvl import IMAGENET_MEAN, IMAGENET_STD, TilingProcessor
from unimm_jax.models.openuni import OpenUni, OpenUniConfig
from unimm_jax.sampling import sana as sana_sampling, vlm
from unimm_jax.sampling.dpm_solver import DPMSolverMultistep
from unimm_jax.sampling.internvl import InternVLChat

INSTRUCTION = "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"
GENERATION = "Generate an image: {input}"
CFG = "Generate an image."
EDIT_CFG = "Keep the image as it is."
START, CONTEXT, END = "<img>", "<IMG_CONTEXT>", "</img>"
# The scheduler_config.json of the SANA 512 / 1024 px repositories the releases sample with (test_scheduler).
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                 solver_order=2, prediction_type="flow_prediction", algorithm_type="dpmsolver++",
                 solver_type="midpoint", lower_order_final=True, use_flow_sigmas=True, flow_shift=3.0,
                 final_sigmas_type="zero")


def t2i_prompt(prompt: str) -> str:
  return INSTRUCTION.format(input=GENERATION.format(input=prompt.strip())) + START


def cfg_prompt(negative: str = "") -> str:
  """The unconditional prompt: the template's CFG string, or a user one wrapped like a prompt."""
  return t2i_prompt(negative) if negative.strip() else INSTRUCTION.format(input=CFG) + START


def edit_prompt(instruction: str, image_tokens: int) -> str:
  return INSTRUCTION.format(input=START + CONTEXT * image_tokens + END + "\n" + instruction) + START


def tokenize(tokenizer: Any, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """-> ids, mask [b t], right-padded with the tokenizer's pad id (prepare_text_conditions)."""
  rows = [list(tokenizer(t, add_special_tokens=True)["input_ids"]) for t in texts]
  pad = tokenizer.pad_token_id
  if pad is None:
    raise ValueError("openuni: the tokenizer has no pad token (the prompts are right-padded with it)")
  t = max(len(r) for r in rows)
  ids = np.full((len(rows), t), pad, np.int32)
  mask = np.zeros((len(rows), t), np.int32)
  for i, r in enumerate(rows):
    ids[i, :len(r)], mask[i, :len(r)] = r, 1
  return ids, mask


def vit_pixels(images: np.ndarray | jax.Array, size: int) -> jax.Array:
  """uint8 images [n H W 3] -> InternViT input [n size size 3] as get_semantic_features: [-1, 1] -> [0, 1], ImageNet
  mean / std, then one bilinear resize (align_corners False, no antialias, no tiling)."""
  x = (2 * (jnp.asarray(images, jnp.float32) / 255) - 1 + 1) / 2
  x = (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
  return jax.image.resize(x, (x.shape[0], size, size, 3), "bilinear", antialias=False)


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """uint8 [H W 3] -> [h w 3] with PIL's default (bicubic) filter, as the edit script's `Image.resize`."""
  from PIL import Image
  if np.shape(image)[:2] == tuple(size):
    return np.asarray(image)
  return np.asarray(Image.fromarray(np.asarray(image, np.uint8)).resize((size[1], size[0]), Image.BICUBIC))


def to_uint8(images: jax.Array | np.ndarray) -> np.ndarray:
  """[-1, 1] images -> uint8 as scripts/text2image.py: clamp(127.5 x + 128, 0, 255), truncated."""
  return np.clip(127.5 * np.asarray(images, np.float32) + 128, 0, 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class OpenUniSamplerConfig:
  steps: int = 20
  guidance: float = 4.5
  shift: float = 3.0

  def __post_init__(self):
    if self.steps < 1:
      raise ValueError(f"OpenUniSamplerConfig.steps must be >= 1, got {self.steps}")

  def scheduler(self) -> DPMSolverMultistep:
    return DPMSolverMultistep.from_config(dict(SCHEDULER, flow_shift=self.shift), self.steps)


@dataclasses.dataclass
class OpenUniPipeline:
  """A converted OpenUni: `module` (models/openuni.py), `params`, the InternVL3 tokenizer."""

  module: OpenUni
  params: Any
  tokenizer: Any
  where: str = "OpenUni"

  def __post_init__(self):
    cfg = self.module.cfg
    if self.tokenizer is not None:   # None: a pipeline driven by ids (condition_ids), as scripts/bench_openuni.py
      ctx = self.tokenizer.convert_tokens_to_ids(CONTEXT)
      if ctx != cfg.lmm.image_token_id:
        raise ValueError(f"{self.where}: the tokenizer's {CONTEXT} is {ctx}, the model's image_token_id is "
                         f"{cfg.lmm.image_token_id}")
    # compiled once per pipeline: a jit made inside a call would trace and compile again on every image
    self._condition = jax.jit(lambda p, ids, mask, pix: self.module.apply(
        {"params": p}, ids, mask, pix, method=OpenUni.condition).prompt_embeds)
    self._decode = jax.jit(lambda p, z: self.module.apply({"params": p}, z, method=OpenUni.decode))

  @property
  def cfg(self) -> OpenUniConfig:
    return self.module.cfg

  @property
  def downsample(self) -> int:
    return self.cfg.vae.spatial_downscale * self.cfg.transformer.patch_size

  @property
  def default_size(self) -> tuple[int, int]:
    """(H, W) the release generates at (512, L-1024: 1024): scripts/sample.py without --size."""
    return self.cfg.image_size, self.cfg.image_size

  def sampler_config(self, **overrides) -> OpenUniSamplerConfig:
    """The release defaults (20 steps, guidance 4.5, shift 3) with the CLI's overrides (None keeps a default)."""
    return OpenUniSamplerConfig(**{k: v for k, v in overrides.items() if v is not None})

  def read_image(self, path: str) -> np.ndarray:
    """An image file as uint8 RGB [H W 3]."""
    return vlm.read_rgb(path)

  def prompt_embeds(self, texts: Sequence[str], images: np.ndarray | None = None) -> jax.Array:
    """Prompt strings (already templated) [+ one uint8 source image per prompt] -> SANA prompt_embeds [b q k]."""
    if self.tokenizer is None:
      raise ValueError(f"{self.where}: no tokenizer; prompts need one (condition_ids takes token ids)")
    ids, mask = tokenize(self.tokenizer, texts)
    pix = None if images is None else vit_pixels(images, self.cfg.edit_size)
    return self.condition_ids(jnp.asarray(ids), jnp.asarray(mask), pix)

  def condition_ids(self, ids: jax.Array, mask: jax.Array, pixels: jax.Array | None = None) -> jax.Array:
    """Token ids / mask [b t] (right-padded) [+ InternViT pixels] -> SANA prompt_embeds [b q k]."""
    return self._condition(self.params, ids, mask, pixels)

  def sample_latents(self, cond: jax.Array, uncond: jax.Array, cfg: OpenUniSamplerConfig, latents: jax.Array, *,
                     progress: bool = False, on_step: Callable[[int, jax.Array], None] | None = None) -> jax.Array:
    """Conditional / unconditional prompt_embeds [b q k] + initial noise [b h w c] -> final latents."""
    return sana_sampling.sample_latents(
        self.module.transformer_module, self.params["transformer"], cfg.scheduler(), latents, cond,
        guidance_scale=cfg.guidance, negative_embeds=uncond, progress=progress, on_step=on_step)

  def decode(self, latents: jax.Array) -> jax.Array:
    """Final latents -> [b H W 3] in [-1, 1], not clamped (latents_to_pixels)."""
    return self._decode(self.params, latents)

  def sample(self, cond: jax.Array, uncond: jax.Array, size: tuple[int, int], cfg: OpenUniSamplerConfig, *,
             seed: int = 0, latents: jax.Array | None = None, progress: bool = False,
             on_step: Callable[[int, jax.Array], None] | None = None) -> tuple[jax.Array, np.ndarray]:
    """Conditional / unconditional prompt_embeds [b q k] -> (final latents [b h w c], uint8 images [b H W 3])."""
    shape = sana_sampling.latent_shape(self.cfg.transformer, self.cfg.vae.spatial_downscale, cond.shape[0], *size)
    if latents is None:
      latents = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
    final = self.sample_latents(cond, uncond, cfg, latents, progress=progress, on_step=on_step)
    return final, to_uint8(self.decode(final))

  def generate(self, prompts: Sequence[str], size: tuple[int, int], cfg: OpenUniSamplerConfig, *, negative: str = "",
               seed: int = 0, progress: bool = False) -> list[np.ndarray]:
    """Prompts -> uint8 images of size (H, W)."""
    n = len(prompts)
    embeds = self.prompt_embeds([t2i_prompt(p) for p in prompts] + [cfg_prompt(negative)] * n)
    _, images = self.sample(embeds[:n], embeds[n:], size, cfg, seed=seed, progress=progress)
    return list(images)

  def edit(self, images: Sequence[np.ndarray], instructions: Sequence[str], cfg: OpenUniSamplerConfig, *,
           negative: str = "", seed: int = 0, progress: bool = False) -> list[np.ndarray]:
    """uint8 source images + instructions -> edited images of default_size: the sources are resized to it first, as
    scripts/image_edit.py does with its --height / --width (the release's image size)."""
    if len(images) != len(instructions):
      raise ValueError(f"openuni edit: {len(images)} images for {len(instructions)} instructions")
    h, w = self.default_size
    srcs = np.stack([resize(i, (h, w)) for i in images])
    n, k = len(images), self.cfg.image_tokens
    texts = [edit_prompt(t, k) for t in instructions] + [edit_prompt(negative.strip() or EDIT_CFG, k)] * n
    embeds = self.prompt_embeds(texts, np.concatenate([srcs] * 2))
    _, out = self.sample(embeds[:n], embeds[n:], (h, w), cfg, seed=seed, progress=progress)
    return list(out)

  def answer(self, images: Sequence[np.ndarray], questions: Sequence[str], **kw) -> list[str]:
    """Image chat with the frozen InternVL3 (its own tiling and chat template)."""
    return self.chat().answer(images, questions, **kw)

  def chat(self) -> InternVLChat:
    lmm = self.cfg.lmm
    return InternVLChat(self.module.lmm_module, self.params["lmm"], self.tokenizer,
                        TilingProcessor(tile=lmm.tile_size), self.where)


def load(path: str) -> OpenUniPipeline:
  """A converted OpenUni directory (scripts/convert.py --openuni) with its tokenizer."""
  from unimm_jax import api
  loaded = api.load(path)
  if loaded.family != "openuni":
    raise ValueError(f"{path}: a {loaded.family!r} checkpoint, not an OpenUni one")
  if loaded.tokenizer is None:
    raise ValueError(f"{path}: no tokenizer files beside the OpenUni checkpoint")
  return OpenUniPipeline(loaded.module, loaded.params, loaded.tokenizer, path)
