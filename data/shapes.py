"""The embedded default: a synthetic world of 1-3 coloured shapes on a 2x2 grid, generated from a seed.

Everything here is deterministic: record `i` of stream `s` is a pure function of `(seed, s, i)`, so the
grain source, the tfds builder (`shapes_tfds.py`) and the evaluator (`shapes_eval.py`) agree exactly.

A scene is a tuple of `Obj(color, shape, cell, size, dx, dy)`: `cell` names one of the 2x2 grid cells
(`CELLS`), `size` is the shape's side as a fraction of a cell, `dx`/`dy` jitter its centre by a fraction of
a cell; a shape never leaves its cell. Images are uint8 [S S 3] (S = 32 or 64), drawn with hard edges, so
every shape pixel is exactly a palette colour.

Why 2x2 cells: a cell is then one image token of a model with patch S/2 (`configs/tuna_tiny.py`), so each object
is whole in one token (the measurements against a 3x3 world are in docs/demo.md).

Clips (the video streams `VIDEO_STREAMS`): one object moves in a straight line from the centre of one cell to the
centre of another over `CLIP_FRAMES` frames (its centre interpolated linearly, so the middle frames show it
between cells); t2v captions name the object and both cells, vmmu asks where it starts or ends, or its colour or
shape. A record's clip is uint8 [T S S 3].

Records follow the canonical raw-record schema of `data/README.md`; `meta` (JSON) keeps the scene, the
scene kind and, per stream, the question types (mmu records are conversations of up to `QA_TURNS`
questions; `qa_type` is the last one's) or the edit op and target scene.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

SIZES = (32, 64)
STREAMS = ("t2i", "mmu", "edit", "text")
COLORS = {  # far apart in RGB and from the black background, so nearest-colour segmentation is unambiguous
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 235),
    "yellow": (240, 215, 40),
    "purple": (160, 60, 200),
    "orange": (250, 140, 30),
}
BACKGROUND = (0, 0, 0)
SHAPES = ("circle", "square", "triangle")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
GRID = 2  # cells a side
CELLS = ("top left", "top right", "bottom left", "bottom right")  # row-major
NUMBERS = ("zero", "one", "two", "three")
RELATIONS = ("to the left of", "to the right of", "above", "below")
# Scene kinds and how often each is drawn; `shapes_eval` maps them to GenEval-like categories.
KINDS = ("single", "relation", "pair", "count", "triple")
QA_TYPES = ("color", "shape", "count", "position")
QA_TURNS = 3  # questions of an mmu record (a conversation about one image)
EDIT_OPS = ("recolor", "move", "add", "remove")
VIDEO_STREAMS = ("t2v", "vmmu")
CLIP_FRAMES = 5  # 1 + 4k, what the Wan 2.2 VAE encodes whole
VIDEO_QA_TYPES = ("start", "end", "color", "shape")
# appended after the image streams, so their records (seeded by stream code) stay as they were
_STREAM_CODE = {s: n for n, s in enumerate(STREAMS + VIDEO_STREAMS)}


class Obj(NamedTuple):
  color: str
  shape: str
  cell: str
  size: float  # side as a fraction of a cell
  dx: float  # centre jitter, fraction of a cell
  dy: float


Scene = tuple[Obj, ...]


def _cell_rc(cell: str) -> tuple[int, int]:
  n = CELLS.index(cell)
  return n // GRID, n % GRID


def _draw(canvas: np.ndarray, obj: Obj) -> None:
  """Draws one shape in place with hard edges (pixel centres inside the shape get the colour)."""
  s = canvas.shape[0]
  cell = s / GRID
  r, c = _cell_rc(obj.cell)
  d = max(3, int(round(obj.size * cell)))
  x0 = int(round((c + 0.5 + obj.dx) * cell - d / 2))
  y0 = int(round((r + 0.5 + obj.dy) * cell - d / 2))
  y, x = np.mgrid[0:d, 0:d] + 0.5  # pixel centres relative to the box
  if obj.shape == "square":
    mask = np.ones((d, d), bool)
  elif obj.shape == "circle":
    mask = (x - d / 2) ** 2 + (y - d / 2) ** 2 <= (d / 2) ** 2
  elif obj.shape == "triangle":  # apex at the top centre, base along the bottom edge
    mask = np.abs(x - d / 2) <= y / 2
  else:
    raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")
  ys, xs = slice(max(y0, 0), min(y0 + d, s)), slice(max(x0, 0), min(x0 + d, s))
  mask = mask[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
  canvas[ys, xs][mask] = COLORS[obj.color]


def render(scene: Sequence[Obj], size: int) -> np.ndarray:
  """Scene -> uint8 [size size 3] image on the black background."""
  if size < 24:
    raise ValueError(f"image size {size} is too small to draw shapes on a {GRID}x{GRID} grid; use >= 24")
  canvas = np.empty((size, size, 3), np.uint8)
  canvas[:] = BACKGROUND
  for obj in scene:
    _draw(canvas, obj)
  return canvas


def _new_obj(rng: np.random.Generator, color: str, shape: str, cell: str) -> Obj:
  # A shape reaches at most 0.4 cell from its cell centre, so it stays inside its cell (one image token of
  # the default model) and neighbours keep a gap of >= 0.2 cell (3 px at 32x32) even after rounding to
  # pixels; touching same-coloured shapes would merge when counted.
  size = float(np.round(rng.uniform(0.5, 0.72), 3))
  room = (0.8 - size) / 2
  dx, dy = (float(v) for v in np.round(rng.uniform(-room, room, 2), 3))
  return Obj(color, shape, cell, size, dx, dy)


def _choice(rng: np.random.Generator, options: Sequence[Any]) -> Any:
  return options[int(rng.integers(len(options)))]


def _distinct_pairs(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
  """n (colour, shape) pairs, all different, so every object can be named unambiguously."""
  pairs = [(c, s) for c in COLORS for s in SHAPES]
  idx = rng.choice(len(pairs), n, replace=False)
  return [pairs[int(i)] for i in idx]


def _free_cells(scene: Sequence[Obj]) -> list[str]:
  used = {o.cell for o in scene}
  return [c for c in CELLS if c not in used]


def sample_scene(rng: np.random.Generator, kind: str) -> Scene:
  """Draws a scene of the given kind (see `KINDS`)."""
  if kind == "single":
    ((c, s),) = _distinct_pairs(rng, 1)
    return (_new_obj(rng, c, s, _choice(rng, CELLS)),)
  if kind == "relation":
    (c1, s1), (c2, s2) = _distinct_pairs(rng, 2)
    rel = _choice(rng, RELATIONS)
    line = int(rng.integers(GRID))
    a, b = sorted(int(v) for v in rng.choice(GRID, 2, replace=False))
    first, second = {  # (row, col) of the first and second named object
        "to the left of": ((line, a), (line, b)),
        "to the right of": ((line, b), (line, a)),
        "above": ((a, line), (b, line)),
        "below": ((b, line), (a, line)),
    }[rel]
    return (
        _new_obj(rng, c1, s1, CELLS[first[0] * GRID + first[1]]),
        _new_obj(rng, c2, s2, CELLS[second[0] * GRID + second[1]]),
    )
  if kind in ("pair", "triple"):
    n = 2 if kind == "pair" else 3
    cells = rng.choice(len(CELLS), n, replace=False)
    return tuple(_new_obj(rng, c, s, CELLS[int(k)]) for (c, s), k in zip(_distinct_pairs(rng, n), cells))
  if kind == "count":
    ((c, s),) = _distinct_pairs(rng, 1)
    n = int(rng.integers(1, 4))
    return tuple(_new_obj(rng, c, s, CELLS[int(k)]) for k in rng.choice(len(CELLS), n, replace=False))
  raise ValueError(f"unknown scene kind {kind!r}; expected one of {KINDS}")


def _a(obj: Obj) -> str:
  return f"{'an' if obj.color[0] in 'aeiou' else 'a'} {obj.color} {obj.shape}"


def relation(first: Obj, second: Obj) -> str | None:
  """The caption relation between two objects on one grid row or column, else None."""
  (r1, c1), (r2, c2) = _cell_rc(first.cell), _cell_rc(second.cell)
  if r1 == r2:
    return "to the left of" if c1 < c2 else "to the right of"
  if c1 == c2:
    return "above" if r1 < r2 else "below"
  return None


def caption(scene: Scene, kind: str) -> str:
  """The text-to-image prompt for a scene of the given kind."""
  if kind == "single":
    return f"{_a(scene[0])} at the {scene[0].cell}"
  if kind == "relation":
    return f"{_a(scene[0])} {relation(scene[0], scene[1])} {_a(scene[1])}"
  if kind == "pair":
    return f"{_a(scene[0])} and {_a(scene[1])}"
  if kind == "triple":
    return f"{_a(scene[0])} , {_a(scene[1])} and {_a(scene[2])}"
  if kind == "count":
    o, n = scene[0], len(scene)
    return f"{NUMBERS[n]} {o.color} {o.shape if n == 1 else PLURALS[o.shape]}"
  raise ValueError(f"unknown scene kind {kind!r}; expected one of {KINDS}")


def describe(scene: Scene) -> str:
  """Plain-text description naming every object and its cell (the text-only stream)."""
  parts = [f"{_a(o)} at the {o.cell}" for o in scene]
  return "there is " + " and ".join(parts) + " ."


def _question_types(scene: Scene) -> list[str]:
  """The question types that have one correct answer about this scene."""
  colors, shapes = [o.color for o in scene], [o.shape for o in scene]
  options = []
  if any(shapes.count(s) == 1 for s in SHAPES):
    options.append("color")
  if any(colors.count(c) == 1 for c in set(colors)):
    options.append("shape")
  options.append("count")
  if len(set(zip(colors, shapes))) == len(scene):
    options.append("position")
  return options


def _ask(rng: np.random.Generator, scene: Scene, qtype: str) -> tuple[str, str]:
  colors, shapes = [o.color for o in scene], [o.shape for o in scene]
  if qtype == "color":
    s = _choice(rng, [s for s in SHAPES if shapes.count(s) == 1])
    return f"what color is the {s} ?", scene[shapes.index(s)].color
  if qtype == "shape":
    c = _choice(rng, [c for c in COLORS if colors.count(c) == 1])
    return f"what shape is the {c} object ?", scene[colors.index(c)].shape
  if qtype == "count":
    if rng.integers(2):
      return "how many objects are there ?", NUMBERS[len(scene)]
    s = _choice(rng, SHAPES)
    return f"how many {PLURALS[s]} are there ?", NUMBERS[shapes.count(s)]
  o = _choice(rng, scene)
  return f"where is the {o.color} {o.shape} ?", o.cell


def sample_question(rng: np.random.Generator, scene: Scene) -> tuple[str, str, str]:
  """(question type, question, answer) about a scene; only questions with one correct answer."""
  qtype = _choice(rng, _question_types(scene))
  return (qtype, *_ask(rng, scene, qtype))


def sample_conversation(rng: np.random.Generator, scene: Scene, turns: int = QA_TURNS) -> list[tuple[str, str, str]]:
  """Up to `turns` (question type, question, answer) about one scene, each of a different type.

  Several answers per image give understanding more supervision per image token: on the demo's budget
  the image tokens, not the questions, are what a step's compute goes to. Measured on `make demo`
  (ShapesEval understanding): 3 turns vs 1 lifted shape 0.36 -> 0.42 and count 0.70 -> 0.82; 4 turns
  did no better than 3 (shape 0.26, within run-to-run noise of +-0.08 at 50 questions a type)."""
  options = _question_types(scene)
  order = rng.permutation(len(options))[:turns]
  return [(options[int(k)], *_ask(rng, scene, options[int(k)])) for k in order]


def sample_edit(rng: np.random.Generator) -> tuple[str, Scene, str, Scene]:
  """(op, source scene, instruction, target scene); objects are distinct so each is nameable."""
  n = int(rng.integers(1, 3))
  src = tuple(sample_scene(rng, "pair" if n == 2 else "single"))
  options = ["recolor", "move", "add"] + (["remove"] if n >= 2 else [])
  op = _choice(rng, options)
  k = int(rng.integers(n))
  o = src[k]
  taken = {(p.color, p.shape) for p in src}
  if op == "recolor":
    c = _choice(rng, [c for c in COLORS if (c, o.shape) not in taken])
    return op, src, f"make the {o.color} {o.shape} {c}", src[:k] + (o._replace(color=c),) + src[k + 1 :]
  if op == "move":
    cell = _choice(rng, _free_cells(src))
    return op, src, f"move the {o.color} {o.shape} to the {cell}", src[:k] + (o._replace(cell=cell),) + src[k + 1 :]
  if op == "add":
    c, s = _choice(rng, [(c, s) for c in COLORS for s in SHAPES if (c, s) not in taken])
    new = _new_obj(rng, c, s, _choice(rng, _free_cells(src)))
    return op, src, f"add {_a(new)} at the {new.cell}", src + (new,)
  return op, src, f"remove the {o.color} {o.shape}", src[:k] + src[k + 1 :]


def sample_motion(rng: np.random.Generator) -> tuple[Obj, str]:
  """(the object at its start cell, centred, and its end cell, another cell)."""
  ((c, s),) = _distinct_pairs(rng, 1)
  start, end = (CELLS[int(k)] for k in rng.choice(len(CELLS), 2, replace=False))
  return Obj(c, s, start, float(np.round(rng.uniform(0.5, 0.72), 3)), 0.0, 0.0), end


def render_clip(obj: Obj, end: str, size: int, frames: int = CLIP_FRAMES) -> np.ndarray:
  """The object moving from its cell to `end` -> uint8 [frames size size 3]; frame 0 shows it in its cell, the
  last in `end`. Offsets are relative to the start cell, so `_draw` places the in-between frames."""
  (r0, c0), (r1, c1) = _cell_rc(obj.cell), _cell_rc(end)
  steps = np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(1)
  return np.stack([render([obj._replace(dx=a * (c1 - c0), dy=a * (r1 - r0))], size) for a in steps])


def motion_caption(obj: Obj, end: str) -> str:
  return f"{_a(obj)} moves from the {obj.cell} to the {end}"


def ask_motion(rng: np.random.Generator, obj: Obj, end: str) -> tuple[str, str, str]:
  """(question type, question, answer) about a clip; `start` / `end` need the clip's first / last frames."""
  qtype = _choice(rng, VIDEO_QA_TYPES)
  name = f"{obj.color} {obj.shape}"
  return qtype, *{"start": (f"where does the {name} start ?", obj.cell),
                  "end": (f"where does the {name} end ?", end),
                  "color": (f"what color is the {obj.shape} ?", obj.color),
                  "shape": (f"what shape is the {obj.color} object ?", obj.shape)}[qtype]


def scene_to_json(scene: Scene) -> list[list[Any]]:
  return [list(o) for o in scene]


def scene_from_json(items: Sequence[Sequence[Any]]) -> Scene:
  return tuple(Obj(str(c), str(s), str(cell), float(z), float(dx), float(dy)) for c, s, cell, z, dx, dy in items)


def shapes_record(stream: str, index: int, *, size: int = 32, seed: int = 0) -> dict[str, Any]:
  """Record `index` of a stream, as a canonical raw record (see data/README.md)."""
  if stream not in _STREAM_CODE:
    raise ValueError(f"unknown stream {stream!r}; expected one of {STREAMS + VIDEO_STREAMS}")
  rng = np.random.default_rng((seed, _STREAM_CODE[stream], index))
  rid, turns = f"shapes{size}-{seed}-{stream}-{index}", []
  if stream in VIDEO_STREAMS:
    obj, end = sample_motion(rng)
    meta = {"kind": "motion", "scene": scene_to_json((obj,)), "end": end}
    text, answer = motion_caption(obj, end), ""
    if stream == "vmmu":
      qtype, text, answer = ask_motion(rng, obj, end)
      meta["qa_type"] = qtype
    return {"id": rid, "stream": stream, "images": [render_clip(obj, end, size)], "text": text, "answer": answer,
            "turns": turns, "meta": json.dumps(meta, sort_keys=True)}
  if stream == "edit":
    op, src, instruction, tgt = sample_edit(rng)
    meta = {"op": op, "scene": scene_to_json(src), "target": scene_to_json(tgt)}
    images, text, answer = [render(src, size), render(tgt, size)], instruction, ""
  else:
    kind = _choice(rng, KINDS)
    scene = sample_scene(rng, kind)
    meta = {"kind": kind, "scene": scene_to_json(scene)}
    if stream == "t2i":
      images, text, answer = [render(scene, size)], caption(scene, kind), ""
    elif stream == "mmu":
      qas = sample_conversation(rng, scene)
      turns = [x for _, q, a in qas[:-1] for x in (q, a)]
      qtype, text, answer = qas[-1]
      meta.update(qa_type=qtype, qa_types=[t for t, _, _ in qas])
      images = [render(scene, size)]
    else:  # text-only: a description plus a question and its answer, no image
      qtype, question, answer = sample_question(rng, scene)
      images, text, answer = [], f"{describe(scene)} {question} {answer}", ""
  return {"id": rid, "stream": stream, "images": images, "text": text, "answer": answer, "turns": turns,
          "meta": json.dumps(meta, sort_keys=True)}


class ShapesSource:
  """grain random-access source of one shapes stream: `len` records, record i = `shapes_record(stream, i)`."""

  def __init__(self, stream: str, num_records: int, *, size: int = 32, seed: int = 0):
    if stream not in _STREAM_CODE:
      raise ValueError(f"unknown stream {stream!r}; expected one of {STREAMS + VIDEO_STREAMS}")
    if size not in SIZES:
      raise ValueError(f"shapes images are {SIZES} pixels, got size={size}")
    self.stream, self.num_records, self.size, self.seed = stream, num_records, size, seed

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < self.num_records:
      raise IndexError(f"shapes {self.stream} record {index} out of range [0, {self.num_records})")
    return shapes_record(self.stream, int(index), size=self.size, seed=self.seed)

  def __repr__(self) -> str:
    return f"ShapesSource({self.stream!r}, {self.num_records}, size={self.size}, seed={self.seed})"


def vocabulary() -> list[str]:
  """Every word the shapes texts use, in a fixed order (the shapes tokenizer's vocabulary)."""
  words = ["a", "an", "at", "the", "and", ",", ".", "?", "there", "is", "to", "of", "above", "below",
           "what", "color", "shape", "object", "how", "many", "objects", "are", "where",
           "make", "move", "add", "remove", "yes", "no"]
  words += list(COLORS) + list(SHAPES) + list(PLURALS.values()) + list(NUMBERS)
  words += [w for c in CELLS for w in c.split()] + [w for r in RELATIONS for w in r.split()]
  return list(dict.fromkeys(words))


def video_vocabulary() -> list[str]:
  """The words the clip texts add to `vocabulary()` (kept apart, so the image vocabulary's ids never move)."""
  return [w for w in ("moves", "from", "does", "start", "end") if w not in vocabulary()]
