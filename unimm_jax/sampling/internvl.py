"""InternVL3 image chat: images -> 448 px tiles -> features in place of `<IMG_CONTEXT>` tokens -> KV-cached decoding.

Each image of a question is written `<img>` + `<IMG_CONTEXT>` x (tokens per tile x its tiles) + `</img>` where its
`<image>` marker stands (sampling/vlm.py), as both transformers' InternVLProcessor and the original chat() do.
A batch holds prompts with different images: the tiles of every image of every prompt go through InternViT
together (all tiles have one size, so none is padded; TILE_BATCH per call), and their features fill the
placeholders of the left-padded prompts in order.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from unimm_jax.data.internvl import TilingProcessor
from unimm_jax.models import qwen
from unimm_jax.models.internvl import InternVL
from unimm_jax.sampling import vlm
from unimm_jax.sampling.text import Generation, SamplerConfig

START, CONTEXT, END = "<img>", "<IMG_CONTEXT>", "</img>"


# Tiles per InternViT call: bounds the fp32 attention scores [tiles, 16, 1025, 1025] (67 MB a tile) that the
# XLA attention materialises; 4 prompts of 13 tiles in one call would hold 3.5 GB of them per layer.
TILE_BATCH = 8


@functools.partial(jax.jit, static_argnames=("module", "batch"))
def tile_features(module: InternVL, params: Any, pixels: jax.Array, batch: int = TILE_BATCH) -> jax.Array:
  """Tiles [n H W 3] -> LLM embeddings [n k D], `batch` tiles at a time (the same numbers as all at once)."""
  one = lambda tile: module.apply({"params": params}, tile[None], method=InternVL.image_features)[0]  # noqa: E731
  return jax.lax.map(one, pixels, batch_size=batch)


@functools.partial(jax.jit, static_argnames="module")
def prompt_embeddings(module: InternVL, params: Any, ids: jax.Array, features: jax.Array | None) -> jax.Array:
  """Token ids [b p] -> [b p D] with the tiles' features [n k D] (tile_features) in place of the placeholders."""
  return module.apply({"params": params}, ids, features=features, method=InternVL.embed)


@dataclasses.dataclass
class InternVLChat:
  """Answers questions about images with an InternVL `module` and its `params`, `tokenizer` and `processor`."""

  module: InternVL
  params: Any
  tokenizer: Any
  processor: TilingProcessor
  where: str = "InternVL"        # the checkpoint, for error messages
  system: str | None = None      # a system turn for every prompt (None: the chat template's default)
  max_images_per_prompt: ClassVar[int | None] = None   # scripts/chat.py: any number of images per question

  def __post_init__(self):
    cfg = self.module.cfg
    merge = cfg.vision.patch * cfg.shuffle
    if self.processor.tile % merge:
      raise ValueError(f"{self.where}: {self.processor.tile} px tiles are not a multiple of {merge} px "
                       f"({cfg.shuffle}x{cfg.shuffle} patches of {cfg.vision.patch} px merge into one token)")
    self.tokens_per_tile = (self.processor.tile // merge) ** 2
    self.context_id = vlm.token_id(self.tokenizer, CONTEXT, self.where)
    if self.context_id != cfg.image_token_id:
      raise ValueError(f"{self.where}: the tokenizer's {CONTEXT} is {self.context_id}, the model's image_token_id "
                       f"is {cfg.image_token_id}")

  def read_image(self, path: str) -> np.ndarray:
    """An image file as uint8 RGB [H W 3]; an error naming the file if it cannot be read or is too small."""
    image = vlm.read_rgb(path)
    self._check_size(image, path)
    return image

  def _check_size(self, image: np.ndarray, what: str) -> None:
    p = self.module.cfg.vision.patch
    if min(image.shape[:2]) < p:
      raise ValueError(f"{what}: an image of {image.shape[0]}x{image.shape[1]} px is smaller than one {p} px patch")

  def prompt_ids(self, question: str, tiles: Sequence[int], where: str = "prompt") -> list[int]:
    """A question about images of `tiles` tiles each -> token ids of the chat prompt, placeholders expanded."""
    text = vlm.chat_text(self.tokenizer, vlm.place_images(question, len(tiles), where), self.system)
    pieces = text.split(vlm.IMAGE)
    text = pieces[0] + "".join(START + CONTEXT * (self.tokens_per_tile * n) + END + rest
                               for n, rest in zip(tiles, pieces[1:]))
    ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
    found, want = ids.count(self.context_id), self.tokens_per_tile * sum(tiles)
    if found != want:
      raise ValueError(f"{where}: {found} {CONTEXT} tokens for {len(tiles)} image(s) of {sum(tiles)} tiles "
                       f"({want} expected); the text itself must not contain {CONTEXT}")
    return ids

  def generate(self, images: Sequence[np.ndarray | Sequence[np.ndarray]], questions: Sequence[str], *,
               max_new_tokens: int = 32, sampler: SamplerConfig = SamplerConfig(), seed: int = 0,
               on_step: Callable[[Any], None] | None = None) -> Generation:
    """images[i]: the image (uint8 [H W 3]) or list of images of questions[i] -> the answers' tokens."""
    if len(images) != len(questions):
      raise ValueError(f"generate: {len(images)} image entries for {len(questions)} questions")
    tiles, prompts = [], []
    for i, (imgs, question) in enumerate(zip(images, questions)):
      imgs = [imgs] if isinstance(imgs, np.ndarray) else list(imgs)
      for j, img in enumerate(imgs):
        self._check_size(np.asarray(img), f"prompt {i}, image {j}")
      per_image = [self.processor(img) for img in imgs]
      tiles += per_image
      prompts.append(self.prompt_ids(question, [len(t) for t in per_image], f"prompt {i}"))
    limit = self.module.cfg.max_positions
    if limit is not None and max(map(len, prompts)) + max_new_tokens > limit:
      raise ValueError(f"{self.where}: a prompt of {max(map(len, prompts))} tokens + {max_new_tokens} new ones "
                       f"passes the {limit} positions where the release's dynamic RoPE would rescale")
    features = tile_features(self.module, self.params, jnp.asarray(np.concatenate(tiles))) if tiles else None
    pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
    return vlm.generate_with_images(
        qwen.Qwen(self.module.cfg.llm), self.params["language_model"],
        lambda ids: prompt_embeddings(self.module, self.params, jnp.asarray(ids), features), prompts, pad_id=pad,
        max_new_tokens=max_new_tokens, sampler=sampler, stop=vlm.stop_tokens(self.tokenizer), seed=seed,
        on_step=on_step)

  def answer(self, images: Sequence[np.ndarray | Sequence[np.ndarray]], questions: Sequence[str], *,
             max_new_tokens: int = 32, sampler: SamplerConfig = SamplerConfig(), seed: int = 0,
             on_step: Callable[[Any], None] | None = None, system: str | None = None) -> list[str]:
    """images[i] (an image or a list of them) + questions[i] -> decoded answers; `system` replaces the system turn."""
    chat = self if system is None else dataclasses.replace(self, system=system)
    out = chat.generate(images, questions, max_new_tokens=max_new_tokens, sampler=sampler, seed=seed,
                        on_step=on_step)
    return [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in out.as_lists()]


def processor_for(path: str, family: str, release_config: dict | None) -> TilingProcessor:
  """The tiling of a checkpoint: transformers' preprocessor_config.json, or the original release's config.json."""
  pre = os.path.join(path, "preprocessor_config.json")
  if family == "internvl_chat" and release_config is not None:
    return TilingProcessor.from_release(release_config)
  if os.path.isfile(pre):
    with open(pre) as f:
      return TilingProcessor.from_hf(json.load(f))
  raise ValueError(f"{path}: no preprocessor_config.json (the InternVL tiling and normalisation)")


def load(path: str, system: str | None = None) -> InternVLChat:
  """An InternVL3 directory (transformers' or the original release's layout, or converted) as an image chat."""
  from unimm_jax import api, checkpoint
  from unimm_jax.convert import hf
  loaded = api.load(path)
  if loaded.family not in ("internvl", "internvl_chat"):
    raise ValueError(f"{path}: a {loaded.family!r} checkpoint, not an InternVL one")
  if loaded.tokenizer is None:
    raise ValueError(f"{path}: no tokenizer files beside the InternVL checkpoint")
  release = (checkpoint.read_meta(path).get("hf_config") if checkpoint.is_converted(path) else hf.read_hf_config(path))
  module = loaded.module
  if loaded.family == "internvl_chat":
    # The release's config does not name the placeholder; its chat() takes the tokenizer's <IMG_CONTEXT>.
    ctx = vlm.token_id(loaded.tokenizer, CONTEXT, path)
    module = InternVL(dataclasses.replace(loaded.config, image_token_id=ctx))
  return InternVLChat(module, loaded.params, loaded.tokenizer, processor_for(path, loaded.family, release), path,
                      system)
