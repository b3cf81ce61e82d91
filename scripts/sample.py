"""Text-to-image with a converted checkpoint of any family that generates (its `Family.pipeline`); writes one
PNG per prompt (and a grid).

  python scripts/sample.py --ckpt DIR --prompt "a red circle on the left" [--prompt ...]
      [--size 512x512] [--steps 50] [--guidance 7.5] [--shift 3] [--negative ""] [--seed 0] [--out samples/]
      [--init-image in.png --strength 0.6] [--chat-template] [--frames 5]
With --frames N > 1 (TUNA) each prompt becomes a clip of N generated (latent) frames: NNN.gif and NNN_frames.png.
Sampling flags left out take the family's defaults (TUNA: 50 steps, guidance 7.5, shift 3).
"""

from __future__ import annotations

import inspect
import os
import sys

import numpy as np
from absl import app, flags
from PIL import Image

import unimm_jax
from unimm_jax.convert.errors import ConversionError
from unimm_jax.sampling import cli

FLAGS = flags.FLAGS
cli.define_sampling_flags("negative / null prompt for classifier-free guidance")
flags.DEFINE_multi_string("prompt", None, "prompt (repeat for several images)", required=True)
flags.DEFINE_string("size", None, "HxW in pixels, a multiple of the token size (default: 32 tokens a side)")
flags.DEFINE_string("out", "samples", "output directory")
cli.define_init_flags("image to start every prompt from (image-to-image, with --strength < 1); sets the size")
flags.DEFINE_bool("all_scales", False, "Ming-Lite-Uni: also write the images of the coarser query scales "
                  "(NNN_4x4.png, ...), which the original computes and discards")
flags.DEFINE_alias("all-scales", "all_scales")
flags.DEFINE_bool("chat_template", False, "TUNA: prompts in the reference pipeline's chat template (its system "
                  "prompt; without --negative the null branch is its fixed negative prompt)")
flags.DEFINE_alias("chat-template", "chat_template")
flags.DEFINE_integer("frames", 1, "> 1: text-to-video with this many generated (latent) frames (TUNA)")


def main(argv):
  del argv
  try:
    model = unimm_jax.load_pipeline(FLAGS.ckpt)
    extra = {"all_scales": True} if FLAGS.all_scales else {}
    if extra and not hasattr(model, "generate_scales"):
      raise ValueError(f"{FLAGS.ckpt}: --all_scales is for Ming-Lite-Uni checkpoints (multi-scale queries)")
    cfg = model.sampler_config(**cli.sampler_overrides(FLAGS), **extra)
    kw = cli.read_init_image(model, "generate", FLAGS.init_image)
    chat = {}
    if FLAGS.chat_template:
      if "chat_template" not in inspect.signature(model.generate).parameters:
        raise ValueError(f"{FLAGS.ckpt}: --chat_template is for TUNA checkpoints")
      chat = {"chat_template": True, "negative": FLAGS.negative if FLAGS["negative"].present else None}
  except (ValueError, OSError, ConversionError) as e:
    print(f"sample: error: {e}", file=sys.stderr)
    sys.exit(2)
  size = cli.parse_size(FLAGS.size, model.downsample, getattr(model, "default_size", None))
  if kw:
    init = kw["init_images"][0]
    if FLAGS.size is not None and init.shape[:2] != size:
      raise app.UsageError(f"--size {FLAGS.size}: the init image {FLAGS.init_image} is {init.shape[0]}x"
                           f"{init.shape[1]} pixels (after rounding to the token size); leave --size out")
    size = init.shape[:2]
  if FLAGS.all_scales:
    os.makedirs(FLAGS.out, exist_ok=True)
    for i, (prompt, per_scale) in enumerate(zip(FLAGS.prompt, model.generate_scales(
        FLAGS.prompt, size, cfg, negative=FLAGS.negative, seed=FLAGS.seed, progress=True))):
      for scale, img in per_scale.items():
        path = os.path.join(FLAGS.out, f"{i:03d}_{scale}.png")
        Image.fromarray(img).save(path)
        print(f"{path}\t{prompt}")
    return
  if FLAGS.frames > 1:
    if not hasattr(model, "generate_video") or kw or chat:
      raise app.UsageError(f"--frames: {FLAGS.ckpt} has no text-to-video sampler, or --init-image / --chat-template "
                           "was given too")
    from unimm_jax.data import video
    os.makedirs(FLAGS.out, exist_ok=True)
    clips = model.generate_video(FLAGS.prompt, size, FLAGS.frames, cfg, negative=FLAGS.negative, seed=FLAGS.seed,
                                 progress=True)
    for i, (prompt, clip) in enumerate(zip(FLAGS.prompt, clips)):
      path = os.path.join(FLAGS.out, f"{i:03d}.gif")
      video.write_gif(path, clip)
      Image.fromarray(np.concatenate(list(clip), axis=1)).save(os.path.join(FLAGS.out, f"{i:03d}_frames.png"))
      print(f"{path}\t{prompt}")
    return
  images = model.generate(FLAGS.prompt, size, cfg, **{"negative": FLAGS.negative, **chat}, seed=FLAGS.seed,
                          progress=True, **kw)
  os.makedirs(FLAGS.out, exist_ok=True)
  for i, (prompt, img) in enumerate(zip(FLAGS.prompt, images)):
    path = os.path.join(FLAGS.out, f"{i:03d}.png")
    Image.fromarray(img).save(path)
    print(f"{path}\t{prompt}")
  Image.fromarray(np.concatenate(images, axis=1)).save(os.path.join(FLAGS.out, "grid.png"))


if __name__ == "__main__":
  app.run(main)
