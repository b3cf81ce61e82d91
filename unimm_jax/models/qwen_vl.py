"""Qwen2.5-VL: the vision transformer (models/qwen_vit.py) feeding the Qwen2.5 decoder with M-RoPE (models/qwen.py).

Paper: Qwen2.5-VL Technical Report (arXiv 2502.13923). Reference: transformers
models/qwen2_5_vl/modeling_qwen2_5_vl.py (Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLModel.get_rope_index).
Shapes: b batch, t tokens, d embed, r / l vision rows / row length, m merge, n merged image tokens.

The prompt holds one `<|image_pad|>` (`<|video_pad|>`) token per merged patch of each image (video); their
embeddings are replaced by the vision tower's merged tokens, in order. Positions are 3D (temporal, height,
width): text tokens advance all three together; the tokens of an image take (start, start + row, start + col)
of their merge group and the text after it continues at start + max(h, w) / m (transformers 5.x); a video's
temporal position of frame group i is start + floor(i * tokens_per_second * seconds_per_grid).

Host-side preparation (`prepare`: NumPy, before jit) packs the images into the tower's rows
(data/qwen_vl.pack_vision), computes the 3D positions (`rope_index`), checks the placeholder counts and records
where each image's merged tokens sit in the tower's (window-ordered) output.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from unimm_jax.data.qwen_vl import VisionPacking, pack_vision
from unimm_jax.models import qwen, qwen_vit
from unimm_jax.models.config import DictConfig, push_runtime
from unimm_jax.layers import scatter_placeholders
from unimm_jax.models.qwen_vit import QwenVisionConfig



@dataclasses.dataclass(frozen=True)
class QwenVLConfig(DictConfig):
  vision: QwenVisionConfig
  text: qwen.QwenConfig
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  tokens_per_second: float = 2.0      # video temporal positions per second (vision_config.tokens_per_second)
  # Runtime choices, applied to both towers (they change speed and memory, never the numbers).
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = False
  remat: str = "none"
  attention_impl: str = "auto"

  def __post_init__(self):
    push_runtime(self, ("vision", "text"))
    if self.vision.out_embed != self.text.embed:
      raise ValueError(f"QwenVLConfig: vision.out_embed {self.vision.out_embed} != text.embed {self.text.embed}")
    if self.text.mrope_sections is None:
      raise ValueError("QwenVLConfig: the text decoder needs mrope_sections (M-RoPE)")

  @property
  def depth(self) -> int:
    return self.text.depth

  @classmethod
  def qwen2_5_vl_7b(cls, **kw) -> "QwenVLConfig":
    """Qwen/Qwen2.5-VL-7B-Instruct config.json (UniWorld-V1's MLLM)."""
    text = qwen.QwenConfig.qwen2_5_7b(model_type="qwen2_5_vl_text", mrope_sections=(16, 24, 24))
    return cls(vision=QwenVisionConfig.qwen2_5_vl(out_embed=3584), text=text, **kw)

  @classmethod
  def tiny(cls, **kw) -> "QwenVLConfig":
    """The vocabulary ends with the four vision tokens, so tiny tokenizers can carry them."""
    text = qwen.QwenConfig.tiny(model_type="qwen2_5_vl_text", mrope_sections=(2, 3, 3))
    ids = dict(vision_start_token_id=252, vision_end_token_id=253, image_token_id=254, video_token_id=255)
    return cls(vision=QwenVisionConfig.tiny(out_embed=text.embed), text=text, **{**ids, **kw})


def config_from_hf(hf: Mapping[str, Any] | Any) -> QwenVLConfig:
  """HF Qwen2.5-VL config (config.json dict or Qwen2_5_VLConfig) -> QwenVLConfig."""
  d = hf if isinstance(hf, Mapping) else hf.to_dict()
  if d.get("model_type") != "qwen2_5_vl":
    raise ValueError(f"unsupported model_type {d.get('model_type')!r}; supported: ('qwen2_5_vl',)")
  text = qwen.config_from_hf(d)
  # transformers ties lm_head if either the top level or the text config says so
  tie = bool(d.get("tie_word_embeddings")) or bool((d.get("text_config") or {}).get("tie_word_embeddings"))
  vision = d.get("vision_config") or {}
  return QwenVLConfig(
      vision=qwen_vit.config_from_hf(vision), text=dataclasses.replace(text, tie_embeddings=tie),
      image_token_id=d.get("image_token_id", 151655), video_token_id=d.get("video_token_id", 151656),
      vision_start_token_id=d.get("vision_start_token_id", 151652),
      vision_end_token_id=d.get("vision_end_token_id", 151653),
      tokens_per_second=float(vision.get("tokens_per_second", 4)))


@flax.struct.dataclass
class VisionInputs:
  """The vision tower's packed rows (data/qwen_vl.VisionPacking as arrays) and where the merged tokens of the
  images and of the videos sit in the tower's flattened output [r*l/m^2], in placeholder order."""

  patches: jax.Array       # [r l P]
  positions: jax.Array     # [r l 2]
  frame_ids: jax.Array     # [r l]
  window_ids: jax.Array    # [r l]
  image_tokens: jax.Array  # [n_image] int32
  video_tokens: jax.Array  # [n_video] int32

  @classmethod
  def from_packing(cls, packing: VisionPacking, patches: np.ndarray, images: int) -> "VisionInputs":
    """`packing` of `images` images then the videos, over their concatenated patches [N P]."""
    split = sum(packing.tokens_per_image[:images])
    return cls(jnp.asarray(packing.rows(patches)), jnp.asarray(packing.positions), jnp.asarray(packing.frame_ids),
               jnp.asarray(packing.window_ids), jnp.asarray(packing.merged[:split]),
               jnp.asarray(packing.merged[split:]))


class QwenVL(nn.Module):
  """Token ids (+ packed images) -> logits, as Qwen2_5_VLForConditionalGeneration."""

  cfg: QwenVLConfig

  def setup(self):
    self.visual = qwen_vit.QwenVisionTransformer(self.cfg.vision)
    self.language_model = qwen.Qwen(self.cfg.text)

  def embed(self, input_ids: jax.Array, vision: VisionInputs | None = None) -> jax.Array:
    """[b t] ids -> [b t d] embeddings, the image (video) placeholders replaced by the images' (videos') merged
    tokens in order; `prepare` checked their counts."""
    x = self.language_model.embed(input_ids)
    if vision is None:
      return x
    out = self.visual(vision.patches, vision.positions, vision.frame_ids, vision.window_ids).pooler_output
    features = out.reshape(-1, out.shape[-1])
    for tokens, token_id in ((vision.image_tokens, self.cfg.image_token_id),
                             (vision.video_tokens, self.cfg.video_token_id)):
      if tokens.shape[0]:
        x = scatter_placeholders(x, input_ids, jnp.take(features, tokens, axis=0), token_id)
    return x

  def __call__(self, input_ids: jax.Array, vision: VisionInputs | None = None, *,
               positions: jax.Array | None = None, **decoder_kwargs) -> qwen.DecoderOutput:
    """input_ids [b t]; vision from `prepare`; positions [b t 3] (M-RoPE, from `rope_index`; default: text
    positions); decoder_kwargs as models/qwen.Qwen (segment_ids, cache, return_hidden_states, ...)."""
    return self.language_model(inputs_embeds=self.embed(input_ids, vision), positions=positions, **decoder_kwargs)


# ----------------------------------------------------------------------------------------------
# Host-side preparation (NumPy)
# ----------------------------------------------------------------------------------------------

def rope_index(input_ids: np.ndarray, cfg: QwenVLConfig, image_grids: Sequence[Sequence[int]] = (),
               video_grids: Sequence[Sequence[int]] = (), seconds_per_grid: Sequence[float] | None = None,
               mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """M-RoPE positions, as transformers' get_rope_index: ids [b t] -> (positions [b t 3], deltas [b]).

  A run of image (video) placeholders is one image (video), taking grids in order over the whole batch.
  mask [b t] (1 = token, 0 = padding; default all 1): padding gets position 0. deltas = the next decode
  position minus the number of tokens, per row.
  """
  ids = np.asarray(input_ids)
  mask = np.ones_like(ids) if mask is None else np.asarray(mask)
  m = cfg.vision.merge
  grids = {1: iter(image_grids), 2: iter(video_grids)}
  seconds = iter(seconds_per_grid if seconds_per_grid is not None else [1.0] * len(video_grids))
  positions = np.zeros((*ids.shape, 3), np.int64)
  deltas = np.zeros(ids.shape[0], np.int64)
  for row in range(ids.shape[0]):
    valid = np.flatnonzero(mask[row])
    kinds = np.where(ids[row, valid] == cfg.image_token_id, 1, np.where(ids[row, valid] == cfg.video_token_id, 2, 0))
    pieces, start = [], 0
    for kind, run in itertools.groupby(kinds):
      n = len(list(run))
      if kind == 0:
        pieces.append(np.repeat(start + np.arange(n)[:, None], 3, axis=1))
        start += n
        continue
      try:
        t, h, w = (int(v) for v in next(grids[kind]))
      except StopIteration:
        raise ValueError(f"rope_index: row {row} has more {'image' if kind == 1 else 'video'} runs than grids") from None
      step = 1.0 if kind == 1 else cfg.tokens_per_second * float(next(seconds))
      gt, gh, gw = np.meshgrid((np.arange(t) * step).astype(np.int64), np.arange(h // m), np.arange(w // m),
                               indexing="ij")
      if gt.size != n:
        raise ValueError(f"rope_index: row {row}: a run of {n} placeholder tokens for a grid {(t, h, w)} of "
                         f"{gt.size} merged tokens")
      pieces.append(start + np.stack([gt, gh, gw], -1).reshape(-1, 3))
      start += max(h, w) // m
    pos = np.concatenate(pieces) if pieces else np.zeros((0, 3), np.int64)
    positions[row, valid] = pos
    deltas[row] = (pos.max() + 1 if len(pos) else 0) - len(valid)
  return positions, deltas


def check_placeholders(input_ids: np.ndarray, cfg: QwenVLConfig, image_tokens: int, video_tokens: int) -> None:
  """Raises unless the prompt(s) hold exactly one placeholder per merged image (video) token."""
  ids = np.asarray(input_ids)
  for kind, token, want in (("image", cfg.image_token_id, image_tokens), ("video", cfg.video_token_id, video_tokens)):
    got = int(np.sum(ids == token))
    if got != want:
      raise ValueError(f"{kind} placeholders and {kind} features do not match: {got} {kind} tokens (id {token}) in "
                       f"the prompt(s), {want} merged {kind} tokens")


def prepare(input_ids: np.ndarray, cfg: QwenVLConfig, *, pixel_values: np.ndarray | None = None,
            image_grid_thw: Sequence[Sequence[int]] = (), pixel_values_videos: np.ndarray | None = None,
            video_grid_thw: Sequence[Sequence[int]] = (), second_per_grid_ts: Sequence[float] | None = None,
            mask: np.ndarray | None = None, seq_len: int | None = None) -> dict[str, Any]:
  """transformers-style inputs (pixel_values [N P] and image_grid_thw [n 3], the same for videos) -> the
  keyword arguments of QwenVL (vision, positions), plus `deltas` [b] (decode offsets, as transformers')."""
  image_grid_thw, video_grid_thw = [tuple(g) for g in image_grid_thw], [tuple(g) for g in video_grid_thw]
  grids = image_grid_thw + video_grid_thw
  out: dict[str, Any] = {}
  if grids:
    for name, patches, g in (("pixel_values", pixel_values, image_grid_thw),
                             ("pixel_values_videos", pixel_values_videos, video_grid_thw)):
      if bool(g) != (patches is not None):
        raise ValueError(f"prepare: {name} and its grids go together ({len(g)} grids, {name} "
                         f"{'given' if patches is not None else 'missing'})")
    packing = pack_vision(grids, merge=cfg.vision.merge, window=cfg.vision.window, seq_len=seq_len)
    split = sum(packing.tokens_per_image[:len(image_grid_thw)])
    check_placeholders(input_ids, cfg, split, len(packing.merged) - split)
    patches = np.concatenate([np.asarray(p, np.float32) for p in (pixel_values, pixel_values_videos) if p is not None])
    out["vision"] = VisionInputs.from_packing(packing, patches, len(image_grid_thw))
  else:
    check_placeholders(input_ids, cfg, 0, 0)
  positions, deltas = rope_index(input_ids, cfg, image_grid_thw, video_grid_thw, second_per_grid_ts, mask)
  return {**out, "positions": jnp.asarray(positions, jnp.int32), "deltas": deltas}
