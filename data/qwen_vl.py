"""Qwen2-VL / Qwen2.5-VL vision inputs, in NumPy + PIL: the `smart_resize` image processor and the packing of
images (and video frames) into rows for the vision tower (unimm_jax.models.qwen_vit).

The processor equals transformers' Qwen2VLImageProcessorPil (the PIL backend, what transformers runs without
torchvision): resize with PIL bicubic to `smart_resize` (both sides multiples of patch * merge, the pixel count
kept in [min_pixels, max_pixels] at the image's aspect ratio), x / 255 in float64 cast to float32,
(x - mean) / std with the OpenAI CLIP statistics, then cut into patches in merge order.

Record keys and shapes (P = channels * temporal_patch * patch * patch, m = merge):
  QwenVLImageProcessor(image) -> patches [h*w P] float32, each patch flattened (c, t, py, px) with the frame
      repeated temporal_patch times, patches ordered (h/m, w/m, m, m): each m x m merge group contiguous;
      grid (1, h, w) in patches. Several images concatenate along the first axis (transformers' pixel_values).
  pack_vision(grids) -> VisionPacking: where each patch of those images sits in the tower's packed rows
      [r t] (module docstring of unimm_jax.models.qwen_vit for the tower's inputs).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from unimm_jax.data.vision import ImageLike, _check_hf_flags, _to_pil, rescale_normalize

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
  """(h, w) multiples of `factor` with min_pixels <= h * w <= max_pixels, closest to the image's aspect ratio:
  transformers' qwen2_vl smart_resize, line for line (its roundings decide the patch grid)."""
  if min(height, width) <= 0:
    raise ValueError(f"smart_resize: image of {height}x{width} pixels has no pixels")
  if max(height, width) / min(height, width) > 200:
    raise ValueError(f"smart_resize: image of {height}x{width} pixels: absolute aspect ratio must be smaller than "
                     f"200, got {max(height, width) / min(height, width)}")
  h_bar = round(height / factor) * factor
  w_bar = round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt((height * width) / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  if not h_bar or not w_bar:  # min_pixels 0 lets a thin image round to nothing
    raise ValueError(f"smart_resize: image of {height}x{width} pixels is smaller than one {factor}x{factor} merged "
                     f"patch at min_pixels={min_pixels}")
  return h_bar, w_bar


def patchify(pixels: np.ndarray, patch: int, merge: int, temporal_patch: int) -> np.ndarray:
  """[H W C] float -> [(H/p)(W/p) (C tp p p)]: patches in merge order, each frame repeated tp times (an image is a
  still clip), as Qwen2VLImageProcessor.patchify."""
  h, w, c = pixels.shape
  factor = patch * merge
  if h < factor or w < factor or h % factor or w % factor:
    raise ValueError(f"patchify: image of {h}x{w} pixels is not a positive multiple of patch * merge = {factor}")
  x = pixels.reshape(h // factor, merge, patch, w // factor, merge, patch, c)
  x = x.transpose(0, 3, 1, 4, 6, 2, 5)                          # (h/m, w/m, m, m, c, py, px)
  x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], temporal_patch, patch, patch))
  return np.ascontiguousarray(x.reshape((h // patch) * (w // patch), c * temporal_patch * patch * patch),
                              dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class QwenVLImageProcessor:
  """Qwen2-VL / Qwen2.5-VL image preprocessing: image -> (patches [h*w P] float32, grid (1, h, w))."""

  patch: int = 14
  temporal_patch: int = 2
  merge: int = 2
  min_pixels: int = 56 * 56
  max_pixels: int = 28 * 28 * 1280
  resample: int = Image.Resampling.BICUBIC
  rescale_factor: float = 1 / 255
  mean: tuple[float, ...] = OPENAI_CLIP_MEAN
  std: tuple[float, ...] = OPENAI_CLIP_STD
  convert_rgb: bool = True

  @classmethod
  def from_hf(cls, d: Mapping[str, Any]) -> "QwenVLImageProcessor":
    """From a preprocessor_config.json dict of a Qwen2VLImageProcessor (size {shortest_edge, longest_edge} are
    min/max pixels; older files carry min_pixels / max_pixels, which win as in transformers)."""
    _check_hf_flags(d, "Qwen2VLImageProcessor")
    size = d.get("size") or {}
    return cls(
        patch=d.get("patch_size", 14), temporal_patch=d.get("temporal_patch_size", 2), merge=d.get("merge_size", 2),
        min_pixels=d.get("min_pixels") or size.get("shortest_edge", cls.min_pixels),
        max_pixels=d.get("max_pixels") or size.get("longest_edge", cls.max_pixels),
        resample=d.get("resample", Image.Resampling.BICUBIC), rescale_factor=d.get("rescale_factor", 1 / 255),
        mean=tuple(d.get("image_mean", cls.mean)), std=tuple(d.get("image_std", cls.std)),
        convert_rgb=d.get("do_convert_rgb", True))

  def size_for(self, height: int, width: int) -> tuple[int, int]:
    return smart_resize(height, width, self.patch * self.merge, self.min_pixels, self.max_pixels)

  def __call__(self, image: ImageLike) -> tuple[np.ndarray, tuple[int, int, int]]:
    pil = _to_pil(image, self.convert_rgb)
    height, width = self.size_for(pil.height, pil.width)
    resized = np.asarray(pil.resize((width, height), resample=self.resample))
    resized = resized[..., None] if resized.ndim == 2 else resized
    pixels = rescale_normalize(resized, self.rescale_factor, self.mean, self.std)
    return (patchify(pixels, self.patch, self.merge, self.temporal_patch),
            (1, height // self.patch, width // self.patch))


# ----------------------------------------------------------------------------------------------
# Packing for the vision tower
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class VisionPacking:
  """Where each patch of a list of images / videos sits in the packed rows of the vision tower.

  Rows hold whole frames; inside a frame the patches are in window order (windows row-major, the merge groups
  of a window row-major, a group's m x m patches contiguous), so the tower's merger reads m^2 consecutive
  tokens and the window layers see each window as one segment.
    source     [r t] index of the patch in the concatenated processor output (pixel_values), -1 = padding
    positions  [r t 2] (row, column) of the patch in its frame (the 2D RoPE positions); 0 on padding
    frame_sizes [r t 2] (rows, columns) of the patch's frame; 0 on padding (per-image position tables)
    frame_ids  [r t] segments of the full-attention layers: frame 1, 2, ... of the row; 0 = padding
    window_ids [r t] segments of the window layers: window 1, 2, ... of the row; 0 = padding
    merged     [n] for each merged token in processor order (image by image, frame by frame, groups
               row-major), its index in the tower's merged output flattened to [(r t/m^2)]: undoes the window
               order (transformers' reverse_indices)
  """

  source: np.ndarray
  positions: np.ndarray
  frame_sizes: np.ndarray
  frame_ids: np.ndarray
  window_ids: np.ndarray
  merged: np.ndarray
  tokens_per_image: tuple[int, ...]   # merged tokens of each image / video, in order

  def rows(self, patches: np.ndarray) -> np.ndarray:
    """pixel_values [N P] -> the tower's input rows [r t P] (zeros on padding)."""
    if patches.ndim != 2 or patches.shape[0] != int(np.sum(self.source >= 0)):
      raise ValueError(f"VisionPacking.rows: {patches.shape} patches for a packing of "
                       f"{int(np.sum(self.source >= 0))} patches [N P]")
    out = np.take(patches, np.maximum(self.source, 0), axis=0)
    out[self.source < 0] = 0
    return out

  def unpack(self, merged_rows: np.ndarray) -> np.ndarray:
    """The tower's merged output [r t/m^2 d] -> [n d] in processor order (the LLM's placeholder order)."""
    return np.asarray(merged_rows).reshape(-1, merged_rows.shape[-1])[self.merged]


def _frame_order(h: int, w: int, merge: int, window: int) -> tuple[np.ndarray, np.ndarray]:
  """One frame of h x w patches -> (processor index of each patch in window order [h*w], window sizes in patches)."""
  gh, gw = h // merge, w // merge
  groups = np.arange(gh * gw).reshape(gh, gw)
  side = window or max(gh, gw)
  windows = [groups[i:i + side, j:j + side].reshape(-1) for i in range(0, gh, side) for j in range(0, gw, side)]
  order = np.concatenate(windows)
  unit = merge * merge
  return (order[:, None] * unit + np.arange(unit)).reshape(-1), np.asarray([len(g) * unit for g in windows])


def pack_vision(grids: Sequence[Sequence[int]], *, merge: int, window: int, seq_len: int | None = None,
                multiple: int = 64) -> VisionPacking:
  """Packs images / videos of patch grids (t, h, w) (image_grid_thw / video_grid_thw rows) into rows.

  window: merge groups per window side (Qwen2.5-VL: window_size / merge / patch = 4); 0 = no window layers.
  seq_len: row length (a multiple of merge^2); frames fill rows in order, a row is closed when the next frame
  does not fit. None: one row holding everything, padded to a multiple of `multiple`.
  """
  unit = merge * merge
  frames = []   # (image index, t, h, w)
  for i, grid in enumerate(grids):
    t, h, w = (int(v) for v in grid)
    if t < 1 or h < merge or w < merge or h % merge or w % merge:
      raise ValueError(f"pack_vision: image {i} has a patch grid (t, h, w) = {(t, h, w)}; h and w must be positive "
                       f"multiples of merge {merge} (the image is smaller than one {merge}x{merge} merged patch?)")
    frames += [(i, f, h, w) for f in range(t)]
  if not frames:
    raise ValueError("pack_vision: no images")
  sizes = [h * w for _, _, h, w in frames]
  if seq_len is None:
    length = -(-sum(sizes) // multiple) * multiple
  else:
    if seq_len % unit:
      raise ValueError(f"pack_vision: seq_len {seq_len} is not a multiple of merge^2 = {unit}")
    if max(sizes) > seq_len:
      raise ValueError(f"pack_vision: a frame of {max(sizes)} patches does not fit rows of {seq_len} tokens")
    length = seq_len
  placement, row, used = [], 0, 0
  for n in sizes:
    if used + n > length:
      row, used = row + 1, 0
    placement.append((row, used))
    used += n
  r = row + 1
  source = np.full((r, length), -1, np.int32)
  positions = np.zeros((r, length, 2), np.int32)
  frame_sizes = np.zeros((r, length, 2), np.int32)
  frame_ids = np.zeros((r, length), np.int32)
  window_ids = np.zeros((r, length), np.int32)
  next_frame, next_window = np.zeros(r, np.int32), np.zeros(r, np.int32)
  merged = []
  offset = 0
  for (i, f, h, w), (row, start), n in zip(frames, placement, sizes):
    order, window_sizes = _frame_order(h, w, merge, window)
    span = slice(start, start + n)
    source[row, span] = offset + order
    group, within = order // unit, order % unit
    positions[row, span, 0] = (group // (w // merge)) * merge + within // merge
    positions[row, span, 1] = (group % (w // merge)) * merge + within % merge
    frame_sizes[row, span] = (h, w)
    next_frame[row] += 1
    frame_ids[row, span] = next_frame[row]
    window_ids[row, span] = next_window[row] + np.repeat(np.arange(1, len(window_sizes) + 1), window_sizes)
    next_window[row] += len(window_sizes)
    slot = np.empty(n // unit, np.int64)   # merged token (processor order) -> its slot in the row
    slot[order[::unit] // unit] = np.arange(n // unit)
    merged.append(row * (length // unit) + start // unit + slot)
    offset += n
  counts = [0] * len(grids)
  for (i, _, h, w) in frames:
    counts[i] += h * w // unit
  return VisionPacking(source=source, positions=positions, frame_sizes=frame_sizes, frame_ids=frame_ids, window_ids=window_ids,
                       merged=np.concatenate(merged).astype(np.int32), tokens_per_image=tuple(counts))
