"""Image editing with a converted checkpoint of any family that edits (its `Family.pipeline`): source image +
instruction -> edited PNG. Sampling flags left out take the family's defaults.

  python scripts/edit.py --ckpt DIR --image in.png --instruction "make the circle blue"
      [--steps 50] [--guidance 7.5] [--image_guidance 0] [--seed 0] [--out edited.png]
      [--strength 0.6 [--init-image start.png]]
"""

from __future__ import annotations

import sys

from absl import app, flags
from PIL import Image

import unimm_jax
from unimm_jax.convert.errors import ConversionError
from unimm_jax.sampling import cli

FLAGS = flags.FLAGS
cli.define_sampling_flags("null instruction for text guidance", image_guidance=True)
flags.DEFINE_string("image", None, "source image (resized to a multiple of the token size)", required=True)
flags.DEFINE_string("instruction", None, "edit instruction", required=True)
flags.DEFINE_string("out", "edited.png", "output PNG")
cli.define_init_flags("image the edit starts from at --strength < 1 (default: the source image)")


def main(argv):
  del argv
  try:
    model = unimm_jax.load_pipeline(FLAGS.ckpt)
    src = model.read_image(FLAGS.image)
    cfg = model.sampler_config(**cli.sampler_overrides(FLAGS))
    kw = cli.read_init_image(model, "edit", FLAGS.init_image)
  except (ValueError, OSError, ConversionError) as e:
    print(f"edit: error: {e}", file=sys.stderr)
    sys.exit(2)
  out = model.edit([src], [FLAGS.instruction], cfg, negative=FLAGS.negative, seed=FLAGS.seed, progress=True, **kw)
  Image.fromarray(out[0]).save(FLAGS.out)
  print(FLAGS.out)


if __name__ == "__main__":
  app.run(main)
