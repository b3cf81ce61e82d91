"""TUNA sequence builders: the streams as packable samples, and packed rows -> model batches.

Layouts (reference: tuna-2 tuna/data/tokenize_utils.py), with each image a span
`[time slot] [image token] * (h * w)` between <boi> and <eoi>:
  t2i    [bos] text [boi] span [eoi] [eos]                    flow loss on the image
  mmu    [bos] [boi] span [eoi] prompt answer [eos]           image clean (t = 1), CE on answer + eos
                                                             (and on the answers of earlier turns in prompt)
  edit   [bos] [boi] src [eoi] instruction [boi] tgt [eoi] [eos]   src clean, flow loss on tgt
  text   [bos] text [eos]                                     CE on every token after bos
A video clip of T (latent) frames is one span `[time slot] [image token] * (T * h * w)` (frame-major), one
time for the whole clip:
  t2v    the t2i layout with a clip                           flow loss on every frame's tokens
  vmmu   the mmu layout with a clip                           clip clean, CE on answer + eos
The reference's t2v (tuna/data/datasets/video_dataset.py, pipelines/tuna_pipeline.py) puts a clip between
<boi> <eoi> in <|image_pad|> slots, as an image; `video_markers=True` uses its tokenizer's video tokens
(misc.get_text_tokenizer: <|vid_start|> <|video_pad|>* <|vid_end|>) instead, which it registers but never
places in a sequence.
Deviation from the reference, on purpose: its datasets reserve h*w slots per image for a span of
1 + h*w, silently dropping the last image token; here every span has 1 + h*w slots (1 + T*h*w for a clip).
Options (keyword arguments of the builders):
  meta_slots=3   spans open with [height slot] [width slot] [time slot] (TunaConfig.aspect_ratio_embeds, the
                 reference's add_aspect_ratio_embeds: its pipelines' `num_image_tokens = h*w + 2 + 1`); the
                 `time_slot` key marks all three
  vision_labels  understanding: <|vision_start|> and <|vision_end|> are CE targets too, as the reference's
                 tokenize_utils.format_sequence_und computes; off, only the answer and eos are (our choice
                 before this option, kept for the existing configs -- configs/tuna.py)

A sample (see data/packing.py) has per-token arrays: tokens, labels (target token or IGNORE, aligned
with tokens: CE compares logits[i - 1] with labels[i]), span_local, time_slot, img_t (frame), img_y, img_x,
img_h, img_w, span_clean (span forced to t = 1), flow (image token in the flow loss); its attachments are
(offset of the first image token, patches [T*h*w o]) per image or clip.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from unimm_jax.schema import IGNORE


@dataclasses.dataclass(frozen=True)
class TunaTokens:
  bos: int
  eos: int
  boi: int
  eoi: int
  image_pad: int
  pad: int = 0

  # the video tokens (tuna-2 misc.get_text_tokenizer); None when the tokenizer lacks them
  bov: int | None = None
  eov: int | None = None
  video_pad: int | None = None

  NAMES: ClassVar[dict[str, str]] = {"bos": "<|im_start|>", "boi": "<|vision_start|>", "eoi": "<|vision_end|>", "image_pad": "<|image_pad|>"}
  VIDEO_NAMES: ClassVar[dict[str, str]] = {"bov": "<|vid_start|>", "eov": "<|vid_end|>", "video_pad": "<|video_pad|>"}

  @classmethod
  def from_tokenizer(cls, tokenizer: Any) -> "TunaTokens":
    """The tuna-2 choice for Qwen2.5 (misc.get_text_tokenizer): bos <|im_start|>, eos the tokenizer's,
    boi/eoi <|vision_start|>/<|vision_end|>, <|image_pad|>, pad the tokenizer's pad; the video tokens
    <|vid_start|> <|vid_end|> <|video_pad|> where the tokenizer has them."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in cls.NAMES.values() if t not in vocab]
    if missing or tokenizer.eos_token_id is None:
      raise ValueError(f"tokenizer lacks TUNA's special tokens {missing or ['an eos token']}")
    ids = {k: vocab[t] for k, t in cls.NAMES.items()}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    video = {k: vocab[t] for k, t in cls.VIDEO_NAMES.items() if t in vocab}
    return cls(eos=tokenizer.eos_token_id, pad=pad, **ids, **video)

  def markers(self, video: bool) -> tuple[int, int, int]:
    """(open, close, slot) tokens of a span: the image tokens, or the video tokens (`video_markers`)."""
    if not video:
      return self.boi, self.eoi, self.image_pad
    if None in (self.bov, self.eov, self.video_pad):
      missing = [t for k, t in self.VIDEO_NAMES.items() if getattr(self, k) is None]
      raise ValueError(f"video_markers: the tokenizer lacks the video tokens {missing}")
    return self.bov, self.eov, self.video_pad


def _text(ids: Sequence[int], labelled: bool | np.ndarray) -> dict[str, np.ndarray]:
  """Text tokens, labelled where `labelled` (a bool or a per-token mask) is true."""
  ids = np.asarray(ids, np.int32)
  return {"input_ids": ids, "labels": np.where(labelled, ids, IGNORE).astype(np.int32)}


def _span(patches: np.ndarray, k: int, tok: TunaTokens, *, clean: bool, flow: bool,
          meta_slots: int = 1, slot: int | None = None) -> dict[str, np.ndarray]:
  """patches [h w o] (an image) or [T h w o] (a clip) -> one span of meta_slots + T*h*w slots with local span id k,
  holding `slot` (default <|image_pad|>)."""
  if patches.ndim not in (3, 4):
    raise ValueError(f"image patches must be [h w o] or a clip's [T h w o], got {patches.shape}")
  if meta_slots not in (1, 3):
    raise ValueError(f"meta_slots must be 1 (time) or 3 (height, width, time), got {meta_slots}")
  frames, h, w, _ = patches.shape if patches.ndim == 4 else (1, *patches.shape)
  n = meta_slots + frames * h * w
  f, yx = np.divmod(np.arange(frames * h * w, dtype=np.int32), h * w)
  y, x = np.divmod(yx, w)
  meta = np.zeros(meta_slots, np.int32)
  return {
      "input_ids": np.full(n, tok.image_pad if slot is None else slot, np.int32),
      "labels": np.full(n, IGNORE, np.int32), "span_local": np.full(n, k, np.int32),
      "time_slot": np.arange(n) < meta_slots, "img_t": np.concatenate([meta, f]).astype(np.int32),
      "img_y": np.concatenate([meta, y]).astype(np.int32), "img_x": np.concatenate([meta, x]).astype(np.int32),
      "img_h": np.full(n, h, np.int32), "img_w": np.full(n, w, np.int32),
      "span_clean": np.full(n, clean, bool), "flow": np.concatenate([meta.astype(bool), np.full(n - meta_slots, flow)]),
  }


_ZEROS = {"span_local": np.int32, "time_slot": bool, "img_t": np.int32, "img_y": np.int32, "img_x": np.int32,
          "img_h": np.int32, "img_w": np.int32, "span_clean": bool, "flow": bool}


def _join(parts: list[dict[str, np.ndarray]], images: list[np.ndarray], stream: str) -> dict[str, Any]:
  full = []
  for p in parts:
    n = len(p["input_ids"])
    full.append({**{k: np.zeros(n, dt) for k, dt in _ZEROS.items()}, **p})
  sample = {k: np.concatenate([p[k] for p in full]) for k in full[0]}
  offsets, start = [], 0
  for p in full:
    if p["span_local"].any():
      offsets.append(start + int(p["time_slot"].sum()))  # first image token, after the meta slots
    start += len(p["input_ids"])
  sample["attachments"] = [(o, img.reshape(-1, img.shape[-1])) for o, img in zip(offsets, images)]
  sample["stream"] = stream
  return sample


def t2i_sample(text_ids: Sequence[int], image: np.ndarray, tok: TunaTokens, *, meta_slots: int = 1) -> dict[str, Any]:
  parts = [_text([tok.bos, *text_ids, tok.boi], False), _span(image, 1, tok, clean=False, flow=True, meta_slots=meta_slots),
           _text([tok.eoi, tok.eos], False)]
  return _join(parts, [image], "t2i")


@dataclasses.dataclass(frozen=True)
class ChatPrompt:
  """A prompt in the reference pipeline's chat layout (pipelines/_common.prepare_gen_input_chat): the chat
  template's token ids before and after the `<image>` placeholder of the assistant turn."""
  before: tuple[int, ...]
  after: tuple[int, ...]


def t2i_chat_sample(prompt: ChatPrompt, image: np.ndarray, tok: TunaTokens, *, meta_slots: int = 1) -> dict[str, Any]:
  """`before [boi] span [eoi] after`: the reference's chat t2i prompt (no bos of ours: the template opens it)."""
  parts = [_text([*prompt.before, tok.boi], False), _span(image, 1, tok, clean=False, flow=True, meta_slots=meta_slots),
           _text([tok.eoi, *prompt.after], False)]
  return _join(parts, [image], "t2i")


def understanding_sample(image: np.ndarray, prompt_ids: Sequence[int], answer_ids: Sequence[int],
                         tok: TunaTokens, prompt_loss: np.ndarray | None = None, *, vision_labels: bool = False,
                         meta_slots: int = 1) -> dict[str, Any]:
  """`prompt_loss` marks the prompt tokens that also carry the loss: earlier answers of a conversation;
  `vision_labels`: <boi> and <eoi> are targets too (the reference; the bos label it also writes is no target,
  CE starts at position 1, so it is left out -- in a packed row it would be a target across samples)."""
  loss = np.zeros(1 + len(prompt_ids), bool)
  loss[0] = vision_labels
  if prompt_loss is not None:
    loss[1:] = prompt_loss
  parts = [_text([tok.bos, tok.boi], np.array([False, vision_labels])),
           _span(image, 1, tok, clean=True, flow=False, meta_slots=meta_slots),
           _text([tok.eoi, *prompt_ids], loss), _text([*answer_ids, tok.eos], True)]
  return _join(parts, [image], "mmu")


def understanding_prompt(image: np.ndarray, prompt_ids: Sequence[int], tok: TunaTokens, *,
                         meta_slots: int = 1) -> dict[str, Any]:
  """The understanding layout up to the prompt: what generation continues from."""
  parts = [_text([tok.bos, tok.boi], False), _span(image, 1, tok, clean=True, flow=False, meta_slots=meta_slots),
           _text([tok.eoi, *prompt_ids], False)]
  return _join(parts, [image], "mmu")


def _clip(clip: np.ndarray) -> np.ndarray:
  if clip.ndim != 4:
    raise ValueError(f"a video clip's patches must be [T h w o], got {clip.shape}")
  return clip


def t2v_sample(text_ids: Sequence[int], clip: np.ndarray, tok: TunaTokens, video_markers: bool = False) -> dict[str, Any]:
  """Text-to-video: the t2i layout around a clip [T h w o]; flow loss on all its frames' tokens."""
  start, end, slot = tok.markers(video_markers)
  parts = [_text([tok.bos, *text_ids, start], False), _span(_clip(clip), 1, tok, clean=False, flow=True, slot=slot),
           _text([end, tok.eos], False)]
  return _join(parts, [clip], "t2v")


def _video_prefix(clip: np.ndarray, prompt_ids: Sequence[int], tok: TunaTokens, video_markers: bool,
                  prompt_loss: np.ndarray | bool) -> list[dict[str, np.ndarray]]:
  start, end, slot = tok.markers(video_markers)
  loss = np.zeros(1 + len(prompt_ids), bool)
  loss[1:] = prompt_loss
  return [_text([tok.bos, start], False), _span(_clip(clip), 1, tok, clean=True, flow=False, slot=slot),
          _text([end, *prompt_ids], loss)]


def video_understanding_sample(clip: np.ndarray, prompt_ids: Sequence[int], answer_ids: Sequence[int],
                               tok: TunaTokens, prompt_loss: np.ndarray | None = None,
                               video_markers: bool = False) -> dict[str, Any]:
  """Video understanding: the mmu layout around a clean clip [T h w o]; CE on answer + eos (and on the prompt
  tokens `prompt_loss` marks)."""
  parts = _video_prefix(clip, prompt_ids, tok, video_markers, False if prompt_loss is None else prompt_loss)
  return _join([*parts, _text([*answer_ids, tok.eos], True)], [clip], "vmmu")


def video_understanding_prompt(clip: np.ndarray, prompt_ids: Sequence[int], tok: TunaTokens,
                               video_markers: bool = False) -> dict[str, Any]:
  """The video understanding layout up to the prompt: what generation continues from."""
  return _join(_video_prefix(clip, prompt_ids, tok, video_markers, False), [clip], "vmmu")


def edit_sample(source: np.ndarray, instruction_ids: Sequence[int], target: np.ndarray,
                tok: TunaTokens, *, meta_slots: int = 1) -> dict[str, Any]:
  parts = [_text([tok.bos, tok.boi], False), _span(source, 1, tok, clean=True, flow=False, meta_slots=meta_slots),
           _text([tok.eoi, *instruction_ids, tok.boi], False),
           _span(target, 2, tok, clean=False, flow=True, meta_slots=meta_slots),
           _text([tok.eoi, tok.eos], False)]
  return _join(parts, [source, target], "edit")


def text_sample(ids: Sequence[int], tok: TunaTokens) -> dict[str, Any]:
  text = _text([tok.bos, *ids, tok.eos], True)
  text["labels"][0] = IGNORE
  return _join([text], [], "text")


def to_batch(rows: Sequence[Mapping[str, Any]], max_spans: int, token_features: int) -> dict[str, np.ndarray]:
  """Packed rows (data.packing.pack_row) -> the model batch (unimm_jax.schema.KEYS, with
  x1 [b t o] clean patches instead of x_t) plus labels, flow_mask and span_clean [b n]."""
  b, t = len(rows), len(rows[0]["input_ids"])
  out = {
      "input_ids": np.stack([r["input_ids"] for r in rows]).astype(np.int32),
      "labels": np.stack([r["labels"] for r in rows]).astype(np.int32),
      "segment_ids": np.stack([r["segment_ids"] for r in rows]).astype(np.int32),
      "positions": np.stack([r["positions"] for r in rows]).astype(np.int32),
      "span_ids": np.stack([r["span_ids"] for r in rows]).astype(np.int32),
      "time_slot": np.stack([r["time_slot"] for r in rows]).astype(bool),
      "flow_mask": np.stack([r["flow"] for r in rows]).astype(bool),
      "thw": np.zeros((b, t, 3), np.int32),
      "spatial_shapes": np.zeros((b, max_spans, 2), np.int32),
      "span_clean": np.zeros((b, max_spans), bool),
      "x1": np.zeros((b, t, token_features), np.float32),
  }
  for i, r in enumerate(rows):
    out["thw"][i] = np.stack([r["img_t"], r["img_y"], r["img_x"]], axis=-1)
    spans = r["span_ids"]
    if spans.max(initial=0) > max_spans:
      raise ValueError(f"row {i} has {spans.max()} image spans > max_spans {max_spans}")
    for s in np.unique(spans[spans > 0]):
      first = np.flatnonzero(spans == s)[0]
      out["spatial_shapes"][i, s - 1] = (r["img_h"][first], r["img_w"][first])
      out["span_clean"][i, s - 1] = r["span_clean"][first]
    for offset, patches in r.get("attachments", ()):
      if patches.shape[-1] != token_features:
        raise ValueError(f"row {i}: image patches have {patches.shape[-1]} values per token, want {token_features}")
      out["x1"][i, offset:offset + len(patches)] = patches
  return out
