"""InternVL dynamic tiling, in NumPy + PIL: an image -> 448 px tiles of the grid closest to its aspect ratio
(min_tiles..max_tiles of them) plus, when there is more than one, a thumbnail of the whole image.

Equal to transformers' GotOcr2ImageProcessorPil with crop_to_patches (what InternVLProcessor runs: it turns
crop_to_patches on), and to the original release's `dynamic_preprocess` + `build_transform` (BICUBIC, ImageNet
mean / std). Images in and out are HWC.

  TilingProcessor(image) -> float32 [n tile tile 3]: the tiles row-major over the grid, then the thumbnail.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from unimm_jax.data.vision import ImageLike, _check_hf_flags, _to_pil, rescale_normalize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)   # GotOcr2ImageProcessor's defaults
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@functools.lru_cache(maxsize=32)
def tile_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
  """Every (columns, rows) grid with min_tiles <= columns * rows <= max_tiles, by tile count (stable)."""
  grids = [(w, h) for w in range(1, max_tiles + 1) for h in range(1, max_tiles + 1)
           if min_tiles <= w * h <= max_tiles]
  return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def best_grid(height: int, width: int, tile: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
  """(columns, rows) of the grid whose aspect ratio is closest to the image's. On a tie (the same ratio, so a
  larger multiple of the grid) the larger grid wins while the image covers more than half of its area."""
  aspect, area = width / height, width * height
  best, best_diff = (1, 1), float("inf")
  for cols, rows in tile_grids(min_tiles, max_tiles):
    diff = abs(aspect - cols / rows)
    if diff < best_diff:
      best, best_diff = (cols, rows), diff
    elif diff == best_diff and area > 0.5 * tile * tile * cols * rows:
      best = (cols, rows)
  return best


@dataclasses.dataclass(frozen=True)
class TilingProcessor:
  """InternVL preprocessing: image -> float32 [n tile tile 3] (module docstring)."""

  tile: int = 448
  min_tiles: int = 1
  max_tiles: int = 12
  thumbnail: bool = True
  resample: int = Image.Resampling.BICUBIC
  rescale_factor: float = 1 / 255
  mean: tuple[float, ...] = IMAGENET_MEAN
  std: tuple[float, ...] = IMAGENET_STD
  convert_rgb: bool = True

  def __post_init__(self):
    if not 1 <= self.min_tiles <= self.max_tiles:
      raise ValueError(f"TilingProcessor: need 1 <= min_tiles <= max_tiles, got {self.min_tiles}, {self.max_tiles}")

  @classmethod
  def from_hf(cls, d: Mapping[str, Any]) -> "TilingProcessor":
    """From the preprocessor_config.json of transformers' InternVL (GotOcr2ImageProcessor); InternVLProcessor
    crops to tiles whatever its crop_to_patches says."""
    _check_hf_flags(d, "GotOcr2ImageProcessor")
    size = d.get("size", {"height": 384, "width": 384})
    if size.get("height") != size.get("width"):
      raise NotImplementedError(f"GotOcr2ImageProcessor: non-square tiles {size} are not supported")
    return cls(tile=size["height"], min_tiles=d.get("min_patches", 1), max_tiles=d.get("max_patches", 12),
               resample=d.get("resample", Image.Resampling.BICUBIC), rescale_factor=d.get("rescale_factor", 1 / 255),
               mean=tuple(d.get("image_mean", CLIP_MEAN)), std=tuple(d.get("image_std", CLIP_STD)),
               convert_rgb=d.get("do_convert_rgb", True))

  @classmethod
  def from_release(cls, d: Mapping[str, Any]) -> "TilingProcessor":
    """From the config.json of the original release (InternVLChatConfig: force_image_size, min/max_dynamic_patch,
    use_thumbnail, dynamic_image_size)."""
    tile = d.get("force_image_size") or (d.get("vision_config") or {}).get("image_size", 448)
    dynamic = d.get("dynamic_image_size", True)
    return cls(tile=tile, min_tiles=d.get("min_dynamic_patch", 1) if dynamic else 1,
               max_tiles=d.get("max_dynamic_patch", 12) if dynamic else 1, thumbnail=d.get("use_thumbnail", True))

  def grid(self, height: int, width: int) -> tuple[int, int]:
    """(columns, rows) of tiles for an image of height x width pixels ((1, 1) when tiling is off)."""
    if self.max_tiles == 1:
      return 1, 1
    return best_grid(height, width, self.tile, self.min_tiles, self.max_tiles)

  def num_tiles(self, height: int, width: int) -> int:
    cols, rows = self.grid(height, width)
    return cols * rows + (self.thumbnail and cols * rows > 1)

  def __call__(self, image: ImageLike) -> np.ndarray:
    pil = _to_pil(image, self.convert_rgb)
    cols, rows = self.grid(pil.height, pil.width)
    t = self.tile
    canvas = np.asarray(pil.resize((cols * t, rows * t), resample=self.resample))
    canvas = canvas[..., None] if canvas.ndim == 2 else canvas
    tiles = [canvas[r * t:(r + 1) * t, c * t:(c + 1) * t] for r in range(rows) for c in range(cols)]
    if self.thumbnail and len(tiles) > 1:
      thumb = np.asarray(pil.resize((t, t), resample=self.resample))
      tiles.append(thumb[..., None] if thumb.ndim == 2 else thumb)
    return np.stack([rescale_normalize(x, self.rescale_factor, self.mean, self.std) for x in tiles])
