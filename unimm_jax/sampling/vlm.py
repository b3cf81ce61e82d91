"""Image chat shared by the vision-language families: where images go in a question (`<image>` markers), the chat
template, placeholder tokens that stand for image features, a left-padded batch, and KV-cached decoding with
sampling/text.generate_from_embeddings (the features are put in by layers.scatter_placeholders).

A templated prompt carries placeholder tokens per image; `prompt_batch` expands the i-th placeholder of a
prompt into as many tokens as that image has features and left-pads the prompts into one batch, so the
placeholders of the batch, read row-major, take the features of the images in prompt order, then in order
within a prompt. Families add their image encoder, how many placeholders an image takes and their positions
(sampling/internvl.py: tiles; sampling/qwen_vl.py: M-RoPE).
Shapes: b prompts, p padded prompt length, D LLM width.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from unimm_jax.sampling.text import Generation, SamplerConfig, generate_from_embeddings, left_pad

IMAGE = "<image>"   # where an image goes in a question (the original InternVL chat convention)


def place_images(question: str, n_images: int, where: str = "prompt") -> str:
  """A question with one `<image>` marker per image: as written, or, without markers, one line per image
  before the text. More or fewer markers than images is an error naming both counts."""
  marks = question.count(IMAGE)
  if marks == 0:
    return f"{IMAGE}\n" * n_images + question
  if marks != n_images:
    raise ValueError(f"{where}: {marks} {IMAGE} placeholder(s) for {n_images} image(s); write one per image, or "
                     f"none to put the images before the text")
  return question


def chat_text(tokenizer: Any, user: str, system: str | None = None) -> str:
  """The user turn (and an optional system turn) through the tokenizer's chat template, ready for the assistant
  to answer; the plain text when the tokenizer has no template."""
  if not getattr(tokenizer, "chat_template", None):
    return user
  messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
  return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def stop_tokens(tokenizer: Any) -> list[int]:
  ids = (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"))
  return sorted({t for t in ids if isinstance(t, int) and t >= 0 and t != tokenizer.unk_token_id})


def token_id(tokenizer: Any, token: str, where: str) -> int:
  """The id of a special token the family needs, or an error naming the checkpoint."""
  tid = tokenizer.convert_tokens_to_ids(token)
  if not isinstance(tid, int) or tid < 0 or tid == tokenizer.unk_token_id:
    raise ValueError(f"{where}: the tokenizer has no {token!r} token")
  return tid


def generate_with_images(llm: Any, llm_params: Any, embed: Callable[[jax.Array], jax.Array],
                         prompts: Sequence[Sequence[int]], *, pad_id: int, max_new_tokens: int,
                         sampler: SamplerConfig = SamplerConfig(), stop: Sequence[int] = (), seed: int = 0,
                         on_step: Callable[[Any], None] | None = None) -> Generation:
  """Token-id prompts (placeholders included) -> generated tokens. `embed(ids [b p]) -> [b p D]` splices the
  batch's image features, in prompt order, into the left-padded ids (padding never is a placeholder)."""
  ids, seg = left_pad(prompts, pad_id)
  return generate_from_embeddings(llm, llm_params, embed(ids), seg, max_new_tokens=max_new_tokens, sampler=sampler,
                                  stop_tokens=stop, pad_id=pad_id, seed=seed, on_step=on_step)


def read_rgb(path: str) -> np.ndarray:
  """An image file as uint8 RGB [H W 3], or a ValueError naming the file."""
  from PIL import Image
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert("RGB"))
  except OSError as e:
    raise ValueError(f"{path}: cannot read the image: {e}") from None


def user_message(question: str, images: int, marker: str = IMAGE) -> dict[str, Any]:
  """A chat-template user turn (transformers' content list) with `images` images: at the `marker`s of the
  question if it has any (one per image), else all before the text."""
  pieces = question.split(marker)
  if len(pieces) == 1:
    content = [{"type": "image"}] * images + [{"type": "text", "text": question}]
  elif len(pieces) - 1 != images:
    raise ValueError(f"question {question!r} has {len(pieces) - 1} {marker} marker(s) for {images} image(s)")
  else:
    content = []
    for i, text in enumerate(pieces):
      if i:
        content.append({"type": "image"})
      if text:
        content.append({"type": "text", "text": text})
  return {"role": "user", "content": content}


def expand_placeholders(ids: Sequence[int], placeholder: int, counts: Sequence[int], where: str) -> list[int]:
  """Each placeholder token of `ids` -> counts[i] copies (its image's feature count)."""
  found = sum(1 for t in ids if t == placeholder)
  if found != len(counts):
    raise ValueError(f"{where}: {found} image placeholder(s) (token {placeholder}) for {len(counts)} image(s)")
  out, image = [], 0
  for t in ids:
    if t == placeholder:
      out += [placeholder] * int(counts[image])
      image += 1
    else:
      out.append(t)
  return out


def prompt_batch(prompts: Sequence[Sequence[int]], placeholder: int, features_per_image: Sequence[Sequence[int]],
                 pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Prompts with one placeholder per image and each prompt's images' feature counts -> (ids [b p],
  segment ids [b p]: 1 = prompt, 0 = left padding)."""
  if len(prompts) != len(features_per_image):
    raise ValueError(f"prompt_batch: {len(prompts)} prompts but image lists for {len(features_per_image)}")
  return left_pad([expand_placeholders(p, placeholder, c, f"prompt {i}")
                   for i, (p, c) in enumerate(zip(prompts, features_per_image))], pad_id)
