"""The sampling flags scripts/sample.py and edit.py share: one definition, the family's defaults when left out."""

from __future__ import annotations

import inspect
from typing import Any

from absl import flags

SAMPLER_FLAGS = ("steps", "guidance", "shift")


def define_sampling_flags(negative_help: str, *, image_guidance: bool = False) -> None:
  """--ckpt, --negative, --steps, --guidance, --shift (and --image_guidance), --seed on absl's FLAGS."""
  flags.DEFINE_string("ckpt", None, "converted checkpoint directory", required=True)
  flags.DEFINE_string("negative", "", negative_help)
  flags.DEFINE_integer("steps", None, "time grid points (steps - 1 model evaluations); default: the family's")
  flags.DEFINE_float("guidance", None, "text guidance scale (1 = off); default: the family's")
  flags.DEFINE_float("shift", None, "time-grid shift; default: the family's")
  if image_guidance:
    flags.DEFINE_float("image_guidance", None, "image guidance; > 0 adds a branch without the source image")
  flags.DEFINE_integer("seed", 0, "noise seed")


def define_init_flags(init_help: str) -> None:
  """--init_image (also spelt --init-image) and --strength: image-to-image from a given image."""
  flags.DEFINE_string("init_image", None, init_help)
  flags.DEFINE_alias("init-image", "init_image")
  flags.DEFINE_float("strength", None, "start point on the time grid: 1 = pure noise (default), 0 = the init image")


def read_init_image(model: Any, method: str, path: str | None) -> dict[str, Any]:
  """`{"init_images": [image]}` for `model.<method>` from --init-image (empty without it); a clear error for a
  family whose sampler starts from noise only."""
  if path is None:
    return {}
  if "init_images" not in inspect.signature(getattr(model, method)).parameters:
    raise ValueError(f"--init-image {path}: {type(model).__name__}.{method} starts from noise only "
                     "(image-to-image is a TUNA option)")
  return {"init_images": [model.read_image(path)]}


def sampler_overrides(values: Any) -> dict[str, Any]:
  """The sampling flags given on the command line, for `pipeline.sampler_config(**overrides)`."""
  names = SAMPLER_FLAGS + tuple(n for n in ("image_guidance", "strength") if n in values)
  return {n: values[n].value for n in names}
