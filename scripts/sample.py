"""Text-to-image with a converted TUNA checkpoint; writes one PNG per prompt (and a grid).

  python scripts/sample.py --ckpt DIR --prompt "a red circle on the left" [--prompt ...]
      [--size 512x512] [--steps 50] [--guidance 7.5] [--shift 3] [--negative ""] [--seed 0] [--out samples/]
"""

from __future__ import annotations

import os
import sys

import numpy as np
from absl import app, flags
from PIL import Image

from unimm_jax.sampling import tuna as tuna_sampling

FLAGS = flags.FLAGS
flags.DEFINE_string("ckpt", None, "converted TUNA directory", required=True)
flags.DEFINE_multi_string("prompt", None, "prompt (repeat for several images)", required=True)
flags.DEFINE_string("negative", "", "negative / null prompt for classifier-free guidance")
flags.DEFINE_string("size", None, "HxW in pixels, a multiple of the token size (default: 32 tokens a side)")
flags.DEFINE_integer("steps", 50, "time grid points (steps - 1 model evaluations)")
flags.DEFINE_float("guidance", 7.5, "classifier-free guidance scale (1 = off)")
flags.DEFINE_float("shift", 3.0, "time-grid warp t / (t + s - s t)")
flags.DEFINE_integer("seed", 0, "noise seed")
flags.DEFINE_string("out", "samples", "output directory")


def parse_size(size: str | None, downsample: int) -> tuple[int, int]:
  """--size in pixels (default: 32 image tokens a side)."""
  if size is None:
    return 32 * downsample, 32 * downsample
  try:
    h, w = (int(v) for v in size.lower().split("x"))
  except ValueError:
    raise app.UsageError(f"--size {size!r}: expected HxW, e.g. 512x512") from None
  if h % downsample or w % downsample:
    raise app.UsageError(f"--size {size}: must be a multiple of {downsample} pixels (one image token)")
  return h, w


def main(argv):
  del argv
  try:
    model = tuna_sampling.load(FLAGS.ckpt)
  except (ValueError, OSError) as e:
    print(f"sample: error: {e}", file=sys.stderr)
    sys.exit(2)
  size = parse_size(FLAGS.size, model.downsample)
  cfg = tuna_sampling.FlowSamplerConfig(steps=FLAGS.steps, shift=FLAGS.shift, guidance=FLAGS.guidance)
  images = model.generate(FLAGS.prompt, size, cfg, negative=FLAGS.negative, seed=FLAGS.seed, progress=True)
  os.makedirs(FLAGS.out, exist_ok=True)
  for i, (prompt, img) in enumerate(zip(FLAGS.prompt, images)):
    path = os.path.join(FLAGS.out, f"{i:03d}.png")
    Image.fromarray(img).save(path)
    print(f"{path}\t{prompt}")
  Image.fromarray(np.concatenate(images, axis=1)).save(os.path.join(FLAGS.out, "grid.png"))


if __name__ == "__main__":
  app.run(main)
