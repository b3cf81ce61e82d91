"""Convert a Hugging Face / PyTorch checkpoint into an unimm-jax Orbax checkpoint, or export back.

  python scripts/convert.py --src HF_DIR --dst OUT_DIR [--param_dtype bfloat16] [--overwrite]
  python scripts/convert.py --export --src OUT_DIR --dst HF_DIR
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

from unimm_jax.convert import hf
from unimm_jax.convert.errors import ConversionError

FLAGS = flags.FLAGS
flags.DEFINE_string("src", None, "HF model directory (import) or converted directory (--export)", required=True)
flags.DEFINE_string("dst", None, "destination directory (written atomically)", required=True)
flags.DEFINE_bool("export", False, "export a converted checkpoint back to HF safetensors + config.json")
flags.DEFINE_enum("param_dtype", None, ["float32", "bfloat16", "float16"], "stored dtype (default: the source's)")
flags.DEFINE_bool("overwrite", False, "replace an existing destination")


def main(argv):
  del argv
  try:
    if FLAGS.export:
      report = hf.export_to_hf(FLAGS.src, FLAGS.dst, overwrite=FLAGS.overwrite)
    else:
      report = hf.convert_to_orbax(FLAGS.src, FLAGS.dst, param_dtype=FLAGS.param_dtype, overwrite=FLAGS.overwrite)
  except ConversionError as e:
    print(f"convert: error: {e}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  app.run(main)
