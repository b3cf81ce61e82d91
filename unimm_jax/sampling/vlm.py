"""Multimodal prompts for image chat, shared by the vision-language families: a chat message with images, token ids
whose image placeholders stand for image features, and a left-padded batch for
sampling/text.generate_from_embeddings (the features are put in by layers.scatter_placeholders).

A templated prompt carries one placeholder token per image; `prompt_batch` expands the i-th placeholder of a
prompt into as many tokens as that image has features and left-pads the prompts into one batch, so the
placeholders of the batch, read row-major, take the features of the images in prompt order, then in order
within a prompt. Families add their image encoder and positions (sampling/qwen_vl.py: M-RoPE).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from unimm_jax.sampling.text import left_pad

IMAGE_MARKER = "<image>"


def user_message(question: str, images: int, marker: str = IMAGE_MARKER) -> dict[str, Any]:
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
