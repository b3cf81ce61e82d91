"""NumPy image preprocessing equals transformers' SigLIP / SigLIP2 processors (PIL backend); NaViT packing.

The PIL backend is what transformers runs without torchvision and what the legacy processors did;
its torchvision backend resizes with torch kernels and differs in the last bits."""

import numpy as np
import pytest
import transformers
from PIL import Image, ImageDraw, ImageFilter
from transformers.models.siglip2 import image_processing_pil_siglip2 as hf_siglip2

from unimm_jax.data import vision

SIZES = [(37, 53), (101, 67), (13, 200), (256, 17), (64, 64), (480, 311)]  # (height, width)


def photo(height: int, width: int, seed: int) -> Image.Image:
  """A random 'photo': smooth colour gradients, blurred shapes and sensor noise, so resampling filters matter."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
  base = np.stack([np.sin(6 * xx * rng.uniform(0.5, 2) + c) * np.cos(5 * yy * rng.uniform(0.5, 2) - c)
                   for c in range(3)], -1)
  img = Image.fromarray(((base + 1) * 110).astype(np.uint8))
  draw = ImageDraw.Draw(img)
  for _ in range(6):
    x0, y0 = rng.integers(0, width), rng.integers(0, height)
    box = [x0, y0, x0 + rng.integers(2, width // 2 + 3), y0 + rng.integers(2, height // 2 + 3)]
    draw.ellipse(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
  img = img.filter(ImageFilter.GaussianBlur(1.0))
  noisy = np.asarray(img).astype(np.int16) + rng.integers(-12, 13, (height, width, 3))
  return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("size", [(384, 384), (224, 160)])
def test_siglip_processor_equals_transformers(size):
  ref = transformers.SiglipImageProcessorPil(size={"height": size[0], "width": size[1]})
  ours = vision.ImageProcessor.from_hf(ref.to_dict())
  assert ours.size == size and ours.resample == Image.Resampling.BICUBIC
  images = [photo(h, w, i) for i, (h, w) in enumerate(SIZES)]
  want = ref(images, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  got = np.stack([ours(im) for im in images])
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(ours(np.asarray(images[0])), got[0])       # uint8 arrays work too
  np.testing.assert_array_equal(ours(images[0].convert("RGBA")), got[0])   # converted to RGB like HF


@pytest.mark.parametrize("patch,max_num_patches", [(16, 256), (14, 64), (4, 50)])
def test_naflex_processor_equals_transformers_siglip2(patch, max_num_patches):
  ref = transformers.Siglip2ImageProcessorPil(patch_size=patch, max_num_patches=max_num_patches)
  ours = vision.NaFlexProcessor.from_hf(ref.to_dict())
  images = [photo(h, w, 10 + i) for i, (h, w) in enumerate(SIZES)]
  want = ref(images, return_tensors="np")
  got = [ours(im) for im in images]
  np.testing.assert_array_equal(np.stack([g["patches"] for g in got]), want["pixel_values"])
  np.testing.assert_array_equal(np.stack([g["mask"] for g in got]), want["pixel_attention_mask"])
  np.testing.assert_array_equal(np.stack([g["spatial_shape"] for g in got]), want["spatial_shapes"])
  assert len({tuple(g["spatial_shape"]) for g in got}) > 3  # aspect ratios really differ


def test_naflex_size_equals_transformers_on_many_shapes():
  rng = np.random.default_rng(0)
  for h, w in rng.integers(1, 3000, (300, 2)):
    for patch, n in [(16, 256), (14, 729), (16, 1024)]:
      assert vision.naflex_size(int(h), int(w), patch, n) == hf_siglip2.get_image_size_for_max_num_patches(
          int(h), int(w), patch, n), (h, w, patch, n)


def test_to_patches_orders_patch_rows_cols_then_pixels_and_channels():
  image = np.arange(4 * 6 * 3).reshape(4, 6, 3)
  patches = vision.to_patches(image, 2)
  assert patches.shape == (6, 12)
  np.testing.assert_array_equal(patches[4], image[2:4, 2:4].reshape(-1))  # patch row 1, col 1
  chw = image.transpose(2, 0, 1)
  np.testing.assert_array_equal(patches, hf_siglip2.convert_image_to_patches(chw, 2))
  with pytest.raises(ValueError, match="not a multiple of patch 4"):
    vision.to_patches(image, 4)


def test_pack_patches_fills_rows_in_order_and_skips_bad_images():
  shapes = [(2, 3), (3, 3), (3, 5), (1, 4), (2, 2), (1, 1), (1, 2)]
  items = [(np.full((h * w, 2), i + 1.0, np.float32), (h, w)) for i, (h, w) in enumerate(shapes)]
  items.insert(2, (np.zeros((30, 2), np.float32), (5, 6)))   # longer than a row: skipped, counted
  items.insert(3, (np.zeros((5, 2), np.float32), (2, 3)))    # patch count != h*w: skipped, counted
  rows, skipped = vision.pack_patches(items, seq_len=16, images_per_row=3)
  assert skipped == 2 and len(rows) == 4
  np.testing.assert_array_equal(rows[0]["segment_ids"], [1] * 6 + [2] * 9 + [0])
  np.testing.assert_array_equal(rows[0]["positions"], list(range(6)) + list(range(9)) + [0])
  np.testing.assert_array_equal(rows[0]["spatial_shapes"], [[2, 3], [3, 3], [0, 0]])
  np.testing.assert_array_equal(rows[0]["patches"][:, 0], [1.0] * 6 + [2.0] * 9 + [0.0])
  np.testing.assert_array_equal(rows[1]["segment_ids"], [1] * 15 + [0])   # the next 4 patches do not fit
  np.testing.assert_array_equal(rows[2]["spatial_shapes"], [[1, 4], [2, 2], [1, 1]])
  np.testing.assert_array_equal(rows[3]["spatial_shapes"], [[1, 2], [0, 0], [0, 0]])  # images_per_row reached
  assert all(r["patches"].dtype == np.float32 and r["segment_ids"].dtype == np.int32 for r in rows)
