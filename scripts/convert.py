"""Convert a Hugging Face / PyTorch checkpoint into an unimm-jax Orbax checkpoint, or export back.

  python scripts/convert.py --src HF_DIR --dst OUT_DIR [--param_dtype bfloat16] [--overwrite]
  python scripts/convert.py --export --src OUT_DIR --dst HF_DIR
  # a part of a bigger checkpoint, by family name: the text decoder alone of a Qwen2.5-VL directory
  python scripts/convert.py --src QWEN2_5_VL_DIR --dst OUT_DIR --family qwen
  # an original Wan VAE release file (no config.json): the architecture comes from a preset
  python scripts/convert.py --wan_vae wan2.1 --src Wan2.1_VAE.pth --dst OUT_DIR     # or wan2.2 + Wan2.2_VAE.pth
  # TUNA: a tuna-2 reference checkpoint (model.safetensors / .pt with its parameter names)
  python scripts/convert.py --tuna 2b --src tuna.safetensors --tokenizer QWEN_DIR --dst OUT_DIR
  # TUNA stage 1 from pretrained parts (Qwen2.5 HF dir, SigLIP HF dir, Wan 2.2 VAE dir or .pth)
  python scripts/convert.py --tuna 2b --llm QWEN_DIR --siglip SIGLIP_DIR --vae VAE --dst OUT_DIR

A release without a config.json is converted by its family's `Reference` (unimm_jax/convert/family.py): each
such family of unimm_jax.registry adds its flag (--tuna, --wan_vae, ...) and the part flags it reads.

The destination is written to a temporary sibling that replaces it only when the conversion succeeded: a
failure, SIGTERM or Ctrl-C (exit status 143 / 130) leaves an existing OUT_DIR byte for byte as it was, and what a
killed run left beside it (OUT_DIR.tmp-*) is removed by the next one.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

from unimm_jax import cli, registry
from unimm_jax.convert import hf
from unimm_jax.convert.errors import ConversionError

FLAGS = flags.FLAGS
flags.DEFINE_string("src", None, "HF model directory (import), converted directory (--export) or release weights")
flags.DEFINE_string("dst", None, "destination directory (written atomically)", required=True)
flags.DEFINE_bool("export", False, "export a converted checkpoint back to HF safetensors + config.json")
flags.DEFINE_enum("param_dtype", None, ["float32", "bfloat16", "float16"], "stored dtype (default: the source's)")
flags.DEFINE_bool("overwrite", False, "replace an existing destination")
flags.DEFINE_string("family", None, "read --src with this model family (unimm_jax.registry) instead of the one of its "
                    "model_type, e.g. qwen for a Qwen2.5-VL directory's text decoder")

REFERENCES = [fam.reference for fam in registry.families() if fam.reference is not None]
PARTS: dict[str, str] = {}
for _ref in REFERENCES:
  flags.DEFINE_string(_ref.flag, None, _ref.help)
  PARTS.update({name: help for name, help in _ref.parts.items() if name not in PARTS})
for _name, _help in PARTS.items():
  flags.DEFINE_string(_name, None, _help)


def main(argv):
  del argv
  chosen = [ref for ref in REFERENCES if FLAGS[ref.flag].value]
  if len(chosen) > 1:
    raise app.UsageError(f"pass one of {', '.join('--' + r.flag for r in chosen)}")
  try:
    if chosen:
      ref = chosen[0]
      parts = {name: FLAGS[name].value for name in ref.parts}
      stray = [f"--{n}" for n in PARTS if FLAGS[n].value and n not in ref.parts]
      if stray:
        raise app.UsageError(f"--{ref.flag} does not read {', '.join(stray)}")
      report = registry.resolve(ref.convert)(FLAGS[ref.flag].value, FLAGS.src, FLAGS.dst, parts, FLAGS.overwrite)
    elif not FLAGS.src:
      raise app.UsageError("--src is required")
    elif FLAGS.export:
      report = hf.export_to_hf(FLAGS.src, FLAGS.dst, overwrite=FLAGS.overwrite)
    else:
      report = hf.convert_to_orbax(FLAGS.src, FLAGS.dst, param_dtype=FLAGS.param_dtype, overwrite=FLAGS.overwrite,
                                   family=FLAGS.family)
  except (ConversionError, KeyError) as e:
    print(f"convert: error: {e}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  try:
    with cli.sigterm_as_interrupt():  # so the temporary destination is removed on the way out
      app.run(main)
  except KeyboardInterrupt as e:
    cli.stopped("convert", e, f"interrupted; {FLAGS.dst} is as it was before")
