"""Image transforms in NumPy: decode, pick a resolution bucket, resize + centre crop, normalise to [-1, 1].

Shapes: h w input size, H W bucket size; images are HWC (NHWC once batched).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image


class BadImage(Exception):
  """An image that cannot be used; `reason` is the skip counter it goes to ("missing_file", ...)."""

  def __init__(self, reason: str, detail: str):
    super().__init__(f"{reason}: {detail}")
    self.reason = reason


def load_image(image: str | os.PathLike | bytes | np.ndarray) -> np.ndarray:
  """A path, encoded bytes or an array -> uint8 [h w 3]. Raises BadImage naming the file on failure."""
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3 or 0 in image.shape:
      raise BadImage("bad_image", f"array of shape {image.shape} dtype {image.dtype}, want uint8 [h w 3]")
    return image
  if isinstance(image, (str, os.PathLike)):
    try:
      with open(image, "rb") as f:
        data = f.read()
    except FileNotFoundError as e:
      raise BadImage("missing_file", str(image)) from e
    except OSError as e:
      raise BadImage("unreadable_image", f"{image}: {e}") from e
    name = str(image)
  else:
    data, name = bytes(image), f"<{len(image)} encoded bytes>"
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()  # decodes fully now, so a truncated file fails here and not later
      return np.asarray(im.convert("RGB"), np.uint8)
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise BadImage("unreadable_image", f"{name}: {e}") from e


def pick_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
  """The (H, W) bucket whose aspect ratio is closest to h / w in log space (first one wins ties)."""
  if not buckets:
    raise ValueError("no resolution buckets given")
  target = np.log(height / width)
  return min(buckets, key=lambda b: abs(np.log(b[0] / b[1]) - target))


def _resize_weights(n_in: int, n_out: int) -> np.ndarray:
  """[n_out n_in] rows of a triangle (linear) filter, widened by the scale when shrinking (antialiasing)."""
  scale = n_out / n_in
  support = max(1.0, 1.0 / scale)  # filter radius in input pixels
  centres = (np.arange(n_out) + 0.5) / scale - 0.5  # output pixel centres in input coordinates
  taps = np.arange(n_in)
  w = np.maximum(0.0, 1.0 - np.abs(taps[None, :] - centres[:, None]) / support)
  return (w / w.sum(1, keepdims=True)).astype(np.float32)


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """uint8 or float [h w c] -> float32 [height width c], separable antialiased linear resampling."""
  h, w = image.shape[:2]
  x = image.astype(np.float32)
  if (h, w) == (height, width):
    return x
  # optimize=True contracts one axis at a time (two matmuls) instead of one 4-deep loop.
  return np.einsum("Hh,hwc,Ww->HWc", _resize_weights(h, height), x, _resize_weights(w, width), optimize=True)


def resize_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """[h w c] -> float32 [height width c]: scale to cover the target, then crop the centre."""
  h, w = image.shape[:2]
  scale = max(height / h, width / w)
  rh, rw = max(height, round(h * scale)), max(width, round(w * scale))
  top, left = (rh - height) // 2, (rw - width) // 2
  return resize(image, rh, rw)[top : top + height, left : left + width]


def normalize(image: np.ndarray) -> np.ndarray:
  """Pixel values in [0, 255] -> float32 in [-1, 1]."""
  return np.clip(np.asarray(image, np.float32) / 127.5 - 1.0, -1.0, 1.0)


def to_uint8(image: np.ndarray) -> np.ndarray:
  """float in [-1, 1] -> uint8 [0, 255] (the inverse of `normalize`, rounding)."""
  return np.clip(np.round((np.asarray(image, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def prepare_image(image: np.ndarray, buckets: Sequence[tuple[int, int]]) -> np.ndarray:
  """uint8 [h w 3] -> float32 [H W 3] in [-1, 1] for the closest-aspect bucket."""
  height, width = pick_bucket(image.shape[0], image.shape[1], buckets)
  return normalize(resize_crop(image, height, width))
