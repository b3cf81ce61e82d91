"""ShapesEval: a deterministic GenEval-like evaluator for the shapes world.

Detection: every pixel is explained as alpha * palette colour over the black background (the colour with
the smallest residual wins); pixels with alpha >= 0.5 form each colour's 4-connected components, and those
larger than `MIN_AREA` of a cell are objects; an object's shape is read from its fill ratio (coverage mass /
bounding box: square ~1.0, circle ~0.8, triangle ~0.5) and vertical skewness (triangles point up), and
its cell from its centroid.

Categories (prompt kind -> what must be found), in the spirit of GenEval:
  single_object  "a red circle at the top left"      exactly one object, of that shape
  two_objects    "a red circle and a blue square"    both shapes present
  counting       "two red circles"                   exactly n objects of that shape
  colors         "a red circle at the top left"      an object of that shape has that colour
  position       "a red circle above a blue square"  both found, centroids in that relation
  color_attr     "a red circle and a blue square"    both (colour, shape) bindings present
and, outside the overall score, the diagnostic
  placement      the single_object prompts           that (colour, shape) found in the named cell
which isolates *where* from *what*: position needs both objects right before their places count.
Plus understanding (answer == ground truth, per question type) and editing (the detected objects of the
edited image equal the target scene's (colour, shape, cell) multiset, per op).
"""

from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from unimm_jax.data import shapes

CATEGORIES = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")
DIAGNOSTICS = {"placement": "single_object"}  # scored on that category's items, not part of "overall"
KIND = {"single_object": "single", "two_objects": "pair", "counting": "count", "colors": "single",
        "position": "relation", "color_attr": "pair"}
MIN_AREA = 0.07  # of a cell's area; the smallest drawn triangle covers ~0.12
# Sharp renders fill their box: squares 1.0, circles 0.75-0.89, triangles 0.50-0.60; triangles skew -0.57.
SQUARE_FILL, CIRCLE_FILL, TRIANGLE_SKEW = 0.92, 0.67, -0.2
# The coverage model below (pixel = alpha * colour) relies on the black background of shapes.render.
_PALETTE = np.asarray(list(shapes.COLORS.values()), np.float32)  # [C 3]


@dataclasses.dataclass(frozen=True)
class Detection:
  color: str
  shape: str
  cell: str
  cy: float  # centroid, pixels
  cx: float
  area: int


def as_uint8(image: np.ndarray) -> np.ndarray:
  """uint8 [h w 3] as is; float images are taken to be in [-1, 1] (the pipeline's range)."""
  image = np.asarray(image)
  if image.dtype == np.uint8:
    return image
  return np.clip(np.round((image.astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _colour_maps(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """float [S S 3] -> (colour index [S S], coverage alpha [S S]).

  On the black background a blurred or antialiased edge pixel is alpha * colour, so each pixel is
  projected onto the segment black -> colour for every palette colour; the colour with the smallest
  residual wins and alpha (how much of the pixel it covers) is its projection coefficient.
  """
  cols = _PALETTE
  alpha = np.clip(np.einsum("hwc,kc->hwk", img, cols) / (cols**2).sum(-1), 0.0, 1.0)  # [S S C]
  resid = ((img[:, :, None, :] - alpha[..., None] * cols) ** 2).sum(-1)
  best = np.argmin(resid, axis=-1)
  return best, np.take_along_axis(alpha, best[..., None], -1)[..., 0]


def detect(image: np.ndarray) -> list[Detection]:
  """[S S 3] image (uint8, or float in [-1, 1]) -> the shapes found, sorted by (cy, cx)."""
  img = as_uint8(image).astype(np.float32)
  if img.ndim != 3 or img.shape[-1] != 3:
    raise ValueError(f"expected an [h w 3] image, got shape {img.shape}")
  size = img.shape[0]
  cell = size / shapes.GRID
  colour, alpha = _colour_maps(img)
  found = []
  for c, name in enumerate(shapes.COLORS):
    mine = colour == c
    comps, _ = ndimage.label(mine & (alpha >= 0.5))
    for k, box in enumerate(ndimage.find_objects(comps), start=1):
      mask = comps[box] == k
      if mask.sum() < MIN_AREA * cell * cell:
        continue
      # Features from the coverage mass around the component (box grown by 2 px, other components
      # excluded). Blur moves mass across the edge but keeps it, so a blurred square still fills ~1.0 of
      # its thresholded box; and blur keeps the third central moment, so a triangle (apex up) stays
      # bottom-heavy (vertical skewness -0.57 when sharp) while squares and circles stay symmetric.
      grown = tuple(slice(max(b.start - 2, 0), b.stop + 2) for b in box)
      wts = alpha[grown] * (mine[grown] & np.isin(comps[grown], (0, k)))
      h, w = box[0].stop - box[0].start, box[1].stop - box[1].start
      fill = float(wts.sum()) / (h * w)
      yy = np.arange(wts.shape[0], dtype=np.float32)[:, None]
      mean = (wts * yy).sum() / wts.sum()
      var, m3 = (wts * (yy - mean) ** 2).sum() / wts.sum(), (wts * (yy - mean) ** 3).sum() / wts.sum()
      skew = float(m3 / max(var, 1e-6) ** 1.5)
      if skew < TRIANGLE_SKEW or fill < CIRCLE_FILL:
        shape = "triangle"
      else:
        shape = "square" if fill >= SQUARE_FILL else "circle"
      ys, xs = np.nonzero(mask)
      cy, cx = float(ys.mean() + box[0].start + 0.5), float(xs.mean() + box[1].start + 0.5)
      r, col = min(shapes.GRID - 1, int(cy / cell)), min(shapes.GRID - 1, int(cx / cell))
      found.append(Detection(name, shape, shapes.CELLS[r * shapes.GRID + col], cy, cx, int(mask.sum())))
  return sorted(found, key=lambda d: (d.cy, d.cx))


def _find(dets: Sequence[Detection], obj: shapes.Obj) -> Detection | None:
  return next((d for d in dets if (d.color, d.shape) == (obj.color, obj.shape)), None)


def check(category: str, scene: shapes.Scene, dets: Sequence[Detection], size: int) -> bool:
  """Whether detections satisfy the prompt of `category` generated from `scene`."""
  got_shapes = collections.Counter(d.shape for d in dets)
  if category == "single_object":
    return [d.shape for d in dets] == [scene[0].shape]
  if category == "two_objects":
    want = collections.Counter(o.shape for o in scene)
    return all(got_shapes[s] >= n for s, n in want.items())
  if category == "counting":
    return got_shapes[scene[0].shape] == len(scene)
  if category == "colors":
    return any((d.color, d.shape) == (scene[0].color, scene[0].shape) for d in dets)
  if category == "position":
    a, b = _find(dets, scene[0]), _find(dets, scene[1])
    if a is None or b is None:
      return False
    margin = 0.1 * size  # the centroids must be clearly apart along the named axis
    return {"to the left of": b.cx - a.cx > margin, "to the right of": a.cx - b.cx > margin,
            "above": b.cy - a.cy > margin, "below": a.cy - b.cy > margin}[shapes.relation(scene[0], scene[1])]
  if category == "color_attr":
    return all(_find(dets, o) is not None for o in scene)
  if category == "placement":
    return any((d.color, d.shape, d.cell) == (scene[0].color, scene[0].shape, scene[0].cell) for d in dets)
  raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES + tuple(DIAGNOSTICS)}")


def normalize_answer(text: str) -> str:
  """Lower-case, single spaces, no trailing punctuation or special tokens."""
  words = [w for w in text.lower().replace("?", " ").replace(".", " ").split() if not w.startswith("<|")]
  return " ".join(words)


def _mean(xs: Sequence[bool]) -> float:
  return float(np.mean(xs)) if len(xs) else float("nan")


class ShapesEval:
  """The evaluation set (prompts, questions, edits) for one size and seed, and its scoring.

  `generation`: dicts (id, category, prompt, scene); `questions`: (id, qa_type, question, answer, image);
  `edits`: (id, op, instruction, source image, target scene). The seed differs from training's default.
  """

  def __init__(self, size: int = 32, seed: int = 1_000_003, per_category: int = 50):
    self.size, self.seed, self.per_category = size, seed, per_category
    self.generation = []
    for ci, cat in enumerate(CATEGORIES):
      for j in range(per_category):
        rng = np.random.default_rng((seed, ci, j))
        scene = shapes.sample_scene(rng, KIND[cat])
        self.generation.append({"id": f"gen-{cat}-{j}", "category": cat,
                                "prompt": shapes.caption(scene, KIND[cat]), "scene": scene})
    self.questions = []
    per_type: collections.Counter[str] = collections.Counter()
    i = 0
    while min(per_type[t] for t in shapes.QA_TYPES) < per_category:
      r = shapes.shapes_record("mmu", i, size=size, seed=seed)
      qtype = json.loads(r["meta"])["qa_type"]
      if per_type[qtype] < per_category:
        per_type[qtype] += 1
        self.questions.append({"id": f"qa-{qtype}-{per_type[qtype] - 1}", "qa_type": qtype,
                               "question": r["text"], "answer": r["answer"], "image": r["images"][0]})
      i += 1
    self.edits = []
    for i in range(per_category * len(shapes.EDIT_OPS)):
      r = shapes.shapes_record("edit", i, size=size, seed=seed)
      meta = json.loads(r["meta"])
      self.edits.append({"id": f"edit-{i}", "op": meta["op"], "instruction": r["text"],
                         "source": r["images"][0], "target": shapes.scene_from_json(meta["target"])})

  def score_generation(self, images: Sequence[np.ndarray | None]) -> dict[str, float]:
    """One image per `generation` item (None = missing, scored wrong) -> accuracy per category, overall
    (the mean of CATEGORIES) and the DIAGNOSTICS."""
    _check_len("generation", images, self.generation)
    ok = collections.defaultdict(list)
    for item, im in zip(self.generation, images):
      dets = detect(im) if im is not None else None
      for name in [item["category"], *(d for d, c in DIAGNOSTICS.items() if c == item["category"])]:
        ok[name].append(dets is not None and check(name, item["scene"], dets, self.size))
    out = {c: _mean(ok[c]) for c in CATEGORIES}
    out["overall"] = float(np.mean([out[c] for c in CATEGORIES]))
    return {**out, **{d: _mean(ok[d]) for d in DIAGNOSTICS}}

  def score_answers(self, answers: Sequence[str | None]) -> dict[str, float]:
    """One answer per `questions` item -> accuracy per question type + overall."""
    _check_len("questions", answers, self.questions)
    ok = collections.defaultdict(list)
    for item, a in zip(self.questions, answers):
      ok[item["qa_type"]].append(a is not None and normalize_answer(a) == item["answer"])
    out = {t: _mean(ok[t]) for t in shapes.QA_TYPES}
    out["overall"] = _mean([v for t in shapes.QA_TYPES for v in ok[t]])
    return out

  def chance(self) -> dict[str, dict[str, float]]:
    """What guessing scores: generation = images of random scenes (of a random kind) scored against
    the prompts; understanding = a uniform guess among each question type's answers; editing = the
    source returned unchanged (0: every edit changes the scene)."""
    rng = np.random.default_rng((self.seed, 7))
    guesses = [shapes.render(shapes.sample_scene(rng, shapes.KINDS[int(rng.integers(len(shapes.KINDS)))]), self.size)
               for _ in self.generation]
    n_answers = {"color": len(shapes.COLORS), "shape": len(shapes.SHAPES), "count": len(shapes.NUMBERS),
                 "position": len(shapes.CELLS)}
    und = {t: 1 / n_answers[t] for t in shapes.QA_TYPES}
    und["overall"] = float(np.mean([1 / n_answers[q["qa_type"]] for q in self.questions]))
    return {"generation": self.score_generation(guesses), "understanding": und,
            "editing": self.score_edits([e["source"] for e in self.edits])}

  def score_edits(self, images: Sequence[np.ndarray | None]) -> dict[str, float]:
    """One edited image per `edits` item -> success rate per op + overall."""
    _check_len("edits", images, self.edits)
    ok = collections.defaultdict(list)
    for item, im in zip(self.edits, images):
      want = collections.Counter((o.color, o.shape, o.cell) for o in item["target"])
      got = collections.Counter((d.color, d.shape, d.cell) for d in detect(im)) if im is not None else None
      ok[item["op"]].append(got == want)
    out = {op: _mean(ok[op]) for op in shapes.EDIT_OPS}
    out["overall"] = _mean([v for op in shapes.EDIT_OPS for v in ok[op]])
    return out


def _check_len(what: str, got: Sequence[Any], items: Sequence[Any]) -> None:
  if len(got) != len(items):
    raise ValueError(f"{what}: got {len(got)} outputs for {len(items)} items")


def _batched(fn: Callable[..., Sequence[Any]], batch_size: int, *columns: Sequence[Any]) -> list[Any]:
  out: list[Any] = []
  for i in range(0, len(columns[0]), batch_size):
    res = fn(*[c[i : i + batch_size] for c in columns])
    n = len(columns[0][i : i + batch_size])
    if len(res) != n:
      raise ValueError(f"{getattr(fn, '__name__', fn)} returned {len(res)} outputs for a batch of {n}")
    out.extend(res)
  return out


def evaluate(
    generate_fn: Callable[[list[str]], Sequence[np.ndarray]] | None,
    answer_fn: Callable[[np.ndarray, list[str]], Sequence[str]] | None,
    edit_fn: Callable[[np.ndarray, list[str]], Sequence[np.ndarray]] | None,
    *,
    size: int = 32,
    seed: int = 1_000_003,
    per_category: int = 50,
    batch_size: int = 32,
) -> dict[str, Any]:
  """Runs the model callables on the evaluation set and scores them; a None callable skips its part.

  generate_fn(prompts) -> images [n S S 3] (uint8, or float in [-1, 1]);
  answer_fn(images uint8 [n S S 3], questions) -> answers; edit_fn(images, instructions) -> images.
  Returns {"generation": {category: acc, "overall", diagnostic: acc}, "understanding": {...}, "editing": {...},
  "chance": the same three for guessing (`ShapesEval.chance`), "config": ...}.
  """
  ev = ShapesEval(size=size, seed=seed, per_category=per_category)
  report: dict[str, Any] = {"config": {"size": size, "seed": seed, "per_category": per_category},
                            "chance": ev.chance()}
  if generate_fn is not None:
    images = _batched(generate_fn, batch_size, [g["prompt"] for g in ev.generation])
    report["generation"] = ev.score_generation(images)
  if answer_fn is not None:
    qs = ev.questions
    report["understanding"] = ev.score_answers(_batched(
        lambda ims, txt: answer_fn(np.stack(ims), list(txt)), batch_size, [q["image"] for q in qs],
        [q["question"] for q in qs]))
  if edit_fn is not None:
    es = ev.edits
    report["editing"] = ev.score_edits(_batched(
        lambda ims, txt: edit_fn(np.stack(ims), list(txt)), batch_size, [e["source"] for e in es],
        [e["instruction"] for e in es]))
  return report


def report_markdown(report: dict[str, Any]) -> str:
  """A Markdown table per evaluated part."""
  lines = [f"ShapesEval (size {report['config']['size']}, seed {report['config']['seed']}, "
           f"{report['config']['per_category']} per category)", ""]
  for part in ("generation", "understanding", "editing"):
    if part not in report:
      continue
    scores = report[part]
    lines += [f"| {part} | " + " | ".join(scores) + " |", "|---" * (len(scores) + 1) + "|",
              "| accuracy | " + " | ".join(f"{v:.3f}" for v in scores.values()) + " |"]
    if "chance" in report:
      lines.append("| chance | " + " | ".join(f"{report['chance'][part][k]:.3f}" for k in scores) + " |")
    lines.append("")
  return "\n".join(lines)
