"""InternVL dynamic tiling equals transformers' GotOcr2ImageProcessorPil with crop_to_patches (what
InternVLProcessor runs), and reads both checkpoint layouts' settings."""

import numpy as np
import pytest
import transformers
from PIL import Image

from test_vision_processing import photo
from unimm_jax.data import internvl as tiling

# (height, width): square, wide, tall, extreme strips past 12:1, a large photo, smaller than one tile
SIZES = [(37, 53), (101, 67), (13, 200), (256, 17), (64, 64), (480, 311), (30, 900), (900, 1600)]


@pytest.mark.parametrize("tile,max_tiles,thumbnail", [(448, 12, True), (28, 6, True), (56, 4, True)])
def test_tiles_equal_transformers_processor_on_several_aspect_ratios(tile, max_tiles, thumbnail):
  ref = transformers.GotOcr2ImageProcessorPil(size={"height": tile, "width": tile}, crop_to_patches=True,
                                              max_patches=max_tiles, image_mean=list(tiling.IMAGENET_MEAN),
                                              image_std=list(tiling.IMAGENET_STD))
  ours = tiling.TilingProcessor.from_hf(ref.to_dict())
  assert (ours.tile, ours.max_tiles, ours.mean) == (tile, max_tiles, tiling.IMAGENET_MEAN)
  counts = set()
  for i, (h, w) in enumerate(SIZES):
    image = photo(h, w, i)
    want = ref([image], return_tensors="np")
    got = ours(image)
    assert got.dtype == np.float32 and got.shape[1:] == (tile, tile, 3)
    assert len(got) == want["num_patches"][0] == ours.num_tiles(h, w)
    assert ref.get_number_of_image_patches(h, w, {"crop_to_patches": True}) == len(got)
    np.testing.assert_array_equal(got, want["pixel_values"].transpose(0, 2, 3, 1))
    counts.add(len(got))
  assert len(counts) >= 3   # the grids really differ


def test_grid_choice_and_thumbnail():
  p = tiling.TilingProcessor()
  assert p.grid(448, 448) == (1, 1) and p.num_tiles(448, 448) == 1           # one tile: no thumbnail
  assert p.grid(448, 896) == (2, 1) and p.num_tiles(448, 896) == 3           # 2 tiles + thumbnail
  assert p.grid(100, 200) == (2, 1)                                           # tie with (4, 2): too small for it
  assert p.grid(1000, 2000) == (4, 2)                                         # ... large enough: more tiles
  assert p.grid(10, 1000) == (12, 1)                                          # capped at max_tiles
  assert tiling.TilingProcessor(max_tiles=1).num_tiles(100, 900) == 1        # tiling off
  assert tiling.TilingProcessor(min_tiles=4).grid(448, 448) == (2, 2)
  with pytest.raises(ValueError, match="min_tiles <= max_tiles"):
    tiling.TilingProcessor(min_tiles=3, max_tiles=2)
  rgba = Image.fromarray(np.full((20, 30, 4), 200, np.uint8), "RGBA")
  np.testing.assert_array_equal(tiling.TilingProcessor(tile=14)(rgba), tiling.TilingProcessor(tile=14)(rgba.convert("RGB")))


def test_release_config_and_hf_flags():
  release = {"force_image_size": 448, "min_dynamic_patch": 1, "max_dynamic_patch": 6, "use_thumbnail": False,
             "dynamic_image_size": True}
  p = tiling.TilingProcessor.from_release(release)
  assert (p.tile, p.max_tiles, p.thumbnail, p.mean, p.std) == (448, 6, False, tiling.IMAGENET_MEAN, tiling.IMAGENET_STD)
  assert tiling.TilingProcessor.from_release({**release, "dynamic_image_size": False}).max_tiles == 1
  with pytest.raises(NotImplementedError, match="center crop"):
    tiling.TilingProcessor.from_hf({"size": {"height": 448, "width": 448}, "do_center_crop": True})
  with pytest.raises(NotImplementedError, match="non-square tiles"):
    tiling.TilingProcessor.from_hf({"size": {"height": 448, "width": 224}})
