"""The shared sampling-CLI helpers: --init-image reaches only samplers that take a start image."""

import numpy as np
import pytest

from unimm_jax.sampling import cli


class _FromImage:
  def generate(self, prompts, size, cfg, *, init_images=None):
    return init_images

  def read_image(self, path):
    return np.zeros((8, 8, 3), np.uint8)


class _NoiseOnly:
  def generate(self, prompts, size, cfg):
    return []


def test_read_init_image():
  assert cli.read_init_image(_FromImage(), "generate", None) == {}
  kw = cli.read_init_image(_FromImage(), "generate", "start.png")
  assert kw["init_images"][0].shape == (8, 8, 3)
  with pytest.raises(ValueError, match=r"--init-image start.png: _NoiseOnly.generate starts from noise only"):
    cli.read_init_image(_NoiseOnly(), "generate", "start.png")
