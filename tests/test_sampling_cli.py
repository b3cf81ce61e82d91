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


def test_every_pipeline_takes_every_sampling_flag():
  # sample.py / edit.py pass every flag they define (None when not given) to pipeline.sampler_config; a pipeline
  # that does not name one fails at run time for every user (UniWorld did with --strength), so check them all here
  import importlib
  import inspect
  from unimm_jax import registry
  names = (*cli.SAMPLER_FLAGS, "image_guidance", "strength")
  checked = []
  for name in registry.FAMILIES:
    pipeline = registry.lookup(registry.FAMILIES, name, "family").pipeline
    if not pipeline:
      continue
    module = importlib.import_module(pipeline.split(":")[0])
    for cls in vars(module).values():
      if inspect.isclass(cls) and cls.__module__ == module.__name__ and hasattr(cls, "sampler_config"):
        params = inspect.signature(cls.sampler_config).parameters
        takes_all = any(p.kind is p.VAR_KEYWORD for p in params.values()) or set(names) <= set(params)
        assert takes_all, f"{cls.__name__}.sampler_config does not take {sorted(set(names) - set(params))}"
        checked.append(cls.__name__)
  assert {"LoadedTuna", "OpenUniPipeline", "UniWorldPipeline", "OvisU1Pipeline", "MingPipeline"} <= set(checked), checked
