"""Qwen2.5-VL image chat: chat template, images through the packed vision tower, M-RoPE positions, KV-cached
decoding (sampling/text.generate_from_embeddings). What scripts/chat.py --image drives for a Qwen2.5-VL
directory (`unimm_jax.load_pipeline`).

Every image of a batch, whatever prompt it belongs to, goes into one packing of the vision tower (rows of whole
frames, no padding to the largest image); the prompts are left-padded for the decoder.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import numpy as np
from PIL import Image

from unimm_jax.data.qwen_vl import QwenVLImageProcessor
from unimm_jax.models import qwen, qwen_vl
from unimm_jax.sampling import vlm
from unimm_jax.sampling.text import Generation, SamplerConfig, generate_from_embeddings

# Qwen2-VL's chat format, for checkpoints that ship no chat template
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}"
    "{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

ImageLike = np.ndarray | Image.Image


def _image_list(item: ImageLike | Sequence[ImageLike]) -> list[ImageLike]:
  return [item] if isinstance(item, (np.ndarray, Image.Image)) else list(item)


@dataclasses.dataclass
class QwenVLChat:
  module: qwen_vl.QwenVL
  params: Any
  tokenizer: Any
  processor: QwenVLImageProcessor = QwenVLImageProcessor()
  stop_tokens: tuple[int, ...] = ()
  # vision rows: None = one row for all images (the Pallas kernels skip what segments hide); "auto" = that on
  # GPU/TPU, on CPU rows as long as the largest frame (the XLA kernel computes every pair of a row)
  seq_len: int | str | None = "auto"
  answers_text: ClassVar[bool] = True               # scripts/chat.py: prompts without images are fine
  max_images_per_prompt: ClassVar[int | None] = None

  def __post_init__(self):
    module = self.module
    self._embed = jax.jit(lambda p, ids, vision: module.apply({"params": p}, ids, vision, method=qwen_vl.QwenVL.embed))
    self.decoder = qwen.Qwen(self.cfg.text)

  @property
  def cfg(self) -> qwen_vl.QwenVLConfig:
    return self.module.cfg

  def read_image(self, path: str) -> np.ndarray:
    """An image file as uint8 RGB [H W 3] (the processor resizes it)."""
    return vlm.read_rgb(path)

  def encode(self, question: str, images: int, system: str | None = None) -> list[int]:
    """The chat-templated prompt with one image placeholder per image (`<image>` markers place them)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [vlm.user_message(question, images)]
    template = None if getattr(self.tokenizer, "chat_template", None) else DEFAULT_CHAT_TEMPLATE
    ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                             chat_template=template)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

  def _rows(self, grids: Sequence[tuple[int, int, int]]) -> int | None:
    if self.seq_len != "auto":
      return self.seq_len
    if jax.default_backend() != "cpu":
      return None
    return -(-max(h * w for _, h, w in grids) // 64) * 64

  def prompt(self, images: Sequence[ImageLike | Sequence[ImageLike]], questions: Sequence[str],
             system: str | None = None) -> dict[str, Any]:
    """-> {embeds [b p d], segment_ids [b p], positions [b p 3], ids [b p]} for generate_from_embeddings."""
    if len(images) != len(questions):
      raise ValueError(f"{len(questions)} questions but image lists for {len(images)}")
    per_prompt = [_image_list(i) for i in images]
    processed = [[self.processor(im) for im in ims] for ims in per_prompt]
    m2 = self.cfg.vision.merge ** 2
    counts = [[g[0] * g[1] * g[2] // m2 for _, g in p] for p in processed]
    ids, seg = vlm.prompt_batch([self.encode(q, len(c), system) for q, c in zip(questions, counts)],
                                self.cfg.image_token_id, counts, self.tokenizer.pad_token_id or 0)
    flat = [x for p in processed for x in p]
    grids = [g for _, g in flat]
    kw = qwen_vl.prepare(ids, self.cfg, pixel_values=np.concatenate([p for p, _ in flat]) if flat else None,
                         image_grid_thw=grids, mask=seg, seq_len=self._rows(grids) if grids else None)
    embeds = self._embed(self.params, ids, kw.get("vision"))
    return {"embeds": embeds, "segment_ids": seg, "positions": kw["positions"], "ids": ids}

  def generate(self, images: Sequence[ImageLike | Sequence[ImageLike]], questions: Sequence[str], *,
               max_new_tokens: int = 32, sampler: SamplerConfig = SamplerConfig(), system: str | None = None,
               stop_tokens: Sequence[int] | None = None, seed: int = 0,
               on_step: Callable[[Any], None] | None = None) -> Generation:
    """Per question its images (an image, or a list of images, possibly empty) -> new token ids."""
    p = self.prompt(images, questions, system)
    return generate_from_embeddings(
        self.decoder, self.params["language_model"], p["embeds"], p["segment_ids"], positions=p["positions"],
        max_new_tokens=max_new_tokens, sampler=sampler,
        stop_tokens=self.stop_tokens if stop_tokens is None else stop_tokens,
        pad_id=self.tokenizer.pad_token_id or 0, seed=seed, on_step=on_step)

  def answer(self, images: Sequence[ImageLike | Sequence[ImageLike]], questions: Sequence[str], **kw) -> list[str]:
    """As `generate`, decoded to text."""
    return [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in self.generate(images, questions,
                                                                                          **kw).as_lists()]


def _stop_tokens(path: str, tokenizer) -> tuple[int, ...]:
  """The tokenizer's eos and <|im_end|>, and generation_config.json's eos_token_id (one id or a list)."""
  ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
  gen = os.path.join(path, "generation_config.json")
  if os.path.isfile(gen):
    with open(gen) as f:
      eos = json.load(f).get("eos_token_id")
    ids |= set(eos if isinstance(eos, list) else [eos])
  unk = tokenizer.unk_token_id
  return tuple(sorted(i for i in ids if isinstance(i, int) and 0 <= i < len(tokenizer) and i != unk))


def load(path: str, **kw) -> QwenVLChat:
  """A Qwen2.5-VL directory (HF or converted) with its tokenizer and preprocessor_config.json."""
  from unimm_jax import api
  loaded = api.load(path)
  if loaded.family != "qwen_vl":
    raise ValueError(f"{path}: a {loaded.family!r} checkpoint, not a Qwen2.5-VL one")
  if loaded.tokenizer is None:
    raise ValueError(f"{path}: no tokenizer files (tokenizer.json / vocab.json) beside the Qwen2.5-VL checkpoint")
  pre = os.path.join(path, "preprocessor_config.json")
  processor = QwenVLImageProcessor()
  if os.path.isfile(pre):
    with open(pre) as f:
      processor = QwenVLImageProcessor.from_hf(json.load(f))
  v = loaded.config.vision
  if (processor.patch, processor.merge, processor.temporal_patch) != (v.patch, v.merge, v.temporal_patch):
    raise ValueError(f"{pre}: patch_size {processor.patch}, merge_size {processor.merge}, temporal_patch_size "
                     f"{processor.temporal_patch} do not match the model's {v.patch}, {v.merge}, {v.temporal_patch}")
  return QwenVLChat(loaded.module, loaded.params, loaded.tokenizer, processor,
                    _stop_tokens(path, loaded.tokenizer), **kw)
