"""Image preprocessing for the vision encoders, in NumPy + PIL (no torch, no JAX): grain-friendly.

Equal to transformers' PIL-backend image processors (the ones transformers uses without
torchvision): SiglipImageProcessor (resize to a fixed size with PIL bicubic, x / 255 in float64 cast
to float32, (x - mean) / std in float32) and Siglip2ImageProcessor (NaFlex: resize with PIL bilinear
to the largest patch grid that fits `max_num_patches` at the image's aspect ratio, same rescale and
normalisation, cut into patches, pad). Images in and out are HWC.

Record keys (numpy arrays), shapes with t = max_num_patches or seq_len, P = patch*patch*channels:
  NaFlexProcessor:  patches [t P] float32 ((py, px, c)-flattened, row-major patches), mask [t] int32
                    (1 = real patch), spatial_shape [2] int32 (patch rows, cols).
  pack_patches:     patches [t P] float32, segment_ids [t] int32 (image 1..n of the row, 0 = padding),
                    positions [t] int32 (row-major patch index within its image), spatial_shapes
                    [n 2] int32 ((0, 0) for unused image slots) -- the packed input of
                    unimm_jax.models.siglip.VisionTransformer.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

ImageLike = Image.Image | np.ndarray   # PIL image, or uint8 array [H W C]


def _to_pil(image: ImageLike, convert_rgb: bool) -> Image.Image:
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8 or image.ndim != 3:
      raise ValueError(f"expected a uint8 [H W C] array or a PIL image, got {image.dtype} {image.shape}")
    image = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  if convert_rgb and image.mode != "RGB":
    image = image.convert("RGB")
  return image


def rescale_normalize(pixels: np.ndarray, factor: float, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """uint8 [H W C] -> float32, as transformers: (x * factor in float64) cast to float32, then (x - mean) / std."""
  x = (pixels.astype(np.float64) * factor).astype(np.float32)
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def naflex_size(height: int, width: int, patch: int, max_num_patches: int, eps: float = 1e-5) -> tuple[int, int]:
  """Largest (h, w), multiples of `patch`, at the image's aspect ratio with h*w/patch^2 <= max_num_patches.

  The scale is found by bisection on [eps/10, 100] until the bracket is narrower than eps, exactly
  as transformers' get_image_size_for_max_num_patches (so sizes agree to the pixel).
  """
  def scaled(scale: float, size: int) -> int:
    return max(patch, math.ceil(size * scale / patch) * patch)

  lo, hi = eps / 10, 100.0
  while hi - lo >= eps:
    mid = (lo + hi) / 2
    if (scaled(mid, height) / patch) * (scaled(mid, width) / patch) <= max_num_patches:
      lo = mid
    else:
      hi = mid
  return scaled(lo, height), scaled(lo, width)


def to_patches(image: np.ndarray, patch: int) -> np.ndarray:
  """[H W C] -> [(H/p)(W/p), p*p*C]: row-major patches, each flattened (py, px, c)."""
  h, w, c = image.shape
  if h % patch or w % patch:
    raise ValueError(f"image {image.shape} is not a multiple of patch {patch}")
  x = image.reshape(h // patch, patch, w // patch, patch, c).transpose(0, 2, 1, 3, 4)
  return x.reshape((h // patch) * (w // patch), patch * patch * c)


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
  """SigLIP fixed-resolution preprocessing: image -> float32 [H W C]."""

  size: tuple[int, int] = (224, 224)             # (height, width)
  resample: int = Image.Resampling.BICUBIC
  rescale_factor: float = 1 / 255
  mean: tuple[float, ...] = (0.5, 0.5, 0.5)
  std: tuple[float, ...] = (0.5, 0.5, 0.5)
  convert_rgb: bool = True

  @classmethod
  def from_hf(cls, d: Mapping[str, Any]) -> "ImageProcessor":
    """From a preprocessor_config.json dict of a SiglipImageProcessor."""
    _check_hf_flags(d, "SiglipImageProcessor")
    size = d.get("size", {"height": 224, "width": 224})
    return cls(size=(size["height"], size["width"]), resample=d.get("resample", Image.Resampling.BICUBIC),
               rescale_factor=d.get("rescale_factor", 1 / 255), mean=tuple(d.get("image_mean", cls.mean)),
               std=tuple(d.get("image_std", cls.std)), convert_rgb=d.get("do_convert_rgb", True))

  def __call__(self, image: ImageLike) -> np.ndarray:
    pil = _to_pil(image, self.convert_rgb)
    resized = np.asarray(pil.resize((self.size[1], self.size[0]), resample=self.resample))
    resized = resized[..., None] if resized.ndim == 2 else resized
    return rescale_normalize(resized, self.rescale_factor, self.mean, self.std)


@dataclasses.dataclass(frozen=True)
class NaFlexProcessor:
  """SigLIP2 NaFlex preprocessing: image -> {patches, mask, spatial_shape} (keys in the module docstring)."""

  patch: int = 16
  max_num_patches: int = 256
  resample: int = Image.Resampling.BILINEAR
  rescale_factor: float = 1 / 255
  mean: tuple[float, ...] = (0.5, 0.5, 0.5)
  std: tuple[float, ...] = (0.5, 0.5, 0.5)
  convert_rgb: bool = False   # transformers' Siglip2ImageProcessor does not convert by default

  @classmethod
  def from_hf(cls, d: Mapping[str, Any]) -> "NaFlexProcessor":
    """From a preprocessor_config.json dict of a Siglip2ImageProcessor."""
    _check_hf_flags(d, "Siglip2ImageProcessor")
    return cls(patch=d.get("patch_size", 16), max_num_patches=d.get("max_num_patches", 256),
               resample=d.get("resample", Image.Resampling.BILINEAR),
               rescale_factor=d.get("rescale_factor", 1 / 255), mean=tuple(d.get("image_mean", cls.mean)),
               std=tuple(d.get("image_std", cls.std)), convert_rgb=bool(d.get("do_convert_rgb") or False))

  def patchify(self, image: ImageLike) -> tuple[np.ndarray, tuple[int, int]]:
    """image -> (patches [h*w P] float32, (h, w) patch grid), unpadded (for packing)."""
    pil = _to_pil(image, self.convert_rgb)
    height, width = naflex_size(pil.height, pil.width, self.patch, self.max_num_patches)
    resized = np.asarray(pil.resize((width, height), resample=self.resample))
    resized = resized[..., None] if resized.ndim == 2 else resized
    pixels = rescale_normalize(resized, self.rescale_factor, self.mean, self.std)
    return to_patches(pixels, self.patch), (height // self.patch, width // self.patch)

  def __call__(self, image: ImageLike) -> dict[str, np.ndarray]:
    patches, (h, w) = self.patchify(image)
    padded = np.zeros((self.max_num_patches, patches.shape[1]), np.float32)
    padded[: len(patches)] = patches
    mask = np.zeros(self.max_num_patches, np.int32)
    mask[: len(patches)] = 1
    return {"patches": padded, "mask": mask, "spatial_shape": np.array([h, w], np.int32)}


def _check_hf_flags(d: Mapping[str, Any], name: str) -> None:
  off = [k for k in ("do_resize", "do_rescale", "do_normalize") if d.get(k) is False]
  if off or d.get("do_center_crop") or d.get("do_pad"):
    raise NotImplementedError(f"{name} config with {off or 'center crop / pad'} is not supported")


def pack_patches(
    items: Iterable[tuple[np.ndarray, tuple[int, int]]], seq_len: int, images_per_row: int,
) -> tuple[list[dict[str, np.ndarray]], int]:
  """Packs (patches [n P], (h, w)) items in order into rows of `seq_len` tokens (NaViT).

  A row is closed when the next image does not fit or it holds `images_per_row` images. Returns
  (rows, skipped): an image with more than `seq_len` patches, or whose patch count is not h*w,
  is skipped and counted, never truncated.
  """
  rows, skipped, current = [], 0, []

  def emit():
    dim = current[0][0].shape[1]
    row = {"patches": np.zeros((seq_len, dim), np.float32), "segment_ids": np.zeros(seq_len, np.int32),
           "positions": np.zeros(seq_len, np.int32), "spatial_shapes": np.zeros((images_per_row, 2), np.int32)}
    start = 0
    for i, (patches, hw) in enumerate(current):
      n = len(patches)
      row["patches"][start:start + n] = patches
      row["segment_ids"][start:start + n] = i + 1
      row["positions"][start:start + n] = np.arange(n)
      row["spatial_shapes"][i] = hw
      start += n
    rows.append(row)

  used = 0
  for patches, (h, w) in items:
    if len(patches) > seq_len or len(patches) != h * w or len(patches) == 0:
      skipped += 1
      continue
    if current and (used + len(patches) > seq_len or len(current) == images_per_row):
      emit()
      current, used = [], 0
    current.append((np.asarray(patches, np.float32), (h, w)))
    used += len(patches)
  if current:
    emit()
  return rows, skipped
