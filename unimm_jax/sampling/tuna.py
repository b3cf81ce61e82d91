"""TUNA sampling: text-to-image, text-to-video and editing (Euler ODE + classifier-free guidance), understanding
of images and clips.

Reference: tuna-2 tuna/pipelines/generation.py, editing.py, understanding.py, transport/.
TUNA's time runs from 0 (noise) to 1 (clean), t = 1 - sigma of sampling/flow.py (this is the edge where the
conventions meet). `steps = N` gives N grid points t = s / (s + k - k s), s = linspace(0, 1, N) (k = shift, 3
for TUNA) -- flow.shifted_grid seen from the clean end -- hence N - 1 model evaluations. Conditional and null
branches share one batch: v = v_null + g (v_cond - v_null). An x0-predicting model (TUNA-2) is turned into
the velocity dx/dt = (x1_hat - x_t) / (1 - t) = -flow.velocity_from_clean.
Shapes: n images, N = h * w image tokens, o values per token, b rows of the batched branches.
Not matched yet: the reference samples its pixel variants (TUNA-2, TUNA-R) with jit_utils.JiTSampler instead --
noise * noise_scale (2 in its configs), grid linspace(0, 1, N + 1) without shift, 1 - t clamped at 0.05 (docs/tuna.md).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

from unimm_jax.data import packing
from unimm_jax.data import tuna_sequences as ts
from unimm_jax.models import qwen
from unimm_jax.models.tuna import Tuna
from unimm_jax.sampling import flow
from unimm_jax.sampling.text import Generation, SamplerConfig, generate_from_embeddings


# The reference pipeline's chat-template prompt path (pipelines/_common.prepare_gen_input_chat): Qwen2.5's system
# prompt, the user turn holding the prompt, the assistant turn holding the image; its null branch is the same
# conversation around this fixed negative prompt.
CHAT_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
CHAT_NEGATIVE_PROMPT = (
    "ugly, distorted, deformed, disfigured, low quality, worst quality, blurry, noisy, pixelated, overexposed, "
    "underexposed, bad anatomy, bad proportions, extra limbs, missing limbs, fused fingers, extra fingers, poorly "
    "drawn hands, poorly drawn face, asymmetrical eyes, messed up face, disfigured mouth, unnatural lighting, "
    "strange reflections, artifact, jpeg artifacts, watermark, text, subtitle, logo, frame border, over-saturated, "
    "color bleeding, unrealistic colors, low-res, low resolution, bad composition, messy background, cluttered, "
    "cropped head, cut-off body, unnatural pose, broken limbs, wrong perspective, out of frame, duplicated parts")
IMAGE_PLACEHOLDER = "<image>"


def chat_prompt(tokenizer: Any, text: str, system: str = CHAT_SYSTEM_PROMPT) -> ts.ChatPrompt:
  """`text` in the reference's chat layout: the rendered template split at the assistant's `<image>` (tokenised
  apart: `<image>` is a special token of TUNA's tokenizer, so the reference's ids around it are the same).
  Deviation: the reference first truncates the prompt to its max_text_len; we do not."""
  conversation = [{"role": "system", "content": system}, {"role": "user", "content": text},
                  {"role": "assistant", "content": IMAGE_PLACEHOLDER}]
  rendered = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=False)
  if rendered.count(IMAGE_PLACEHOLDER) != 1:
    raise ValueError(f"chat_prompt: the chat template renders {rendered.count(IMAGE_PLACEHOLDER)} "
                     f"{IMAGE_PLACEHOLDER!r} placeholders (prompt {text!r}), expected 1")
  before, after = rendered.split(IMAGE_PLACEHOLDER)
  ids = lambda part: tuple(tokenizer(part, add_special_tokens=False)["input_ids"])
  return ts.ChatPrompt(ids(before), ids(after))


@dataclasses.dataclass(frozen=True)
class FlowSamplerConfig:
  steps: int = 50
  shift: float = 3.0
  guidance: float = 7.5          # text guidance; 1 = conditional only
  image_guidance: float = 0.0    # editing: > 0 adds a branch without the source image (InstructPix2Pix style)
  # The reference's `noise_level`: 1 starts from pure noise; < 1 starts later on the grid from an init image
  # noised to that grid point (image-to-image); 0 returns the init image (start_grid).
  strength: float = 1.0

  def __post_init__(self):
    if self.steps < 2:
      raise ValueError(f"FlowSamplerConfig.steps must be >= 2 (grid points), got {self.steps}")
    if not 0.0 <= self.strength <= 1.0:
      raise ValueError(f"FlowSamplerConfig.strength must be in [0, 1], got {self.strength}")


def time_grid(steps: int, shift: float) -> np.ndarray:
  """TUNA's grid of t = 1 - sigma, from noise (0) to clean (1)."""
  return (1.0 - flow.shifted_grid(steps, shift)).astype(np.float32)


def start_grid(steps: int, shift: float, strength: float) -> np.ndarray:
  """The grid points from `strength` on: the reference's ode(noise_level=...) drops the first
  int((1 - noise_level) * steps) points of the full grid (integrators.py). Where that drops every point
  (strength 0) the reference has no grid to start from; we keep the last point t = 1, so no step is taken
  and the init image comes back unchanged."""
  return time_grid(steps, shift)[min(int((1.0 - strength) * steps), steps - 1):]


def _rows(samples: Sequence[dict], multiple: int = 16) -> tuple[list[dict], int]:
  length = -(-max(len(s["input_ids"]) for s in samples) // multiple) * multiple
  return [packing.pack_row([s], length) for s in samples], length


def _image_slots(sample: dict, span: int) -> np.ndarray:
  """Token indices of the image tokens of local span `span` (its meta slots excluded: the reference's
  v_pred[:, 1:], or [:, 3:] with aspect-ratio embeddings)."""
  return np.flatnonzero((sample["span_local"] == span) & ~sample["time_slot"])


@dataclasses.dataclass
class TunaSampler:
  """Samples a TUNA model: `module` (Tuna), its `params`, and the tokenizer's special `tokens`."""

  module: Tuna
  params: Any
  tokens: ts.TunaTokens

  @functools.cached_property
  def _forward(self):
    return jax.jit(lambda params, batch: self.module.apply({"params": params}, batch, return_logits=False).prediction)

  def _velocity_fn(self, batch: dict, slots: np.ndarray, span_of_target: np.ndarray, weights: Sequence[float]):
    """x [n N o], t -> guided velocity [n N o]; the batch holds len(weights) branches of n rows each."""
    n = slots.shape[0] // len(weights)
    rows = np.arange(slots.shape[0])[:, None]
    x0_prediction = self.module.cfg.prediction == "x0"

    def velocity(x, t):
      xs = jnp.concatenate([x] * len(weights))
      # x1 holds the clean conditioning images (an edit's source) and zeros at the generated slots.
      x_t = batch["x1"].at[rows, slots].set(xs)
      span_t = batch["span_t_clean"].at[np.arange(slots.shape[0]), span_of_target].set(t)
      pred = self._forward(self.params, {**batch, "x_t": x_t, "span_t": span_t})[rows, slots]
      if x0_prediction:
        pred = -flow.velocity_from_clean(pred, xs, 1.0 - t)
      return flow.combine([pred[i * n:(i + 1) * n] for i in range(len(weights))], weights)

    return velocity

  def _batch(self, samples: Sequence[dict]) -> dict:
    rows, _ = _rows(samples)
    max_spans = max(int(r["span_ids"].max()) for r in rows)
    b = ts.to_batch(rows, max_spans=max(max_spans, 1), token_features=self.module.cfg.token_features)
    self.module.cfg.check_grid(*np.asarray(b["spatial_shapes"]).reshape(-1, 2).max(0), "TunaSampler")
    b = {k: jnp.asarray(v) for k, v in b.items()}
    b["span_t_clean"] = jnp.ones(b["span_clean"].shape, jnp.float32)
    return b

  def _start(self, n: int, shape: tuple[int, int, int], cfg: FlowSamplerConfig, seed: int | Sequence[int],
             noise: np.ndarray | None, init: np.ndarray | None, where: str) -> tuple[jax.Array, np.ndarray]:
    """The initial state [n N o] and the grid it starts on.

    noise: the initial noise [n h w o], else drawn: an int seed draws the whole batch at once (one key), a
    sequence of seeds draws request i from its own key, so an image does not depend on its batch mates.
    init: clean image tokens [n h w o] to start from at strength < 1, noised along the training path to the
    grid's first point t0: t0 init + (1 - t0) noise. (The reference's `input_latents` is assigned and never
    used, and its `reca_mode` starts from the clean latents without noise; we follow the flow's path.)"""
    h, w, o = shape
    if noise is None:
      if np.ndim(seed) == 0:
        noise = jax.random.normal(jax.random.key(int(seed)), (n, h * w, o))
      elif len(seed) != n:
        raise ValueError(f"{where}: {len(seed)} seeds for {n} requests")
      else:
        noise = jnp.stack([jax.random.normal(jax.random.key(int(s)), (h * w, o)) for s in seed])
    elif np.shape(noise) != (n, h, w, o):
      raise ValueError(f"{where}: noise of shape {np.shape(noise)}, expected {(n, h, w, o)}")
    else:
      noise = jnp.asarray(noise, jnp.float32).reshape(n, h * w, o)
    grid = start_grid(cfg.steps, cfg.shift, cfg.strength)
    if init is None:
      if cfg.strength < 1.0:
        raise ValueError(f"{where}: strength {cfg.strength} < 1 needs an init image to start from")
      return noise, grid
    if cfg.strength == 1.0:
      raise ValueError(f"{where}: an init image has no effect at strength 1 (pure noise); give strength < 1")
    if np.shape(init) != (n, h, w, o):
      raise ValueError(f"{where}: init image tokens of shape {np.shape(init)}, expected {(n, h, w, o)}")
    t0 = float(grid[0])
    return t0 * jnp.asarray(init, jnp.float32).reshape(n, h * w, o) + (1.0 - t0) * noise, grid

  def text_to_image(self, prompts: Sequence[Sequence[int] | ts.ChatPrompt], grid: tuple[int, int],
                    cfg: FlowSamplerConfig, *, negative: Sequence[int] | ts.ChatPrompt = (),
                    seed: int | Sequence[int] = 0, noise: np.ndarray | None = None, init: np.ndarray | None = None,
                    progress: bool = False) -> np.ndarray:
    """Token-id prompts (or ChatPrompts: the reference's chat layout) -> clean image tokens [n h w o] of a
    `grid` = (h, w) token grid (_start: seed, noise, init)."""
    h, w = grid
    m = self.module.cfg.meta_slots
    blank = np.zeros((h, w, self.module.cfg.token_features), np.float32)

    def make(p):
      if isinstance(p, ts.ChatPrompt):
        return ts.t2i_chat_sample(p, blank, self.tokens, meta_slots=m)
      return ts.t2i_sample(p, blank, self.tokens, meta_slots=m)

    return self._from_text(make, prompts, negative, blank.shape, cfg, seed, noise, init, progress, "text_to_image")

  def text_to_video(self, prompts: Sequence[Sequence[int]], grid: tuple[int, int, int], cfg: FlowSamplerConfig,
                    *, negative: Sequence[int] = (), seed: int | Sequence[int] = 0, noise: np.ndarray | None = None,
                    init: np.ndarray | None = None, video_markers: bool = False, progress: bool = False) -> np.ndarray:
    """Token-id prompts -> clean clip tokens [n T h w o] of a `grid` = (T, h, w) (frames, rows, columns): the
    t2i sampler over one span of T*h*w tokens, as the reference's TunaPipeline.t2i with latent_frames = T
    (noise and init [n T h w o]; _start)."""
    _check_video_slots(self.module.cfg.meta_slots, "text_to_video")
    blank = np.zeros((*grid, self.module.cfg.token_features), np.float32)
    make = lambda p: ts.t2v_sample(p, blank, self.tokens, video_markers)  # noqa: E731
    return self._from_text(make, prompts, negative, blank.shape, cfg, seed, noise, init, progress, "text_to_video")

  def _from_text(self, make: Callable[[Any], dict], prompts: Sequence[Any], negative: Any, shape: tuple[int, ...],
                 cfg: FlowSamplerConfig, seed: int | Sequence[int], noise: np.ndarray | None, init: np.ndarray | None,
                 progress: bool, where: str) -> np.ndarray:
    """Generates span 1 of `make(prompt)` (conditional) against `make(negative)` (null): tokens [n *shape]."""
    n = len(prompts)
    for name, a in (("noise", noise), ("init", init)):
      if a is not None and np.shape(a) != (n, *shape):
        raise ValueError(f"{where}: {name} of shape {np.shape(a)}, expected {(n, *shape)}")
    weights = flow.text_guidance(cfg.guidance)
    cond = [make(p) for p in prompts]
    samples = cond if len(weights) == 1 else cond + [make(negative) for _ in prompts]
    batch = self._batch(samples)
    slots = np.stack([_image_slots(s, 1) for s in samples])
    velocity = self._velocity_fn(batch, slots, np.zeros(len(samples), np.int32), weights)
    # _start sees a clip's T*h*w tokens as T*h rows of w
    flat = (int(np.prod(shape[:-2])), shape[-2], shape[-1])
    x, t_grid = self._start(n, flat, cfg, seed, None if noise is None else np.reshape(noise, (n, *flat)),
                            None if init is None else np.reshape(init, (n, *flat)), where)
    x1 = flow.euler(velocity, x, t_grid, progress)
    return np.asarray(x1).reshape(n, *shape)

  def edit(self, sources: Sequence[np.ndarray], instructions: Sequence[Sequence[int]], cfg: FlowSamplerConfig,
           *, negative: Sequence[int] = (), seed: int | Sequence[int] = 0, noise: np.ndarray | None = None,
           init: np.ndarray | None = None, progress: bool = False) -> np.ndarray:
    """Clean source image tokens [h w o] (each) + instructions -> edited image tokens [n h w o] (same grids)
    (_start: seed, noise, init; at strength < 1 without an init the edit starts from the sources)."""
    shapes = {s.shape for s in sources}
    if len(shapes) != 1:
      raise ValueError(f"edit: sources of one call must share a grid, got {sorted(shapes)}")
    blank = np.zeros_like(sources[0], np.float32)
    m = self.module.cfg.meta_slots
    full = [ts.edit_sample(s, p, blank, self.tokens, meta_slots=m) for s, p in zip(sources, instructions)]
    no_text = [ts.edit_sample(s, negative, blank, self.tokens, meta_slots=m) for s in sources]
    if cfg.image_guidance > 0:  # v = v_none + g_i (v_img - v_none) + g_t (v_full - v_img)
      none = [ts.t2i_sample(negative, blank, self.tokens, meta_slots=m) for _ in sources]
      samples = full + no_text + none
      weights = flow.image_text_guidance(cfg.guidance, cfg.image_guidance)
      spans = [2] * (2 * len(sources)) + [1] * len(sources)
    else:
      weights = flow.text_guidance(cfg.guidance)
      samples = full if len(weights) == 1 else full + no_text
      spans = [2] * len(samples)
    batch = self._batch(samples)
    slots = np.stack([_image_slots(s, k) for s, k in zip(samples, spans)])
    velocity = self._velocity_fn(batch, slots, np.asarray(spans, np.int32) - 1, weights)
    if init is None and cfg.strength < 1.0:
      init = np.stack(sources)
    x, t_grid = self._start(len(sources), sources[0].shape, cfg, seed, noise, init, "edit")
    x1 = flow.euler(velocity, x, t_grid, progress)
    h, w, o = sources[0].shape
    return np.asarray(x1).reshape(len(sources), h, w, o)

  def understand(self, images: Sequence[np.ndarray], prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 sampler: SamplerConfig = SamplerConfig(), stop_tokens: Sequence[int] = (), seed: int = 0,
                 on_step: Callable[[Any], None] | None = None, video_markers: bool = False) -> Generation:
    """Clean image tokens [h w o] (or clips [T h w o], between the video tokens with `video_markers`) + prompt
    ids -> answers, decoded with the LLM's KV cache."""
    m = self.module.cfg.meta_slots
    if any(np.ndim(img) == 4 for img in images):
      _check_video_slots(m, "understand")
    samples = [ts.understanding_prompt(img, p, self.tokens, meta_slots=m) if np.ndim(img) == 3 else
               ts.video_understanding_prompt(img, p, self.tokens, video_markers) for img, p in zip(images, prompts)]
    rows, length = _rows(samples, multiple=8)
    for r, s in zip(rows, samples):  # left-pad: move each prompt to the end of its row
      shift = length - len(s["input_ids"])
      for k, v in r.items():
        if isinstance(v, np.ndarray) and v.shape[:1] == (length,):
          r[k] = np.roll(v, shift, axis=0)
      r["attachments"] = [(o + shift, a) for o, a in r["attachments"]]
    batch = ts.to_batch(rows, max_spans=1, token_features=self.module.cfg.token_features)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    batch["span_t"] = jnp.ones((len(rows), 1), jnp.float32)
    batch["x_t"] = batch["x1"]
    embeds = self.module.apply({"params": self.params}, batch, method=Tuna.embed_inputs)
    llm = qwen.Qwen(self.module.cfg.llm)
    return generate_from_embeddings(
        llm, self.params["llm"], embeds, np.asarray(batch["segment_ids"]), span_ids=batch["span_ids"],
        max_new_tokens=max_new_tokens, sampler=sampler, stop_tokens=stop_tokens, pad_id=self.tokens.pad, seed=seed,
        on_step=on_step)


def image_to_tokens(image: np.ndarray, cfg, vae=None) -> np.ndarray:
  """[H W 3] in [-1, 1] -> image tokens [h w o] of the generated space (VAE latents or pixels); frames [F H W 3] ->
  clip tokens [T h w o] (the Wan 2.2 VAE turns F = 1 + 4k frames into T = 1 + k; pixel space T = F)."""
  p, clip = cfg.patch, np.ndim(image) == 4
  if cfg.space == "latent":
    if vae is None:
      raise ValueError("image_to_tokens: a latent-space TUNA needs its VAE (vae/ beside the checkpoint)")
    x = jnp.asarray(image)[None] if clip else jnp.asarray(image)[None, None]
    z = vae.module.apply({"params": vae.params}, x, method=type(vae.module).encode).mode()
    z = np.asarray(cfg.latent_norm(vae.config).apply(z))[0]
    z = z if clip else z[0]
  else:
    z = np.asarray(image, np.float32)
  h, w = z.shape[-3] // p, z.shape[-2] // p
  if (h * p, w * p) != z.shape[-3:-1]:
    raise ValueError(f"image_to_tokens: {z.shape[-3:-1]} is not a multiple of the patch {p}")
  return rearrange(z, "... (h p) (w q) c -> ... h w (p q c)", p=p, q=p)


def tokens_to_image(tokens: np.ndarray, cfg, vae=None) -> np.ndarray:
  """Image tokens [h w o] -> [H W 3] in [-1, 1], clip tokens [T h w o] -> frames [F H W 3] (decoded by the VAE for
  a latent-space TUNA: T latent frames are F = 1 + 4 (T - 1) frames of the Wan 2.2 VAE; pixel space F = T)."""
  clip = np.ndim(tokens) == 4
  z = rearrange(np.asarray(tokens), "... h w (p q c) -> ... (h p) (w q) c", p=cfg.patch, q=cfg.patch)
  if cfg.space == "latent":
    if vae is None:
      raise ValueError("tokens_to_image: a latent-space TUNA needs its VAE (vae/ beside the checkpoint)")
    z = cfg.latent_norm(vae.config).invert(jnp.asarray(z)[None] if clip else jnp.asarray(z)[None, None])
    z = np.asarray(vae.module.apply({"params": vae.params}, z, method=type(vae.module).decode))[0]
    z = z if clip else z[0]
  return np.clip(z, -1.0, 1.0)


def to_uint8(image: np.ndarray) -> np.ndarray:
  return np.round((np.clip(image, -1, 1) + 1) * 127.5).astype(np.uint8)


@dataclasses.dataclass
class LoadedTuna:
  sampler: TunaSampler
  cfg: Any
  tokenizer: Any
  vae: Any

  @property
  def downsample(self) -> int:
    """Pixels per image token along each side."""
    return self.cfg.patch * (self.vae.config.spatial_downscale if self.cfg.space == "latent" else 1)

  def sampler_config(self, **overrides) -> FlowSamplerConfig:
    """FlowSamplerConfig with the CLI's overrides; None keeps TUNA's default (50 steps, guidance 7.5, shift 3)."""
    return FlowSamplerConfig(**{k: v for k, v in overrides.items() if v is not None})

  def encode_text(self, text: str) -> list[int]:
    return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

  # uint8 RGB images [H W 3] in and out: what scripts and evaluators (ShapesEval) exchange.
  def read_image(self, path: str) -> np.ndarray:
    """An image file as uint8 RGB, resized to the nearest multiple of `downsample` pixels."""
    from PIL import Image
    d = self.downsample
    try:
      with Image.open(path) as im:
        img = im.convert("RGB")
    except OSError as e:
      raise ValueError(f"{path}: cannot read the image: {e}") from None
    return np.asarray(img.resize(tuple(max(d, round(s / d) * d) for s in img.size), Image.BICUBIC))

  def read_video(self, path: str, frames: int) -> np.ndarray:
    """A video file (data/video.py: GIF, MP4, ...) -> `frames` frames spread over it, uint8 [F H W 3], each resized
    as read_image."""
    from PIL import Image

    from unimm_jax.data import transforms, video
    spec = video.VideoSpec(frames)
    if self.cfg.space == "latent":
      spec.check_vae(self.vae.config.temporal_downscale, "read_video")
    try:
      clip = video.sample_frames(*video.load_video(path), spec)
    except transforms.BadImage as e:
      raise ValueError(f"cannot read the video: {e}") from None
    d = self.downsample
    size = tuple(max(d, round(s / d) * d) for s in clip.shape[2:0:-1])
    return np.stack([np.asarray(Image.fromarray(f).resize(size, Image.BICUBIC)) for f in clip])

  def to_tokens(self, image: np.ndarray) -> np.ndarray:
    return image_to_tokens(np.asarray(image, np.float32) / 127.5 - 1.0, self.cfg, self.vae)

  def to_image(self, tokens: np.ndarray) -> np.ndarray:
    return to_uint8(tokens_to_image(tokens, self.cfg, self.vae))

  def _init_tokens(self, images: Sequence[np.ndarray] | None, n: int, where: str) -> np.ndarray | None:
    """uint8 init images (one, shared by every request, or one per request) -> image tokens [n h w o]."""
    if images is None:
      return None
    if len(images) not in (1, n):
      raise ValueError(f"{where}: {len(images)} init images for {n} requests (give 1 or {n})")
    toks = np.stack([self.to_tokens(i) for i in images])
    return np.broadcast_to(toks, (n, *toks.shape[1:]))

  def generate(self, prompts: Sequence[str], size: tuple[int, int], cfg: FlowSamplerConfig, *,
               negative: str | None = None, seed: int | Sequence[int] = 0,
               init_images: Sequence[np.ndarray] | None = None, progress: bool = False,
               chat_template: bool = False) -> list[np.ndarray]:
    """Prompts -> uint8 images of `size` = (H, W) pixels, a multiple of `downsample`; at cfg.strength < 1 they
    start from `init_images` (uint8, of `size`). chat_template: the reference pipeline's chat path (its system
    prompt; the negative defaults to its CHAT_NEGATIVE_PROMPT); else raw prompts (the negative defaults to the
    empty prompt, as the reference's prepare_gen_input)."""
    d = self.downsample
    if size[0] % d or size[1] % d:
      raise ValueError(f"generate: size {size} is not a multiple of {d} pixels (one image token)")
    if init_images is not None and any(i.shape[:2] != tuple(size) for i in init_images):
      raise ValueError(f"generate: init images of {[i.shape[:2] for i in init_images]} pixels for size {size}")
    if chat_template:
      texts = [chat_prompt(self.tokenizer, p) for p in prompts]
      null = chat_prompt(self.tokenizer, CHAT_NEGATIVE_PROMPT if negative is None else negative)
    else:
      texts, null = [self.encode_text(p) for p in prompts], self.encode_text(negative or "")
    toks = self.sampler.text_to_image(texts, (size[0] // d, size[1] // d), cfg, negative=null, seed=seed,
                                      init=self._init_tokens(init_images, len(prompts), "generate"),
                                      progress=progress)
    return [self.to_image(t) for t in toks]

  def generate_video(self, prompts: Sequence[str], size: tuple[int, int], frames: int, cfg: FlowSamplerConfig, *,
                     negative: str = "", seed: int | Sequence[int] = 0, video_markers: bool = False,
                     progress: bool = False) -> list[np.ndarray]:
    """Prompts -> uint8 clips [F H W 3] of `size` = (H, W) pixels from `frames` generated (latent) frames
    (tokens_to_image: F frames once decoded)."""
    d = self.downsample
    if size[0] % d or size[1] % d or frames < 1:
      raise ValueError(f"generate_video: size {size} is not a multiple of {d} pixels (one image token) or "
                       f"frames {frames} < 1")
    toks = self.sampler.text_to_video([self.encode_text(p) for p in prompts], (frames, size[0] // d, size[1] // d),
                                      cfg, negative=self.encode_text(negative), seed=seed,
                                      video_markers=video_markers, progress=progress)
    return [self.to_image(t) for t in toks]

  def edit(self, images: Sequence[np.ndarray], instructions: Sequence[str], cfg: FlowSamplerConfig, *,
           negative: str = "", seed: int | Sequence[int] = 0, init_images: Sequence[np.ndarray] | None = None,
           progress: bool = False) -> list[np.ndarray]:
    """uint8 source images + instructions -> edited uint8 images; at cfg.strength < 1 they start from
    `init_images` (uint8, the sources' size), else from the sources."""
    toks = self.sampler.edit([self.to_tokens(i) for i in images], [self.encode_text(t) for t in instructions], cfg,
                             negative=self.encode_text(negative), seed=seed,
                             init=self._init_tokens(init_images, len(images), "edit"), progress=progress)
    return [self.to_image(t) for t in toks]

  def answer(self, images: Sequence[np.ndarray], questions: Sequence[str], *, max_new_tokens: int = 32,
             sampler: SamplerConfig = SamplerConfig(), seed: int = 0,
             on_step: Callable[[Any], None] | None = None) -> list[str]:
    """uint8 images + questions (raw text, no chat template) -> decoded answers."""
    out = self.sampler.understand([self.to_tokens(i) for i in images], [self.encode_text(q) for q in questions],
                                  max_new_tokens=max_new_tokens, sampler=sampler,
                                  stop_tokens=[self.sampler.tokens.eos], seed=seed, on_step=on_step)
    return [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in out.as_lists()]


  def answer_video(self, clips: Sequence[np.ndarray], questions: Sequence[str], *, max_new_tokens: int = 32,
                   sampler: SamplerConfig = SamplerConfig(), seed: int = 0,
                   on_step: Callable[[Any], None] | None = None, video_markers: bool = False) -> list[str]:
    """uint8 clips [F H W 3] + questions (raw text) -> decoded answers (the vmmu layout)."""
    out = self.sampler.understand([self.to_tokens(c) for c in clips], [self.encode_text(q) for q in questions],
                                  max_new_tokens=max_new_tokens, sampler=sampler,
                                  stop_tokens=[self.sampler.tokens.eos], seed=seed, on_step=on_step,
                                  video_markers=video_markers)
    return [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in out.as_lists()]


def load(path: str) -> LoadedTuna:
  """A converted TUNA directory (unimm_jax.load) with its tokenizer and, for latent TUNA, its vae/."""
  from unimm_jax import api
  from unimm_jax.convert import tuna as tuna_convert
  loaded = api.load(path)
  if loaded.family != "tuna":
    raise ValueError(f"{path}: a {loaded.family!r} checkpoint, not a TUNA one")
  if loaded.tokenizer is None:
    raise ValueError(f"{path}: no tokenizer files beside the TUNA checkpoint")
  vae = tuna_convert.load_vae(path)
  if loaded.config.space == "latent" and vae is None:
    raise ValueError(f"{path}: latent-space TUNA without its VAE directory {path}/vae")
  sampler = TunaSampler(loaded.module, loaded.params, ts.TunaTokens.from_tokenizer(loaded.tokenizer))
  return LoadedTuna(sampler, loaded.config, loaded.tokenizer, vae)


def _check_video_slots(meta_slots: int, where: str) -> None:
  """Clips open with the time slot alone: the reference has no aspect-ratio slots for video (its t2v configs
  leave add_aspect_ratio_embeds off), so a model with them has no defined clip layout."""
  if meta_slots != 1:
    raise NotImplementedError(f"TunaSampler.{where}: clips with TunaConfig.aspect_ratio_embeds (height and width "
                              "slots) are not supported")
