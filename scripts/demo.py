"""The embedded default, end to end: train a tiny TUNA on the shapes world, then sample, answer, edit
and score it with ShapesEval. Everything runs offline on CPU.

  python scripts/demo.py --workdir runs/demo            # `make demo`
  python scripts/demo.py --workdir runs/demo --config configs/tuna_tiny.py:tiny --config.steps=300

Writes to --workdir: checkpoints/events of the run, export/ (a converted TUNA checkpoint for
scripts/sample.py, edit.py, chat.py --image), samples.png (prompts under the images), edits.png,
answers.txt, report.json and report.md. A finished run is resumed, not retrained.

SIGTERM / Ctrl-C during training save the last completed step and exit with status 128 + signal, exporting
and evaluating nothing; the same command resumes training where it stopped. During export and evaluation
they exit at once (the same statuses), leaving the previous outputs whole.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import tempfile
import textwrap
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from unimm_jax import cli  # noqa: E402

config_flags.DEFINE_config_file("config", "configs/tuna_tiny.py:tiny", "demo config", lock_config=True)
flags.DEFINE_string("workdir", "runs/demo", "run directory")
FLAGS = flags.FLAGS

PROMPTS = ["a red circle at the top left", "a blue square at the bottom right", "a green triangle at the top right",
           "a yellow circle to the left of a purple square", "an orange triangle above a blue circle",
           "a red circle and a blue square", "two green squares", "three yellow triangles"]  # captions of the world


def labelled_grid(images: list[np.ndarray], labels: list[str], scale: int = 4, width: int = 160) -> Image.Image:
  """Images side by side, upscaled, each with its wrapped label underneath."""
  tiles = []
  for img, label in zip(images, labels):
    big = Image.fromarray(img).resize((img.shape[1] * scale, img.shape[0] * scale), Image.NEAREST)
    tile = Image.new("RGB", (max(width, big.width), big.height + 36), "white")
    tile.paste(big, ((tile.width - big.width) // 2, 0))
    text = "\n".join(textwrap.wrap(label, 26)[:3])
    ImageDraw.Draw(tile).multiline_text((4, big.height + 2), text, fill="black")
    tiles.append(tile)
  grid = Image.new("RGB", (sum(t.width for t in tiles), max(t.height for t in tiles)), "white")
  x = 0
  for t in tiles:
    grid.paste(t, (x, 0))
    x += t.width
  return grid


def _write(path: str, text: str) -> None:
  """Whole or not at all: an interrupted demo never leaves a truncated report behind."""
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def main(argv):
  del argv
  import jax

  from scripts import eval_shapes
  from unimm_jax.convert import tuna as tuna_convert
  from unimm_jax.data import shapes_eval
  from unimm_jax.data.tokenizer import shapes_tokenizer
  from unimm_jax.models import tuna
  import unimm_jax
  from unimm_jax.training import trainer

  config, workdir = FLAGS.config, FLAGS.workdir
  t0 = time.perf_counter()
  try:
    state = trainer.train(config, workdir)
  except trainer.Interrupted as e:
    cli.fail("demo", f"{e}. Nothing was exported or evaluated; `{AGAIN}` resumes it", 128 + e.signum)
  except (trainer.ConfigError, trainer.NonFiniteLoss) as e:
    cli.fail("demo", f"error: {e}", 2 if isinstance(e, trainer.ConfigError) else 1)
  train_s = time.perf_counter() - t0
  params = jax.device_get(state.ema_params if state.ema_params is not None else state.params)

  export = os.path.join(workdir, "export")
  cfg = tuna.TunaConfig.from_dict(config.model.to_dict())
  with tempfile.TemporaryDirectory() as tok_dir:
    shapes_tokenizer().save_pretrained(tok_dir)
    tuna_convert.save(export, cfg, params, tokenizer=tok_dir, overwrite=True)
  model = unimm_jax.load_pipeline(export)
  sc = config.sample
  flow = model.sampler_config(steps=sc.steps, guidance=sc.guidance, shift=sc.shift)
  generate_fn, answer_fn, edit_fn = eval_shapes.pipeline_fns(model, flow, config.data.image_size)

  labelled_grid(generate_fn(PROMPTS), PROMPTS).save(os.path.join(workdir, "samples.png"))
  t1 = time.perf_counter()
  report = shapes_eval.evaluate(generate_fn, answer_fn, edit_fn, size=config.data.image_size,
                                per_category=sc.eval_per_category)
  ev = shapes_eval.ShapesEval(size=config.data.image_size, seed=report["config"]["seed"], per_category=4)
  qs = ev.questions[:8]
  answers = answer_fn(np.stack([q["image"] for q in qs]), [q["question"] for q in qs])
  _write(os.path.join(workdir, "answers.txt"),
         "".join(f"Q: {q['question']}\nA: {a}  (truth: {q['answer']})\n" for q, a in zip(qs, answers)))
  es = ev.edits[:6]
  edited = edit_fn(np.stack([e["source"] for e in es]), [e["instruction"] for e in es])
  labelled_grid([x for e, out in zip(es, edited) for x in (e["source"], out)],
                [x for e in es for x in ("source", e["instruction"])]).save(os.path.join(workdir, "edits.png"))
  report["run"] = {"train_seconds": round(train_s, 1), "eval_seconds": round(time.perf_counter() - t1, 1),
                   "steps": int(state.step), "skipped_steps": int(state.skipped), "device": str(jax.devices()[0]),
                   "cores": os.cpu_count()}
  _write(os.path.join(workdir, "report.json"), json.dumps(report, indent=1))
  md = shapes_eval.report_markdown(report) + f"\n\ntrain {train_s:.0f} s, {int(state.step)} steps on {os.cpu_count()} cores\n"
  _write(os.path.join(workdir, "report.md"), md)
  print(md)
  logging.info("wrote %s/{samples.png, edits.png, answers.txt, report.json, report.md, export/}", workdir)


AGAIN = shlex.join(["python", *sys.argv])

if __name__ == "__main__":
  try:  # outside training (which saves and raises Interrupted), a stop leaves the outputs whole: export/ is
    with cli.sigterm_as_interrupt():  # replaced atomically, the reports by _write
      app.run(main, flags_parser=cli.flags_parser("demo"))
  except KeyboardInterrupt as e:
    cli.stopped("demo", e, f"stopped; `{AGAIN}` resumes from the last checkpoint (or evaluates a finished run)")
