"""The sampling flags scripts/sample.py and edit.py share: one definition, the family's defaults when left out;
and chat.py's --route auto (a checkpoint whose router picks per prompt to answer or to draw)."""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app, flags
from PIL import Image

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


def parse_size(size: str | None, downsample: int, default: tuple[int, int] | None = None) -> tuple[int, int]:
  """--size HxW in pixels (default: the pipeline's `default_size`, else 32 image tokens a side)."""
  if size is None:
    return default or (32 * downsample, 32 * downsample)
  try:
    h, w = (int(v) for v in size.lower().split("x"))
  except ValueError:
    raise app.UsageError(f"--size {size!r}: expected HxW, e.g. 512x512") from None
  if h % downsample or w % downsample:
    raise app.UsageError(f"--size {size}: must be a multiple of {downsample} pixels (one image token)")
  return h, w


def define_route_flags() -> None:
  """chat.py's --route (answer | auto) and, for the prompts the router sends to generation, --size, --steps and
  --image_out."""
  flags.DEFINE_enum("route", "answer", ["answer", "auto"], "answer: every prompt is a question; auto: the "
                    "checkpoint's task head (UniWorld converted with --task_head) answers or draws per prompt")
  flags.DEFINE_string("size", None, "--route auto: HxW of drawn images (an edit keeps its source's aspect with "
                      "this pixel count); default: the family's")
  flags.DEFINE_integer("steps", None, "--route auto: sampling steps of drawn images; default: the family's")
  flags.DEFINE_string("image_out", "routed", "--route auto: directory of the drawn images (NNN.png)")


def respond_routed(model: Any, ckpt: str, images: Sequence[Sequence[np.ndarray]], prompts: Sequence[str],
                   values: Any, **answer_kw) -> list[str]:
  """--route auto: per prompt the pipeline's `respond` (its router's choice) -> the answer text, or the path of
  the drawn image written under --image_out."""
  if not hasattr(model, "respond"):
    raise ValueError(f"{ckpt}: --route auto needs a pipeline with a generate-or-answer router (UniWorld)")
  cfg = model.sampler_config(steps=values["steps"].value)
  size = parse_size(values["size"].value, model.downsample, getattr(model, "default_size", None))
  out = []
  for i, (imgs, prompt) in enumerate(zip(images, prompts)):
    reply = model.respond(imgs, prompt, cfg, size=size, seed=values["seed"].value, **answer_kw)
    if isinstance(reply, np.ndarray):
      path = os.path.join(values["image_out"].value, f"{i:03d}.png")
      os.makedirs(values["image_out"].value, exist_ok=True)
      Image.fromarray(reply).save(path)
      reply = f"[image] {path}"
    out.append(reply)
  return out
