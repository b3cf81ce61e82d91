"""Image editing with a converted checkpoint of any family that edits (its `Family.pipeline`): source image +
instruction -> edited PNG. Sampling flags left out take the family's defaults.

  python scripts/edit.py --ckpt DIR --image in.png --instruction "make the circle blue"
      [--steps 50] [--guidance 7.5] [--image_guidance 0] [--seed 0] [--out edited.png]
"""

from __future__ import annotations

import sys

from absl import app, flags
from PIL import Image

import unimm_jax
from unimm_jax.convert.errors import ConversionError

FLAGS = flags.FLAGS
flags.DEFINE_string("ckpt", None, "converted checkpoint directory", required=True)
flags.DEFINE_string("image", None, "source image (resized to a multiple of the token size)", required=True)
flags.DEFINE_string("instruction", None, "edit instruction", required=True)
flags.DEFINE_string("negative", "", "null instruction for text guidance")
flags.DEFINE_integer("steps", None, "time grid points")
flags.DEFINE_float("guidance", None, "text guidance (1 = off)")
flags.DEFINE_float("image_guidance", None, "image guidance; > 0 adds a branch without the source image")
flags.DEFINE_float("shift", None, "time-grid warp")
flags.DEFINE_integer("seed", 0, "noise seed")
flags.DEFINE_string("out", "edited.png", "output PNG")


def main(argv):
  del argv
  try:
    model = unimm_jax.load_pipeline(FLAGS.ckpt)
    src = model.read_image(FLAGS.image)
    cfg = model.sampler_config(steps=FLAGS.steps, shift=FLAGS.shift, guidance=FLAGS.guidance,
                               image_guidance=FLAGS.image_guidance)
  except (ValueError, OSError, ConversionError) as e:
    print(f"edit: error: {e}", file=sys.stderr)
    sys.exit(2)
  out = model.edit([src], [FLAGS.instruction], cfg, negative=FLAGS.negative, seed=FLAGS.seed, progress=True)
  Image.fromarray(out[0]).save(FLAGS.out)
  print(FLAGS.out)


if __name__ == "__main__":
  app.run(main)
