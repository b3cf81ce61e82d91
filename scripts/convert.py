"""Convert a Hugging Face / PyTorch checkpoint into an unimm-jax Orbax checkpoint, or export back.

  python scripts/convert.py --src HF_DIR --dst OUT_DIR [--param_dtype bfloat16] [--overwrite]
  python scripts/convert.py --export --src OUT_DIR --dst HF_DIR
  # an original Wan VAE release file (no config.json): the architecture comes from a preset
  python scripts/convert.py --wan_vae wan2.1 --src Wan2.1_VAE.pth --dst OUT_DIR     # or wan2.2 + Wan2.2_VAE.pth
  # TUNA: a tuna-2 reference checkpoint (model.safetensors / .pt with its parameter names)
  python scripts/convert.py --tuna 2b --src tuna.safetensors --tokenizer QWEN_DIR --dst OUT_DIR
  # TUNA stage 1 from pretrained parts (Qwen2.5 HF dir, SigLIP HF dir, Wan 2.2 VAE dir or .pth)
  python scripts/convert.py --tuna 2b --llm QWEN_DIR --siglip SIGLIP_DIR --vae VAE --dst OUT_DIR

The destination is written to a temporary sibling that replaces it only when the conversion succeeded: a
failure, SIGTERM or Ctrl-C (exit status 143 / 130) leaves an existing OUT_DIR byte for byte as it was, and what a
killed run left beside it (OUT_DIR.tmp-*) is removed by the next one.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/

from unimm_jax import checkpoint, cli
from unimm_jax.convert import hf
from unimm_jax.convert.errors import ConversionError

FLAGS = flags.FLAGS
flags.DEFINE_string("src", None, "HF model directory (import), converted directory (--export) or TUNA weights")
flags.DEFINE_string("dst", None, "destination directory (written atomically)", required=True)
flags.DEFINE_bool("export", False, "export a converted checkpoint back to HF safetensors + config.json")
flags.DEFINE_enum("param_dtype", None, ["float32", "bfloat16", "float16"], "stored dtype (default: the source's)")
flags.DEFINE_bool("overwrite", False, "replace an existing destination")
flags.DEFINE_string("tuna", None, "TUNA variant of configs/tuna.py (tiny, 2b, 7b, tuna2_7b)")
flags.DEFINE_string("tokenizer", None, "TUNA: directory whose tokenizer files are copied (default: --llm)")
flags.DEFINE_string("llm", None, "TUNA from parts: Qwen2.5 HF directory")
flags.DEFINE_string("siglip", None, "TUNA from parts: SigLIP / SigLIP2 HF directory")
flags.DEFINE_string("wan_vae", None, "preset (wan2.1, wan2.2, tuna) of an original Wan VAE .pth given as --src")
flags.DEFINE_string("vae", None, "TUNA: Wan 2.2 VAE (diffusers directory, or the original Wan2.2_VAE.pth)")


def convert_tuna() -> dict:
  import jax

  from configs import tuna as tuna_configs
  from unimm_jax.convert import engine, sources
  from unimm_jax.convert import tuna as tuna_convert
  from unimm_jax.convert.maps import vae_wan as vae_wan_map
  from unimm_jax.models import vae_wan
  checkpoint.clean_partial(FLAGS.dst)  # first: a destination an interrupted run had moved aside comes back
  cfg = tuna_configs.model_config(FLAGS.tuna)
  vae_cfg = vae_wan.preset("tuna") if cfg.space == "latent" else None
  vae_params = None
  if FLAGS.src:
    cfg, params, vae_params = tuna_convert.convert_reference(FLAGS.src, cfg, vae_cfg, place=jax.device_put)
  else:
    if not FLAGS.llm:
      raise app.UsageError("--tuna needs --src (reference weights) or --llm [--siglip] [--vae] (parts)")
    cfg, params = tuna_convert.init_from_parts(cfg, llm=FLAGS.llm, siglip=FLAGS.siglip)
  if FLAGS.vae and vae_params is None:
    if os.path.isdir(FLAGS.vae):
      _, vae_cfg, vae_params = hf.convert_hf(FLAGS.vae, latent_shift="std")
    else:  # the original Wan2.2_VAE.pth
      abstract = engine.flatten(hf.abstract_params(hf.FAMILIES["vae_wan"], vae_cfg))
      vae_params = engine.unflatten(engine.convert(
          sources.open_weights(FLAGS.vae), vae_wan_map.original_rules(vae_cfg), abstract, where=FLAGS.vae))
  if cfg.space == "latent" and vae_params is None:
    raise app.UsageError(f"TUNA {FLAGS.tuna} generates VAE latents: pass --vae (or weights that include vae.*)")
  tuna_convert.save(FLAGS.dst, cfg, params, vae_cfg=vae_cfg, vae_params=vae_params,
                    tokenizer=FLAGS.tokenizer or FLAGS.llm, overwrite=FLAGS.overwrite)
  return {"family": "tuna", "variant": FLAGS.tuna, "vocab": cfg.llm.vocab, "vae": vae_params is not None}


def main(argv):
  del argv
  try:
    if FLAGS.tuna:
      report = convert_tuna()
    elif not FLAGS.src:
      raise app.UsageError("--src is required")
    elif FLAGS.wan_vae:
      from unimm_jax.convert import original
      from unimm_jax.models import vae_wan
      try:
        cfg = vae_wan.preset(FLAGS.wan_vae)
      except ValueError as e:
        raise app.UsageError(f"--wan_vae: {e}") from None
      report = original.convert_wan_vae_to_orbax(FLAGS.src, FLAGS.dst, cfg, overwrite=FLAGS.overwrite)
    elif FLAGS.export:
      report = hf.export_to_hf(FLAGS.src, FLAGS.dst, overwrite=FLAGS.overwrite)
    else:
      report = hf.convert_to_orbax(FLAGS.src, FLAGS.dst, param_dtype=FLAGS.param_dtype, overwrite=FLAGS.overwrite)
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
