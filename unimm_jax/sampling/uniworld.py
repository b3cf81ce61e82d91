"""UniWorld-V1 text-to-image, editing and image chat: the steps of the original's univa/serve/cli.py.

Reference: PKU-YuanGroup/UniWorld-V1 univa/serve/cli.py (chat text, the system-turn drop, the task-head route,
the [t5, vlm] join, update_size), univa/utils/anyres_util.py (dynamic_resize), univa/utils/flux_pipeline.py
(= diffusers' FluxPipeline: sampling/flux.py).

Train/infer asymmetry, reproduced on purpose: both released stages were trained with `drop_t5_rate: 1.0`
(train_denoiser.py deletes T5 and CLIP: no T5 tokens, pooled vector = CLIP("")), but cli.py samples with the T5
embeddings of the prompt in front of the VLM's and the CLIP pooled vector of the prompt, and that is what the
released numbers were measured with. `load(..., t5=False)` samples as trained (= cli.py --no_joint_with_t5: no T5
tokens, CLIP("") pooled); training/uniworld_task.py trains as the yamls do.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from unimm_jax.data.qwen_vl import QwenVLImageProcessor
from unimm_jax.models import flux, qwen_vl, uniworld
from unimm_jax.sampling import vlm
from unimm_jax.sampling.flux import FluxSampler, FluxSamplerConfig
from unimm_jax.sampling.qwen_vl import QwenVLChat

SYSTEM_END = "<|im_end|>\n"


def chat_text(tokenizer: Any, instruction: str, images: int, chat_template: str | None = None) -> str:
  """cli.py's user turn [text, images...] (text first), apply_chat_template(add_generation_prompt=True), then
  everything up to the first `<|im_end|>\\n` (the default system turn the template inserts) dropped."""
  content = [{"type": "text", "text": instruction}] + [{"type": "image"}] * images
  text = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                       tokenize=False, chat_template=chat_template)
  return SYSTEM_END.join(text.split(SYSTEM_END)[1:])


def prompt_ids(tokenizer: Any, cfg: uniworld.UniWorldConfig, instruction: str, image_tokens: Sequence[int],
               chat_template: str | None = None) -> list[int]:
  """Token ids of the chat text, each `<|image_pad|>` expanded to its image's merged-token count."""
  ids = tokenizer(chat_text(tokenizer, instruction, len(image_tokens), chat_template))["input_ids"]
  return vlm.expand_placeholders(ids, cfg.vlm.image_token_id, image_tokens, f"prompt {instruction[:40]!r}")


def assistant_index(ids: Sequence[int], tokenizer: Any) -> int:
  """Position of the token the task head reads: cli.py takes the hidden state of the last `assistant` token (id
  77091 in Qwen2.5's vocabulary). The tokenizer says which piece(s) `assistant` is; when a vocabulary splits it
  (tiny BPEs), the last piece of its last occurrence is read, the one that has seen the whole word."""
  pieces = list(tokenizer("assistant", add_special_tokens=False)["input_ids"])
  ids, n = list(ids), len(pieces)
  for end in range(len(ids), n - 1, -1):
    if ids[end - n:end] == pieces:
      return end - 1
  raise ValueError(f"assistant_index: the prompt holds no `assistant` token(s) {pieces} (the chat template's "
                   "generation prompt); the task head reads that position")


def siglip_pixels(image: np.ndarray, size: tuple[int, int], mean: Sequence[float] = (0.5, 0.5, 0.5),
                  std: Sequence[float] = (0.5, 0.5, 0.5)) -> np.ndarray:
  """SiglipImageProcessor: uint8 RGB [H W 3] -> PIL bilinear resize to size = (h, w), x / 255, (x - mean) / std,
  as [h w 3] float32."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"siglip_pixels: expected uint8 RGB [H W 3], got {image.dtype} {image.shape}")
  resized = np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR), np.float32) / 255.0
  return ((resized - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).astype(np.float32)


def join_t5(t5_embeds, vlm_embeds):
  """FLUX's text stream as cli.py builds it: cat([T5 embeddings, VLM embeddings]) along the tokens (txt_ids are
  all 0 and no mask is used, so the order changes nothing but float rounding)."""
  if t5_embeds.shape[0] != vlm_embeds.shape[0] or t5_embeds.shape[-1] != vlm_embeds.shape[-1]:
    raise ValueError(f"join_t5: T5 embeddings {tuple(t5_embeds.shape)} and VLM embeddings "
                     f"{tuple(vlm_embeds.shape)} differ in batch or width")
  return jnp.concatenate([jnp.asarray(t5_embeds, vlm_embeds.dtype), vlm_embeds], axis=1)


# any_11ratio of univa/utils/anyres_util.py: (w, h) ratios cli.py's update_size picks from for edits
RATIOS = ((16, 9), (9, 16), (7, 5), (5, 7), (5, 4), (4, 5), (4, 3), (3, 4), (3, 2), (2, 3), (1, 1))


def dynamic_resize(height: int, width: int, anchor_pixels: int = 1024 * 1024, stride: int = 32) -> tuple[int, int]:
  """The output (H, W) of an edit: the closest of RATIOS, base ratio * stride, scaled by
  round(sqrt(anchor / base area)), as anyres_util.dynamic_resize."""
  rw, rh = min(RATIOS, key=lambda r: abs(r[0] / r[1] - width / height))
  scale = round(math.sqrt(anchor_pixels / (rh * stride * rw * stride)))
  return rh * stride * scale, rw * stride * scale


def edit_size(images: Sequence[np.ndarray], anchor_pixels: int = 1024 * 1024) -> tuple[int, int]:
  """update_size: dynamic_resize of the reference images' mean height and width (int-truncated)."""
  h = sum(im.shape[0] for im in images) / len(images)
  w = sum(im.shape[1] for im in images) / len(images)
  return dynamic_resize(int(h), int(w), anchor_pixels)


@dataclasses.dataclass
class UniWorldPipeline:
  """A converted UniWorld directory: the model, the Qwen2.5-VL tokenizer and processor, FLUX's sampler and VAE,
  and the T5 / CLIP text encoders of FLUX's conditioning (what scripts/sample.py, edit.py and chat.py drive)."""

  module: uniworld.UniWorld
  params: Any
  tokenizer: Any
  chat_template: str | None
  processor: QwenVLImageProcessor
  flux: FluxSampler
  clip: Any                   # api.Loaded of clip/ (its pooled output -> pooled_projections)
  clip_tokenizer: Any
  t5: Any = None              # api.Loaded of t5/; None samples as trained (no T5 tokens)
  t5_tokenizer: Any = None
  t5_len: int = 256           # cli.py's max_sequence_length (the eval scripts use 512)
  clip_len: int = 77          # FluxPipeline's CLIP tokenizer max_length
  anchor_pixels: int = 1024 * 1024
  downsample: int = 16        # a multiple of the VAE's 8 x the 2x2 packing
  default_size: ClassVar[tuple[int, int]] = (1024, 1024)   # cli.py's --height / --width
  answers_text: ClassVar[bool] = True
  max_images_per_prompt: ClassVar[int | None] = None

  def __post_init__(self):
    module = self.module

    def embeds(params, ids, vision, positions, pixels, insertion):
      return module.apply({"params": params}, ids, vision, positions=positions, siglip_pixels=pixels,
                          insertion=insertion, method=uniworld.UniWorld.denoise_embeds)

    def route(params, ids, vision, positions, index):
      def fn(m, ids, vision, positions, index):
        return m.route(m.hidden(ids, vision, positions=positions), index)
      return module.apply({"params": params}, ids, vision, positions, index, method=fn)

    self._embeds, self._route, self._chat = jax.jit(embeds), jax.jit(route), None
    if self.t5 is not None:
      self._t5 = jax.jit(lambda p, ids: self.t5.module.apply({"params": p}, ids).last_hidden_state)
    self._clip = jax.jit(lambda p, ids: self.clip.module.apply({"params": p}, ids).pooler_output)

  @property
  def cfg(self) -> uniworld.UniWorldConfig:
    return self.module.cfg

  def sampler_config(self, steps: int | None = None, guidance: float | None = None, shift: float | None = None,
                     image_guidance: float | None = None, strength: float | None = None) -> FluxSamplerConfig:
    """FlowMatch Euler, 28 steps, distilled guidance 3.5 (cli.py); FLUX's shift is the resolution-dependent mu."""
    if shift is not None:
      raise ValueError("UniWorld: --shift is not used (FLUX shifts by the image's token count, mu)")
    if strength is not None:
      raise ValueError("UniWorld: --strength is not used (sampling starts from noise; image-to-image is a TUNA option)")
    if image_guidance:
      raise ValueError("UniWorld: --image_guidance is not used (the reference images condition through SigLIP)")
    base = FluxSamplerConfig()
    return FluxSamplerConfig(steps=steps or base.steps, guidance=base.guidance if guidance is None else guidance)

  def read_image(self, path: str) -> np.ndarray:
    return vlm.read_rgb(path)

  def _vision(self, instruction: str, images: Sequence[np.ndarray]) -> tuple[np.ndarray, dict]:
    processed = [self.processor(im) for im in images]
    m2 = self.cfg.vlm.vision.merge ** 2
    ids = np.asarray([prompt_ids(self.tokenizer, self.cfg, instruction,
                                 [g[0] * g[1] * g[2] // m2 for _, g in processed], self.chat_template)])
    kw = qwen_vl.prepare(ids, self.cfg.vlm, pixel_values=np.concatenate([p for p, _ in processed]) if processed
                         else None, image_grid_thw=[g for _, g in processed])
    return ids, kw

  def text_embeds(self, text: str) -> tuple[jax.Array | None, jax.Array]:
    """FluxPipeline.encode_prompt: T5 last hidden state over t5_len padded tokens and the CLIP pooled output over
    clip_len, both without attention masks, as FluxPipeline calls them. Without T5 (sampling as trained, cli.py
    --no_joint_with_t5) there are no T5 tokens and the pooled vector is CLIP("")."""
    def ids(tok, n, value):
      return jnp.asarray(tok([value], padding="max_length", max_length=n, truncation=True)["input_ids"])
    pooled = self._clip(self.clip.params, ids(self.clip_tokenizer, self.clip_len, text if self.t5 else ""))
    t5 = None if self.t5 is None else self._t5(self.t5.params, ids(self.t5_tokenizer, self.t5_len, text))
    return t5, pooled

  def conditioning(self, instruction: str, images: Sequence[np.ndarray] = ()) -> tuple[jax.Array, jax.Array]:
    """-> (prompt_embeds [1 T c], pooled [1 p]): cat([T5, denoise_embeds]) and CLIP's pooled vector."""
    ids, kw = self._vision(instruction, images)
    pixels = insertion = None
    if images:
      s = self.cfg.siglip
      side = s.posemb_grid * s.patch
      pixels = jnp.asarray(np.stack([siglip_pixels(im, (side, side)) for im in images]))
      insertion = uniworld.siglip_insertion(ids, self.cfg.image_end_token_id, len(images), self.cfg.siglip_tokens)
    embeds = self._embeds(self.params, ids, kw.get("vision"), kw["positions"], pixels, insertion)
    t5, pooled = self.text_embeds(instruction)
    return (embeds if t5 is None else join_t5(t5, embeds)), pooled

  def route(self, instruction: str, images: Sequence[np.ndarray] = ()) -> str:
    """The task head's choice for a prompt (cli.py): "generate" or "answer"."""
    ids, kw = self._vision(instruction, images)
    index = jnp.asarray([assistant_index(ids[0], self.tokenizer)])
    logits = np.asarray(self._route(self.params, ids, kw.get("vision"), kw["positions"], index))[0]
    return "generate" if logits[0] < logits[1] else "answer"

  def respond(self, images: Sequence[np.ndarray], prompt: str, cfg: FluxSamplerConfig, *, size: tuple[int, int],
              seed: int = 0, progress: bool = False, **answer_kw) -> str | np.ndarray:
    """One turn of cli.py: the task head routes the prompt (and its images); "answer" -> Qwen2.5-VL's text,
    "generate" -> an image of size (H, W) without images, or an edit whose pixel budget is H * W (cli.py's
    anchor_pixels = height * width) with them."""
    images = list(images)
    if self.route(prompt, images) == "answer":
      return self.answer([images], [prompt], seed=seed, **answer_kw)[0]
    out = size if not images else edit_size(images, size[0] * size[1])
    return self._sample(prompt, images, out, cfg, seed, progress)

  def _sample(self, instruction: str, images: Sequence[np.ndarray], size: tuple[int, int], cfg: FluxSamplerConfig,
              seed: int, progress: bool) -> np.ndarray:
    context, pooled = self.conditioning(instruction, images)
    out = self.flux.generate(context, pooled, cfg, size=size, seed=seed, progress=progress)
    return np.round(255 * out.images[0]).astype(np.uint8)

  def generate(self, prompts: Sequence[str], size: tuple[int, int], cfg: FluxSamplerConfig, *, negative: str = "",
               seed: int = 0, progress: bool = False) -> list[np.ndarray]:
    """Prompts -> uint8 images of size = (H, W), multiples of 16 (1024 x 1024 in the release)."""
    _no_negative(negative)
    return [self._sample(p, (), size, cfg, seed, progress) for p in prompts]

  def edit(self, images: Sequence[np.ndarray], instructions: Sequence[str], cfg: FluxSamplerConfig, *,
           negative: str = "", seed: int = 0, progress: bool = False) -> list[np.ndarray]:
    """Per instruction its reference image (or list of images) -> the edited image, sized by update_size."""
    _no_negative(negative)
    if len(images) != len(instructions):
      raise ValueError(f"UniWorld.edit: {len(instructions)} instructions for {len(images)} images")
    out = []
    for refs, text in zip(images, instructions):
      refs = [refs] if isinstance(refs, np.ndarray) else list(refs)
      out.append(self._sample(text, refs, edit_size(refs, self.anchor_pixels), cfg, seed, progress))
    return out

  def answer(self, images: Sequence[Any], questions: Sequence[str], **kw) -> list[str]:
    """Understanding is the stock Qwen2.5-VL (the VLM is frozen) on cli.py's prompt (CliChat)."""
    if self._chat is None:
      self._chat = CliChat(qwen_vl.QwenVL(self.cfg.vlm), self.params["vlm"], self.tokenizer, self.processor,
                           (self.tokenizer.convert_tokens_to_ids("<|im_end|>"),), chat_template=self.chat_template)
    return self._chat.answer(images, questions, **kw)


@dataclasses.dataclass
class CliChat(QwenVLChat):
  """Qwen2.5-VL answers on the prompt cli.py routes and answers: the user turn [text, images], the template's
  system turn dropped (`chat_text`)."""

  chat_template: str | None = None

  def encode(self, question: str, images: int, system: str | None = None) -> list[int]:
    if system:
      raise ValueError("UniWorld answers as cli.py, which drops the system turn: --system is not used")
    return list(self.tokenizer(chat_text(self.tokenizer, question, images, self.chat_template))["input_ids"])


def _no_negative(negative: str) -> None:
  if negative:
    raise ValueError("UniWorld samples with FLUX's distilled guidance only (true_cfg 1): no negative prompt")


def load(path: str, *, t5: bool = True) -> UniWorldPipeline:
  """A converted UniWorld directory (convert/uniworld.py layout); t5=False samples without T5, as trained."""
  from unimm_jax import api
  from unimm_jax.convert import uniworld as convert_uniworld
  loaded = api.load(path)
  if loaded.family != "uniworld":
    raise ValueError(f"{path}: a {loaded.family!r} checkpoint, not a UniWorld one")
  if loaded.tokenizer is None:
    raise ValueError(f"{path}: no Qwen2.5-VL tokenizer files beside the UniWorld checkpoint")
  template = None
  template_file = os.path.join(path, "chat_template.json")
  if not getattr(loaded.tokenizer, "chat_template", None) and os.path.isfile(template_file):
    with open(template_file) as f:
      template = json.load(f)["chat_template"]
  pre = os.path.join(path, "preprocessor_config.json")
  processor = QwenVLImageProcessor()
  if os.path.isfile(pre):
    with open(pre) as f:
      processor = QwenVLImageProcessor.from_hf(json.load(f))
  if processor.min_pixels != processor.max_pixels:   # cli.py loads the processor with min = max = 448 x 448
    processor = dataclasses.replace(processor, min_pixels=448 * 448, max_pixels=448 * 448)
  parts = {}
  for name, tok in ((convert_uniworld.CLIP_DIR, "tokenizer_clip"), (convert_uniworld.T5_DIR, "tokenizer_t5")):
    where = os.path.join(path, name)
    if os.path.isdir(where) and (name != convert_uniworld.T5_DIR or t5):
      import transformers
      parts[name] = (api.load(where), transformers.AutoTokenizer.from_pretrained(os.path.join(path, tok)))
  if convert_uniworld.CLIP_DIR not in parts:
    raise ValueError(f"{path}: no clip/ (FLUX's CLIP-L text encoder gives pooled_projections; convert with --flux)")
  if t5 and convert_uniworld.T5_DIR not in parts:
    raise ValueError(f"{path}: no t5/ (FLUX's T5-XXL); load(t5=False) samples without it, as UniWorld was trained")
  vae = api.load(os.path.join(path, convert_uniworld.VAE_DIR))
  with open(os.path.join(path, convert_uniworld.SCHEDULER_FILE)) as f:
    scheduler = json.load(f)
  cfg = loaded.config
  sampler = FluxSampler(flux.FluxTransformer2DModel(cfg.denoiser), loaded.params["denoiser"], scheduler, vae.module,
                        vae.params)
  clip, clip_tok = parts[convert_uniworld.CLIP_DIR]
  t5_model, t5_tok = parts.get(convert_uniworld.T5_DIR, (None, None))
  return UniWorldPipeline(loaded.module, loaded.params, loaded.tokenizer, template, processor, sampler, clip,
                          clip_tok, t5_model, t5_tok)
