"""The shapes dataset (grain source, tfds builder) and ShapesEval (detection, scoring, eval script)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from unimm_jax.data import shapes, shapes_eval, sources


def test_records_are_a_pure_function_of_seed_stream_and_index():
  for stream in shapes.STREAMS:
    a, b = shapes.shapes_record(stream, 7, seed=3), shapes.shapes_record(stream, 7, seed=3)
    assert a["text"] == b["text"] and a["meta"] == b["meta"]
    assert all(np.array_equal(x, y) for x, y in zip(a["images"], b["images"]))
  texts = {shapes.shapes_record("t2i", 7, seed=s)["meta"] for s in range(5)}
  assert len(texts) == 5


def test_images_show_exactly_the_scene_in_palette_colours():
  for size in shapes.SIZES:
    for i in range(30):
      r = shapes.shapes_record("t2i", i, size=size)
      img = r["images"][0]
      assert img.shape == (size, size, 3) and img.dtype == np.uint8
      scene = shapes.scene_from_json(json.loads(r["meta"])["scene"])
      colours = {tuple(c) for c in img.reshape(-1, 3)} - {shapes.BACKGROUND}
      assert colours == {shapes.COLORS[o.color] for o in scene}
      per_colour = {o.color: sum(p.color == o.color for p in scene) for o in scene}
      for name, n in per_colour.items():  # same-coloured shapes never touch, so they count apart
        _, found = ndimage.label(np.all(img == shapes.COLORS[name], -1))
        assert found == n, (r["text"], name)


def test_every_shape_lies_inside_its_cell():
  # A cell is one image token of a model with patch size / GRID (configs/tuna_tiny.py): no shape may cross.
  for size in shapes.SIZES:
    cell = size // shapes.GRID
    for i in range(100):
      meta = json.loads(shapes.shapes_record("edit", i, size=size)["meta"])
      for obj in shapes.scene_from_json(meta["scene"]) + shapes.scene_from_json(meta["target"]):
        ys, xs = np.nonzero(shapes.render([obj], size).any(-1))
        r, c = divmod(shapes.CELLS.index(obj.cell), shapes.GRID)
        assert ys.min() >= r * cell and ys.max() < (r + 1) * cell, (size, obj)
        assert xs.min() >= c * cell and xs.max() < (c + 1) * cell, (size, obj)


def test_every_stream_has_its_fields_and_the_world_has_enough_variety():
  recs = {s: [shapes.shapes_record(s, i) for i in range(400)] for s in shapes.STREAMS}
  assert {len(r["images"]) for r in recs["t2i"]} == {1} and {len(r["images"]) for r in recs["edit"]} == {2}
  assert all(r["answer"] for r in recs["mmu"]) and not any(r["images"] for r in recs["text"])
  assert {json.loads(r["meta"])["qa_type"] for r in recs["mmu"]} == set(shapes.QA_TYPES)
  assert {json.loads(r["meta"])["op"] for r in recs["edit"]} == set(shapes.EDIT_OPS)
  assert {json.loads(r["meta"])["kind"] for r in recs["t2i"]} == set(shapes.KINDS)
  objs = [o for r in recs["t2i"] for o in shapes.scene_from_json(json.loads(r["meta"])["scene"])]
  assert {o.color for o in objs} == set(shapes.COLORS) and {o.shape for o in objs} == set(shapes.SHAPES)
  assert {o.cell for o in objs} == set(shapes.CELLS)


def test_tfds_builder_produces_the_same_records_as_the_grain_source(tmp_path):
  from unimm_jax.data import shapes_tfds

  names = shapes_tfds.prepare(str(tmp_path), size=32, num_records=12, seed=5)
  assert names["mmu"] == "unimm_shapes/mmu_32_12_s5"
  for stream in shapes.STREAMS:
    tf_src = sources.from_spec(f"tfds:{names[stream]}:train:{tmp_path}", stream)  # the config form
    grain_src = shapes.ShapesSource(stream, 12, size=32, seed=5)
    got = sorted((tf_src[i] for i in range(len(tf_src))), key=lambda r: int(r["id"].rsplit("-", 1)[1]))
    assert len(got) == len(grain_src) == 12
    assert stream != "mmu" or any(r["turns"] for r in got)  # conversations survive tfds
    for g, w in zip(got, (grain_src[i] for i in range(12))):
      keys = ("id", "stream", "text", "answer", "turns", "meta")
      assert {k: g[k] for k in keys} == {k: w[k] for k in keys}
      assert len(g["images"]) == len(w["images"])
      assert all(np.array_equal(x, y) for x, y in zip(g["images"], w["images"]))
  renamed = sources.TfdsSource(names["t2i"], "train", "t2i", data_dir=str(tmp_path), fields={"caption": "meta"})
  assert renamed[0]["text"] == renamed[0]["meta"]  # a mapped feature takes the canonical field's place


@pytest.mark.parametrize("size", shapes.SIZES)
def test_evaluator_scores_ground_truth_renders_at_least_0_99(size):
  ev = shapes_eval.ShapesEval(size=size, per_category=40 if size == 32 else 20)
  gen = ev.score_generation([shapes.render(g["scene"], size) for g in ev.generation])
  und = ev.score_answers([q["answer"] for q in ev.questions])
  edit = ev.score_edits([shapes.render(e["target"], size) for e in ev.edits])
  for part in (gen, und, edit):
    assert min(part.values()) >= 0.99, part
  assert set(gen) == set(shapes_eval.CATEGORIES) | {"overall"} | set(shapes_eval.DIAGNOSTICS)


def test_placement_needs_the_named_object_in_the_named_cell():
  """The diagnostic that separates where from what: the right object in another cell still scores on
  single_object, not on placement."""
  ev = shapes_eval.ShapesEval(size=32, per_category=20)
  def moved(scene):
    (o,) = scene
    return (o._replace(cell=shapes.CELLS[(shapes.CELLS.index(o.cell) + 1) % len(shapes.CELLS)]),)
  images = [shapes.render(moved(g["scene"]) if g["category"] == "single_object" else g["scene"], 32)
            for g in ev.generation]
  scores = ev.score_generation(images)
  assert scores["single_object"] == 1.0 and scores["placement"] == 0.0, scores
  assert scores["overall"] == 1.0  # placement stays outside the GenEval-style mean


def test_evaluator_gives_low_scores_to_wrong_images_and_answers():
  ev = shapes_eval.ShapesEval(size=32, per_category=20)
  n = len(ev.generation)
  wrong = ev.score_generation([shapes.render(ev.generation[(i + 7) % n]["scene"], 32) for i in range(n)])
  assert wrong["overall"] < 0.3, wrong
  blank = ev.score_generation([np.zeros((32, 32, 3), np.uint8)] * n)
  assert blank["overall"] == 0.0
  assert ev.score_answers(["red"] * len(ev.questions))["overall"] < 0.3
  unedited = ev.score_edits([e["source"] for e in ev.edits])
  assert unedited["overall"] == 0.0  # every edit changes the scene


def test_evaluator_tolerates_mild_blur_and_noise():
  """Generated images are soft and noisy; a Gaussian blur of 0.5 px plus noise of 10/255 must not matter."""
  ev = shapes_eval.ShapesEval(size=32, per_category=30)
  rng = np.random.default_rng(0)
  images = []
  for g in ev.generation:
    x = ndimage.gaussian_filter(shapes.render(g["scene"], 32).astype(np.float32), (0.5, 0.5, 0))
    images.append(np.clip(x + rng.normal(0, 10, x.shape), 0, 255).astype(np.uint8))
  scores = ev.score_generation(images)
  assert min(scores.values()) >= 0.95, scores
  as_float = ev.score_generation([im.astype(np.float32) / 127.5 - 1 for im in images])  # pipeline range
  assert as_float == scores


def test_evaluate_runs_model_callables_in_batches_and_reports_every_part():
  ev = shapes_eval.ShapesEval(size=32, per_category=6)
  by_prompt = {g["prompt"]: shapes.render(g["scene"], 32) for g in ev.generation}
  by_question = {(q["question"], q["image"].tobytes()): q["answer"] for q in ev.questions}
  by_edit = {(e["instruction"], e["source"].tobytes()): shapes.render(e["target"], 32) for e in ev.edits}
  calls = []

  def generate(prompts):
    calls.append(len(prompts))
    return np.stack([by_prompt[p] for p in prompts]).astype(np.float32) / 127.5 - 1

  def answer(images, questions):
    return [by_question[(q, im.tobytes())] + " ." for im, q in zip(images, questions)]

  def edit(images, instructions):
    return [by_edit[(t, im.tobytes())] for im, t in zip(images, instructions)]

  report = shapes_eval.evaluate(generate, answer, edit, size=32, per_category=6, batch_size=5)
  assert max(calls) == 5 and sum(calls) == len(ev.generation)
  for part in ("generation", "understanding", "editing"):
    assert min(report[part].values()) == 1.0, report[part]
  md = shapes_eval.report_markdown(report)
  assert all(c in md for c in shapes_eval.CATEGORIES) and "| chance |" in md
  for part in ("generation", "understanding", "editing"):  # guessing stays far below a working model
    assert max(report["chance"][part].values()) <= 0.4, report["chance"][part]
  assert "generation" not in shapes_eval.evaluate(None, answer, None, size=32, per_category=6)


def test_eval_script_scores_a_results_folder(tmp_path):
  import importlib.util

  spec = importlib.util.spec_from_file_location("eval_shapes", os.path.join(
      os.path.dirname(__file__), "..", "scripts", "eval_shapes.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  args = ["--size", "32", "--per-category", "4"]
  mod.main(["--write-set", str(tmp_path / "set")] + args)
  ev = shapes_eval.ShapesEval(size=32, per_category=4)
  with open(tmp_path / "set" / "generation.jsonl") as f:
    assert [json.loads(line)["prompt"] for line in f] == [g["prompt"] for g in ev.generation]
  out = tmp_path / "out"
  os.makedirs(out / "generation")
  os.makedirs(out / "edited")
  for g in ev.generation[1:]:  # the first one is missing: scored wrong, not an error
    Image.fromarray(shapes.render(g["scene"], 32)).save(out / "generation" / f"{g['id']}.png")
  for e in ev.edits:
    Image.fromarray(shapes.render(e["target"], 32)).save(out / "edited" / f"{e['id']}.png")
  with open(out / "answers.jsonl", "w") as f:
    for q in ev.questions:
      f.write(json.dumps({"id": q["id"], "answer": q["answer"]}) + "\n")
  report = mod.main(["--results", str(out)] + args)
  assert report["generation"]["single_object"] == 0.75 and report["generation"]["colors"] == 1.0
  assert report["understanding"]["overall"] == 1.0 and report["editing"]["overall"] == 1.0
  assert json.loads((out / "shapes_eval.json").read_text()) == report
  assert (out / "shapes_eval.md").exists()


def test_bench_data_runs_on_tiny_settings():
  import importlib.util

  spec = importlib.util.spec_from_file_location("bench_data", os.path.join(
      os.path.dirname(__file__), "..", "scripts", "bench_data.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  results = mod.main(["--tiny"])
  assert results["best_fit"]["efficiency"] > 2 * results["unpacked"]["efficiency"]
  assert all(r["samples/s"] > 0 for r in results.values())
