"""ShapesEval on a folder of model outputs (any model, any framework).

  python scripts/eval_shapes.py --write-set DIR [--size 32 --seed 1000003 --per-category 50]
      writes the evaluation set: DIR/generation.jsonl {id, category, prompt}, DIR/questions.jsonl
      {id, qa_type, question, image} + DIR/questions/<id>.png, DIR/edits.jsonl {id, op, instruction, image}
      + DIR/edits/<id>.png.
  python scripts/eval_shapes.py --ckpt DIR [--steps 20 --guidance 3 --shift 3] [same flags] [--out REPORT_DIR]
      runs a converted checkpoint of any family with a pipeline (TUNA, OpenUni, ...: unimm_jax.load_pipeline reads
      its family; scripts/convert.py, or a demo's export/) on the whole set and scores it
      (default report folder: DIR/shapes_eval).
  python scripts/eval_shapes.py --results DIR [same flags] [--out REPORT_DIR]
      scores what the model wrote: DIR/generation/<id>.png, DIR/answers.jsonl {id, answer},
      DIR/edited/<id>.png (parts without outputs are skipped; a missing file inside a part scores wrong)
      and writes REPORT_DIR/shapes_eval.json and .md (default: DIR).

Models plug in through `unimm_jax.data.shapes_eval.evaluate(generate_fn, answer_fn, edit_fn, ...)`, which
runs callables on the same set and returns the same report.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from unimm_jax.data import shapes_eval


def write_set(ev: shapes_eval.ShapesEval, folder: str) -> None:
  """Writes prompts, questions (with images) and edit sources for a model to answer."""
  for sub in ("questions", "edits"):
    os.makedirs(os.path.join(folder, sub), exist_ok=True)
  with open(os.path.join(folder, "generation.jsonl"), "w") as f:
    for g in ev.generation:
      f.write(json.dumps({"id": g["id"], "category": g["category"], "prompt": g["prompt"]}) + "\n")
  with open(os.path.join(folder, "questions.jsonl"), "w") as f:
    for q in ev.questions:
      path = os.path.join("questions", f"{q['id']}.png")
      Image.fromarray(q["image"]).save(os.path.join(folder, path))
      f.write(json.dumps({"id": q["id"], "qa_type": q["qa_type"], "question": q["question"], "image": path}) + "\n")
  with open(os.path.join(folder, "edits.jsonl"), "w") as f:
    for e in ev.edits:
      path = os.path.join("edits", f"{e['id']}.png")
      Image.fromarray(e["source"]).save(os.path.join(folder, path))
      f.write(json.dumps({"id": e["id"], "op": e["op"], "instruction": e["instruction"], "image": path}) + "\n")


def _image(path: str) -> np.ndarray | None:
  if not os.path.exists(path):
    return None
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"))


def score_folder(ev: shapes_eval.ShapesEval, folder: str) -> dict[str, Any]:
  """Scores the outputs found in `folder` (layout in the module docstring)."""
  report: dict[str, Any] = {"config": {"size": ev.size, "seed": ev.seed, "per_category": ev.per_category},
                            "chance": ev.chance()}
  if os.path.isdir(os.path.join(folder, "generation")):
    report["generation"] = ev.score_generation(
        [_image(os.path.join(folder, "generation", f"{g['id']}.png")) for g in ev.generation])
  answers_path = os.path.join(folder, "answers.jsonl")
  if os.path.exists(answers_path):
    with open(answers_path) as f:
      answers = {r["id"]: r["answer"] for r in map(json.loads, filter(str.strip, f))}
    report["understanding"] = ev.score_answers([answers.get(q["id"]) for q in ev.questions])
  if os.path.isdir(os.path.join(folder, "edited")):
    report["editing"] = ev.score_edits([_image(os.path.join(folder, "edited", f"{e['id']}.png")) for e in ev.edits])
  return report


def pipeline_fns(model, flow, size: int) -> tuple[Callable, Callable, Callable]:
  """generate_fn, answer_fn, edit_fn of `shapes_eval.evaluate` for a loaded pipeline (unimm_jax.load_pipeline)."""
  def generate_fn(prompts):
    return model.generate(prompts, (size, size), flow)

  def answer_fn(images, questions):
    return model.answer(images, questions, max_new_tokens=8)

  def edit_fn(images, instructions):
    return model.edit(images, instructions, flow)

  return generate_fn, answer_fn, edit_fn


def evaluate_checkpoint(path: str, args: argparse.Namespace) -> dict[str, Any]:
  import unimm_jax
  model = unimm_jax.load_pipeline(path)
  flow = model.sampler_config(steps=args.steps, guidance=args.guidance, shift=args.shift)
  return shapes_eval.evaluate(*pipeline_fns(model, flow, args.size), size=args.size, seed=args.seed,
                              per_category=args.per_category)


def write_report(report: dict[str, Any], out_dir: str) -> None:
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "shapes_eval.json"), "w") as f:
    json.dump(report, f, indent=2)
  with open(os.path.join(out_dir, "shapes_eval.md"), "w") as f:
    f.write(shapes_eval.report_markdown(report) + "\n")


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  mode = p.add_mutually_exclusive_group(required=True)
  mode.add_argument("--write-set", metavar="DIR", help="write the evaluation set for a model to answer")
  mode.add_argument("--results", metavar="DIR", help="score a folder of model outputs")
  mode.add_argument("--ckpt", metavar="DIR", help="run and score a converted checkpoint (its family's pipeline)")
  p.add_argument("--out", help="report folder (default: the results folder)")
  p.add_argument("--size", type=int, default=32)
  p.add_argument("--seed", type=int, default=1_000_003)
  p.add_argument("--per-category", type=int, default=50)
  p.add_argument("--steps", type=int, default=20, help="--ckpt: time grid points")
  p.add_argument("--guidance", type=float, default=3.0,
                 help="--ckpt: classifier-free guidance (1 = off; 3 is the demo's, so its export scores as report.md)")
  p.add_argument("--shift", type=float, default=3.0, help="--ckpt: time-grid warp")
  args = p.parse_args(argv)
  ev = shapes_eval.ShapesEval(size=args.size, seed=args.seed, per_category=args.per_category)
  if args.write_set:
    write_set(ev, args.write_set)
    print(f"wrote {len(ev.generation)} prompts, {len(ev.questions)} questions, {len(ev.edits)} edits "
          f"to {args.write_set}")
    return None
  if args.ckpt:
    try:
      report = evaluate_checkpoint(args.ckpt, args)
    except (ValueError, OSError) as e:
      p.exit(2, f"eval_shapes: error: {e}\n")
    write_report(report, args.out or os.path.join(args.ckpt, "shapes_eval"))
  else:
    report = score_folder(ev, args.results)
    write_report(report, args.out or args.results)
  print(shapes_eval.report_markdown(report))
  return report


if __name__ == "__main__":
  main()
