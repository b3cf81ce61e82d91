"""UniWorld-V1 text-to-image, editing and image chat: the steps of the original's univa/serve/cli.py.

Reference: PKU-YuanGroup/UniWorld-V1 univa/serve/cli.py (chat text, the system-turn drop, the task-head route,
the [t5, vlm] join, update_size), univa/utils/anyres_util.py (dynamic_resize), univa/utils/flux_pipeline.py
(= diffusers' FluxPipeline: sampling/flux.py).

Train/infer asymmetry, reproduced on purpose: the released stages were trained with `drop_t5_rate: 1.0`
(no T5 tokens, pooled vector = CLIP("")), but cli.py samples with the T5 embeddings of the prompt in front of the
VLM's and the CLIP pooled vector of the prompt. `t5=False` samples as trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from PIL import Image

from unimm_jax.models import uniworld
from unimm_jax.sampling import vlm

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
