"""Ovis-U1 sampling: the original's shifted schedule, Euler steps over the Yak velocity with text CFG
(text-to-image) or three-branch image / text guidance (editing), the VAE condition of an edit, and the decode
to uint8 (YakModel.get_schedule / denoise / edit_denoise / compute_vae_encodings, README 4.6); and the pipeline
behind scripts/sample.py, edit.py and chat.py (OvisU1Pipeline: test_txt_to_img.py, test_img_edit.py,
test_img_to_txt.py of AIDC-AI/Ovis-U1 with the Qwen3ConversationFormatter, README 4.1 / 4.2).

Conventions (sampling/flow.py): t = 1 is noise; the Euler step is x += (t_next - t_cur) v. Latents are NHWC
here; the tokens are FLUX's 2x2 packing (feature = c*4 + dy*2 + dx, tokens row-major), ids (0, y, x) for the
noise and (1, y, x) for the edit condition. Shapes: b batch, n noise tokens, m condition tokens, T text tokens.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from unimm_jax.data.qwen_vl import QwenVLImageProcessor
from unimm_jax.models import ovis_u1, qwen
from unimm_jax.models.flux import image_ids, pack_latents, unpack_latents
from unimm_jax.models.yak import YakConfig
from unimm_jax.sampling import flow, vlm
from unimm_jax.sampling.text import SamplerConfig

SHIFT_TOKENS = (256, 4096)   # token counts at which mu = base_shift and mu = max_shift


def schedule(steps: int, noise_tokens: int, cfg: YakConfig) -> np.ndarray:
  """steps + 1 times from 1 to 0; with timestep_shift, t' = e^mu t / (1 + (e^mu - 1) t) (= the original's
  e^mu / (e^mu + 1/t - 1)), mu linear in the count of NOISE tokens (256 -> base_shift, 4096 -> max_shift)."""
  if steps < 1:
    raise ValueError(f"ovis_u1 schedule: steps must be >= 1, got {steps}")
  grid = np.linspace(1.0, 0.0, steps + 1, dtype=np.float64)
  if not cfg.timestep_shift:
    return grid
  (x1, x2), (y1, y2) = SHIFT_TOKENS, (cfg.base_shift, cfg.max_shift)
  mu = y1 + (noise_tokens - x1) * (y2 - y1) / (x2 - x1)
  return flow.shift_sigmas(grid, math.exp(mu))


@dataclasses.dataclass(frozen=True)
class Branch:
  """One forward of a guided step: the LLM condition txt [b T k] and, for edit, condition tokens [b m c]."""

  txt: jax.Array
  cond: jax.Array | None = None


@dataclasses.dataclass
class Trajectory:
  times: np.ndarray        # [steps] t of each step's forward
  x: list                  # steps x [b n c]: tokens at the start of each step (x[0] = packed noise)
  velocities: list         # steps x [branches] x [b n c]: each branch's velocity
  final: jax.Array         # [b n c] after the last step


def _batched_calls(branches: Sequence[Branch]) -> list[tuple[list[int], jax.Array, jax.Array | None, jax.Array]]:
  """Branches grouped by whether they carry condition tokens -> per group (branch indices, text conditions
  right-padded to the longest [k*b T k'], the condition tokens or None, the text mask [k*b T])."""
  groups: dict[bool, list[int]] = {}
  for i, br in enumerate(branches):
    groups.setdefault(br.cond is None, []).append(i)
  calls = []
  for members in groups.values():
    t = max(branches[i].txt.shape[1] for i in members)
    pad = lambda a: jnp.pad(a, ((0, 0), (0, t - a.shape[1]), (0, 0)))  # noqa: E731
    txt = jnp.concatenate([pad(branches[i].txt) for i in members])
    mask = jnp.concatenate([jnp.broadcast_to(jnp.arange(t) < branches[i].txt.shape[1], branches[i].txt.shape[:1] + (t,))
                            for i in members]).astype(jnp.int32)
    cond = None if branches[members[0]].cond is None else jnp.concatenate([branches[i].cond for i in members])
    calls.append((members, txt, cond, mask))
  return calls


class OvisImageSampler:
  """Euler over the decoder of a loaded OvisU1 (module + params); one jitted velocity for every branch."""

  def __init__(self, model: ovis_u1.OvisU1, params: Any):
    self.model, self.params, self.cfg = model, params, model.cfg
    self._velocity = jax.jit(lambda p, *a: model.apply({"params": p}, *a, method=ovis_u1.OvisU1.velocity))
    self._decode = jax.jit(lambda p, z: model.apply({"params": p}, z, method=lambda m, z: m.vae.decode(z)))
    self._encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=lambda m, x: m.vae.encode(x)))

  def sample(self, noise: jax.Array, branches: Sequence[Branch], weights: Sequence[float], grid: np.ndarray,
             on_step: Callable[[int], None] | None = None, batch_branches: bool = False) -> Trajectory:
    """noise [b h w z] latents -> the guided Euler trajectory: v = sum_i weights[i] v(branch i)
    (flow.text_guidance, flow.image_text_guidance). One forward per branch in branch order, as the original;
    batch_branches: one forward for all branches with the same condition-token layout (with / without the
    edit's VAE tokens), their text conditions padded to one length and masked (the same numbers)."""
    if len(branches) != len(weights):
      raise ValueError(f"ovis_u1 sample: {len(branches)} branches for {len(weights)} guidance weights")
    b, h, w, _ = noise.shape
    x = pack_latents(noise.astype(jnp.float32))
    ids = jnp.asarray(image_ids(h, w))
    cond_ids = jnp.asarray(image_ids(h, w, frame=1))
    calls = _batched_calls(branches) if batch_branches else [
        ([i], br.txt, br.cond, None) for i, br in enumerate(branches)]
    xs, vs = [], []
    for i in range(len(grid) - 1):
      outs = [None] * len(branches)
      for members, txt, cond, mask in calls:
        k = len(members)
        v = self._velocity(self.params, jnp.concatenate([x] * k), ids, txt, jnp.full((k * b,), grid[i], jnp.float32),
                           cond, None if cond is None else cond_ids, mask)
        for j, m in enumerate(members):
          outs[m] = v[j * b:(j + 1) * b]
      xs.append(x), vs.append(outs)
      x = x + float(grid[i + 1] - grid[i]) * flow.combine(outs, weights)
      if on_step is not None:
        on_step(i)
    return Trajectory(np.asarray(grid[:-1], np.float32), xs, vs, x)

  def vae_condition(self, pixels: jax.Array, eps: jax.Array | None = None, rng: jax.Array | None = None) -> jax.Array:
    """Edit condition tokens [b m c] of source pixels [b H W 3] in [-1, 1]: pack(sample * scaling_factor), the
    sample mean + std eps (eps given, or drawn from rng; the original draws it; neither: the mean)."""
    post = self._encode(self.params, pixels)
    if eps is None and rng is not None:
      eps = jax.random.normal(rng, post.mean.shape, post.mean.dtype)
    z = post.mean if eps is None else post.mean + post.std * eps
    vae = self.cfg.vae
    return pack_latents((z - (vae.shift_factor or 0.0)) * vae.scaling_factor)   # the release has no shift

  def decode(self, tokens: jax.Array, height: int, width: int) -> tuple[jax.Array, np.ndarray]:
    """Final tokens of a height x width latent -> (raw decoder output [b H W 3], uint8 image [b H W 3]):
    unpack / scaling_factor -> vae.decode -> clamp -> floor(127.5 (x + 1)) (the original truncates)."""
    vae = self.cfg.vae
    z = unpack_latents(tokens, height, width) / vae.scaling_factor + (vae.shift_factor or 0.0)
    raw = self._decode(self.params, z)
    pixels = np.floor(127.5 * (np.clip(np.asarray(raw, np.float32), -1, 1) + 1)).astype(np.uint8)
    return raw, pixels


# ----------------------------------------------------------------------------------------------
# The pipeline: prompts, images, the three uses (README 4.1, 4.2, 4.6)
# ----------------------------------------------------------------------------------------------

USER_TURN = "<|im_start|>user\n{}<|im_end|>\n"
SYSTEM_TURN = "<|im_start|>system\n{}<|im_end|>\n"
THINK_PREFILL = "<|im_start|>assistant\n<think>\n\n</think>\n\n"   # understanding: the empty-think assistant turn
T2I = ("<image>\nDescribe the image by detailing the color, shape, size, texture, quantity, text, and spatial "
       "relationships of the objects:{}")
UNCOND = "<image>\nGenerate an image."
EDIT = "<image>\n{}"
RELEASE_SIZE = (1024, 1024)   # test_txt_to_img.py's --height / --width
EDIT_FACTOR = 32              # test_img_edit.py: the edit canvas is smart_resize(h, w, factor=32)


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
  """Aimv2VisualTokenizer.smart_resize: transformers' qwen2_vl rule, except that a side under `factor` first
  scales the image up to it (rounded), an aspect ratio over 200 is clipped to 200, and nothing clamps the
  rounded-down sides to `factor` (data/qwen_vl.smart_resize raises in those cases instead)."""
  if min(height, width) <= 0:
    raise ValueError(f"ovis_u1 smart_resize: image of {height}x{width} pixels has no pixels")
  if height < factor or width < factor:
    if height < width:
      height, width = factor, round(factor / height * width)
    else:
      height, width = round(factor / width * height), factor
  elif max(height, width) / min(height, width) > 200:
    height, width = (200 * width, width) if height > width else (height, 200 * height)
  h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt(height * width / max_pixels)
    h_bar, w_bar = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
  if not h_bar or not w_bar:
    raise ValueError(f"ovis_u1 smart_resize: {height}x{width} pixels round to nothing at max_pixels={max_pixels}")
  return h_bar, w_bar


@dataclasses.dataclass(frozen=True)
class OvisImageProcessor(QwenVLImageProcessor):
  """The visual tokenizer's preprocess_image: the Qwen2-VL patch layout with temporal patch 1, CLIP mean / std,
  PIL bicubic, sizes by the tokenizer's own smart_resize (factor patch x hidden_stride)."""

  temporal_patch: int = 1

  @classmethod
  def from_hf(cls, d: Mapping[str, Any]) -> "OvisImageProcessor":
    """preprocessor_config.json of the release (a CLIPImageProcessor with min / max pixels, hidden_stride)."""
    base = QwenVLImageProcessor.from_hf({**d, "merge_size": d.get("hidden_stride", 2)})
    return cls(**{**dataclasses.asdict(base), "temporal_patch": d.get("temporal_patch_size", 1)})

  def size_for(self, height: int, width: int) -> tuple[int, int]:
    return smart_resize(height, width, self.patch * self.merge, self.min_pixels, self.max_pixels)


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """uint8 [H W 3] -> [height width 3], PIL bicubic (PIL's Image.resize default and torchvision's BICUBIC on a
  PIL image); the same size is returned as it is (PIL copies)."""
  if image.shape[:2] == (height, width):
    return image
  return np.asarray(Image.fromarray(np.asarray(image, np.uint8)).resize((width, height), Image.Resampling.BICUBIC))


def cover_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """YakModel.process_image_aspectratio: scale so the image covers height x width (sides truncated by int()),
  then a center crop (torchvision: the top / left offset int(round(excess / 2)))."""
  h, w = image.shape[:2]
  r = max(width / w, height / h)
  rh, rw = int(r * h), int(r * w)
  if rh < height or rw < width:
    raise ValueError(f"ovis_u1: a {h}x{w} image scales to {rh}x{rw}, short of the {height}x{width} canvas")
  out = resize(image, rh, rw)
  top, left = int(round((rh - height) / 2.0)), int(round((rw - width) / 2.0))
  return out[top:top + height, left:left + width]


def vae_pixels(canvas: np.ndarray) -> np.ndarray:
  """uint8 canvas [H W 3] -> VAE input [1 H W 3] in [-1, 1] (to_tensor, then normalize by 0.5 / 0.5)."""
  return ((np.asarray(canvas, np.float32)[None] / np.float32(255)) - np.float32(0.5)) / np.float32(0.5)


def blank(height: int, width: int) -> np.ndarray:
  """The white image the original feeds the visual tokenizer for text-to-image and the edit's null branch."""
  return np.full((height, width, 3), 255, np.uint8)


def tokenizer_image(canvas: np.ndarray, processor: OvisImageProcessor) -> np.ndarray:
  """The generation scripts' build_inputs: the canvas resized to smart_resize(h, w, max_pixels = the
  processor's min_pixels) before the processor's own resize."""
  h, w = smart_resize(*canvas.shape[:2], max_pixels=processor.min_pixels)
  return resize(canvas, h, w)


def prompt_ids(tokenizer: Any, text: str, *, answer: bool, system: str | None = None) -> list[int]:
  """Qwen3ConversationFormatter: the user turn (after an optional system turn), with the empty-think assistant
  prefill for understanding (generation_preface '') or none for generation (generation_preface None); the text
  split at every `<image>`, each piece tokenized alone without special tokens, `<image>` -> [-301, -300, -302]."""
  full = (SYSTEM_TURN.format(system) if system else "") + USER_TURN.format(text) + (THINK_PREFILL if answer else "")
  ids: list[int] = []
  for i, piece in enumerate(full.split(vlm.IMAGE)):
    if i:
      ids += list(ovis_u1.IMAGE_PLACEHOLDER)
    if piece:
      ids += list(tokenizer(piece, add_special_tokens=False)["input_ids"])
  return ids


@dataclasses.dataclass(frozen=True)
class OvisSamplerConfig:
  steps: int = 50                   # Euler steps (forwards per branch)
  guidance: float | None = None     # text guidance; None: the release's (5 text-to-image, 6 edit)
  image_guidance: float = 1.5       # edit only
  shift: float | None = None        # None: the release's shift, e^mu with mu linear in the noise tokens
  batch_branches: bool = True       # one forward for the guidance branches (False: one each, as the original)

  def __post_init__(self):
    if self.steps < 1:
      raise ValueError(f"OvisSamplerConfig.steps must be >= 1, got {self.steps}")
    if self.shift is not None and self.shift <= 0:
      raise ValueError(f"OvisSamplerConfig.shift must be > 0, got {self.shift}")

  def text_scale(self, edit: bool) -> float:
    return self.guidance if self.guidance is not None else (6.0 if edit else 5.0)

  def grid(self, noise_tokens: int, cfg: YakConfig) -> np.ndarray:
    if self.shift is None:
      return schedule(self.steps, noise_tokens, cfg)
    return flow.shift_sigmas(np.linspace(1.0, 0.0, self.steps + 1, dtype=np.float64), self.shift)


@dataclasses.dataclass
class OvisU1Pipeline:
  """A converted Ovis-U1 directory: `module` (models/ovis_u1.OvisU1, every part), `params`, the Qwen3
  tokenizer and the visual tokenizer's image processor."""

  module: ovis_u1.OvisU1
  params: Any
  tokenizer: Any
  processor: OvisImageProcessor = OvisImageProcessor()
  where: str = "Ovis-U1"
  max_images_per_prompt: ClassVar[int | None] = None
  answers_text: ClassVar[bool] = True
  default_size: ClassVar[tuple[int, int]] = RELEASE_SIZE

  def __post_init__(self):
    if self.processor.merge != self.cfg.vision.merge or self.processor.patch != self.cfg.vision.patch:
      raise ValueError(f"{self.where}: preprocessor_config.json patch {self.processor.patch} / hidden_stride "
                       f"{self.processor.merge} != the model's {self.cfg.vision.patch} / {self.cfg.vision.merge}")
    module = self.module
    self.sampler = OvisImageSampler(module, self.params)
    self._condition = jax.jit(lambda p, ids, vision: module.apply({"params": p}, ids, vision,
                                                                  method=ovis_u1.OvisU1.condition))
    self._embed = jax.jit(lambda p, ids, vision: module.apply({"params": p}, ids, vision, method=ovis_u1.OvisU1.embed))
    self.decoder = qwen.Qwen(self.cfg.llm)

  @property
  def cfg(self) -> ovis_u1.OvisU1Config:
    return self.module.cfg

  @property
  def downsample(self) -> int:
    """Pixels per latent token (VAE factor x the 2x2 packing): sizes are multiples of it."""
    return self.cfg.vae.spatial_downscale * 2

  def sampler_config(self, **overrides) -> OvisSamplerConfig:
    """The release's defaults (50 steps, text guidance 5 / edit 6, image guidance 1.5, its shift) with the CLI's
    overrides (None keeps a default)."""
    return OvisSamplerConfig(**{k: v for k, v in overrides.items() if v is not None})

  def read_image(self, path: str) -> np.ndarray:
    return vlm.read_rgb(path)

  # -- conditions ---------------------------------------------------------------------------------

  def vision(self, images: Sequence[np.ndarray]) -> tuple[ovis_u1.VisionInputs | None, tuple[int, ...]]:
    """uint8 images -> packed NaViT rows and each image's visual-token count (preprocess_image per image)."""
    if not images:
      return None, ()
    patches, grids = zip(*(self.processor(np.asarray(i, np.uint8)) for i in images))
    return ovis_u1.prepare_vision(np.concatenate(patches), grids, self.cfg)

  def tokenizer_image(self, canvas: np.ndarray) -> np.ndarray:
    return tokenizer_image(canvas, self.processor)

  def condition(self, text: str, canvas: np.ndarray) -> jax.Array:
    """A generation prompt ("<image>\\n..." with one image, no assistant turn) and its canvas [h w 3] -> the
    decoder's condition [1 T 2d] (generate_condition, one prompt per call: the refiner averages every position)."""
    vision, counts = self.vision([self.tokenizer_image(canvas)])
    ids = vlm.expand_placeholders(prompt_ids(self.tokenizer, text, answer=False), ovis_u1.IMAGE_ATOM_ID, counts,
                                  self.where)
    return self._condition(self.params, jnp.asarray([ids], jnp.int32), vision)

  # -- images -------------------------------------------------------------------------------------

  def noise(self, size: tuple[int, int], seed: int) -> jax.Array:
    """N(0, 1) latents [1 h/8 w/8 z] (the original draws bf16 noise on its device; any draw is one)."""
    f = self.cfg.vae.spatial_downscale
    return jax.random.normal(jax.random.key(seed), (1, size[0] // f, size[1] // f, self.cfg.vae.latent_channels))

  def _check_size(self, size: tuple[int, int]) -> None:
    if size[0] % self.downsample or size[1] % self.downsample or min(size) <= 0:
      raise ValueError(f"{self.where}: image size {size[0]}x{size[1]} must be positive multiples of "
                       f"{self.downsample} pixels (one latent token)")

  def _run(self, branches: list[Branch], weights: Sequence[float], size: tuple[int, int], cfg: OvisSamplerConfig,
           seed: int, progress: bool) -> np.ndarray:
    noise = self.noise(size, seed)
    grid = cfg.grid(noise.shape[1] * noise.shape[2] // 4, self.cfg.generator)
    bar, on_step = None, None
    if progress:
      from tqdm import tqdm
      bar = tqdm(total=len(grid) - 1, desc="sample", unit="step")
      on_step = lambda i: bar.update(1)  # noqa: E731
    # guidance 1 has one weight (flow.text_guidance): the conditional branch, first, runs alone
    out = self.sampler.sample(noise, branches[:len(weights)], weights, grid, on_step=on_step,
                              batch_branches=cfg.batch_branches)
    if bar is not None:
      bar.close()
    return self.sampler.decode(out.final, *noise.shape[1:3])[1][0]

  def generate(self, prompts: Sequence[str], size: tuple[int, int], cfg: OvisSamplerConfig, *, negative: str = "",
               seed: int = 0, progress: bool = False) -> list[np.ndarray]:
    """test_txt_to_img.py: per prompt the describe-prefixed caption and the null prompt "Generate an image."
    (or `negative`), both with a white image of the output size; text CFG; each image from the noise of `seed`."""
    self._check_size(size)
    canvas = blank(*size)
    uncond = self.condition(EDIT.format(negative.strip()) if negative.strip() else UNCOND, canvas)
    weights = flow.text_guidance(cfg.text_scale(edit=False))
    return [self._run([Branch(self.condition(T2I.format(p), canvas)), Branch(uncond)], weights, size, cfg, seed,
                      progress) for p in prompts]

  def edit(self, images: Sequence[np.ndarray], instructions: Sequence[str], cfg: OvisSamplerConfig, *,
           negative: str = "", seed: int = 0, progress: bool = False) -> list[np.ndarray]:
    """test_img_edit.py: the canvas smart_resize(h, w, factor 32) of the source, the source resized to it; the
    branches (instruction + source + its VAE tokens), ("Generate an image." + source + VAE tokens), ("Generate an
    image." + white image, no VAE tokens), image / text guidance. The VAE tokens are a posterior sample, as the
    original draws (from `seed`)."""
    if len(images) != len(instructions):
      raise ValueError(f"{self.where} edit: {len(images)} images for {len(instructions)} instructions")
    null = EDIT.format(negative.strip()) if negative.strip() else UNCOND
    weights = flow.image_text_guidance(cfg.text_scale(edit=True), cfg.image_guidance)
    out = []
    for image, instruction in zip(images, instructions):
      image = np.asarray(image, np.uint8)
      size = smart_resize(*image.shape[:2], factor=EDIT_FACTOR)
      canvas = cover_crop(resize(image, *size), *size)
      vae_cond = self.sampler.vae_condition(jnp.asarray(vae_pixels(canvas)), rng=jax.random.key(seed + 1))
      branches = [Branch(self.condition(EDIT.format(instruction.strip()), canvas), vae_cond),
                  Branch(self.condition(null, canvas), vae_cond), Branch(self.condition(UNCOND, blank(*size)))]
      out.append(self._run(branches, weights, size, cfg, seed, progress))
    return out

  # -- chat ---------------------------------------------------------------------------------------

  def answer(self, images: Sequence[np.ndarray | Sequence[np.ndarray]], questions: Sequence[str], *,
             max_new_tokens: int = 128, sampler: SamplerConfig = SamplerConfig(), seed: int = 0,
             system: str | None = None, on_step: Callable[[Any], None] | None = None) -> list[str]:
    """Per question an image, a list of images (at its `<image>` markers, else before the text) or none ->
    the answers: the understanding prompt with the empty-think prefill, KV-cached decoding to <|im_end|>
    (greedy by default, as test_img_to_txt.py)."""
    if len(images) != len(questions):
      raise ValueError(f"{self.where} answer: {len(images)} image entries for {len(questions)} questions")
    per = [[] if i is None else list(i) if isinstance(i, (list, tuple)) else [i] for i in images]
    flat = [np.asarray(i, np.uint8) for p in per for i in p]
    vision, counts = self.vision(flat)
    prompts, k = [], 0
    for q, p in zip(questions, per):
      ids = prompt_ids(self.tokenizer, vlm.place_images(q, len(p), self.where) if p else q, answer=True,
                       system=system)
      prompts.append(vlm.expand_placeholders(ids, ovis_u1.IMAGE_ATOM_ID, counts[k:k + len(p)], self.where))
      k += len(p)
    pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
    out = vlm.generate_with_images(self.decoder, self.params["llm"], lambda ids: self._embed(self.params, ids, vision),
                                   prompts, pad_id=pad, max_new_tokens=max_new_tokens, sampler=sampler,
                                   stop=vlm.stop_tokens(self.tokenizer), seed=seed, on_step=on_step)
    return [self.tokenizer.decode(t, skip_special_tokens=True) for t in out.as_lists()]


def load(path: str) -> OvisU1Pipeline:
  """A converted Ovis-U1 directory (scripts/convert.py --src RELEASE) with its tokenizer and
  preprocessor_config.json."""
  from unimm_jax import api
  loaded = api.load(path)
  if loaded.family != "ovis_u1":
    raise ValueError(f"{path}: a {loaded.family!r} checkpoint, not an Ovis-U1 one")
  if loaded.tokenizer is None:
    raise ValueError(f"{path}: no tokenizer files beside the Ovis-U1 checkpoint")
  pre = os.path.join(path, "preprocessor_config.json")
  if not os.path.isfile(pre):
    raise ValueError(f"{path}: no preprocessor_config.json (the visual tokenizer's pixel budget)")
  with open(pre) as f:
    processor = OvisImageProcessor.from_hf(json.load(f))
  return OvisU1Pipeline(loaded.module, loaded.params, loaded.tokenizer, processor, path)
