"""The conversion engine: one table of (regex, target, transform) rules read in both directions.

Import: every source key must match exactly one rule (re.fullmatch) or an IGNORE pattern -- or,
for a fused tensor, a set of `part` rules that together read every slice of it; every tensor is
checked against its abstract target; every target leaf must be filled; all problems are raised
together in one ConversionError. Export runs the same table backwards (slices are concatenated).

`check` / `check_bundle` / `export_shapes` run the same code on names and shapes only (a committed key
list of a real release, tests/fixtures/keys/): each tensor is a zero-stride view, which every transform
reshapes, transposes and splits without copying, so nothing is read or allocated.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from unimm_jax.convert.errors import ConversionError
from unimm_jax.convert.transforms import Transform

Rule = tuple[str, str, Transform]


def flatten(tree: Mapping, prefix: str = "") -> dict:
  """Nested dict -> {"a/b/c": leaf}."""
  out = {}
  for k, v in tree.items():
    path = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(flatten(v, path + "/"))
    else:
      out[path] = v
  return out


def unflatten(flat: Mapping[str, object]) -> dict:
  """{"a/b/c": leaf} -> nested dict."""
  tree: dict = {}
  for path, v in flat.items():
    node = tree
    *parents, last = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = v
  return tree


def _groups(pattern: str) -> tuple[list[str], list[str]]:
  """Splits a source regex into literal pieces and top-level capture groups.

  Rules must be literals (with escapes) and capture groups only, so they can be run backwards.
  Returns (literals, groups) with len(literals) == len(groups) + 1.
  """
  literals, groups, cur, i = [], [], "", 0
  while i < len(pattern):
    c = pattern[i]
    if c == "\\":
      cur += pattern[i + 1]
      i += 2
    elif c == "(":
      depth, j, in_class = 1, i + 1, False
      while depth:
        if j >= len(pattern):
          raise ValueError(f"rule {pattern!r}: unbalanced parenthesis")
        ch = pattern[j]
        if ch == "\\":
          j += 1
        elif ch == "[":
          in_class = True
        elif ch == "]":
          in_class = False
        elif not in_class:
          depth += {"(": 1, ")": -1}.get(ch, 0)
        j += 1
      body = pattern[i + 1 : j - 1]
      if body.startswith("?"):
        raise ValueError(f"rule {pattern!r}: only plain capture groups are invertible")
      literals.append(cur)
      groups.append(body)
      cur, i = "", j
    elif c in ".*+?|[]{}^$":
      raise ValueError(f"rule {pattern!r}: unescaped {c!r} outside a group cannot be exported")
    else:
      cur += c
      i += 1
  literals.append(cur)
  return literals, groups


@dataclasses.dataclass(frozen=True)
class CompiledRule:
  source: re.Pattern
  target: str
  transform: Transform
  target_re: re.Pattern          # matches our path, capturing the same groups
  source_literals: tuple[str, ...]

  def source_key(self, m: re.Match) -> str:
    parts = [self.source_literals[0]]
    for i, lit in enumerate(self.source_literals[1:], start=1):
      parts += [m.group(f"g{i}"), lit]
    return "".join(parts)


def compile_rules(rules: Sequence[Rule]) -> list[CompiledRule]:
  compiled = []
  for pattern, target, transform in rules:
    literals, groups = _groups(pattern)
    target_re, pos = "", 0
    seen: set[int] = set()
    for m in re.finditer(r"\\(\d+)", target):
      n = int(m.group(1))
      if not 1 <= n <= len(groups):
        raise ValueError(f"rule {pattern!r} -> {target!r}: no group {n}")
      target_re += re.escape(target[pos : m.start()])
      target_re += f"(?P=g{n})" if n in seen else f"(?P<g{n}>{groups[n - 1]})"
      seen.add(n)
      pos = m.end()
    target_re += re.escape(target[pos:])
    compiled.append(CompiledRule(re.compile(pattern), target, transform, re.compile(target_re), tuple(literals)))
  return compiled


def _check_parts(key: str, hits: Sequence[CompiledRule]) -> str | None:
  """None if `hits` may convert `key`: one whole-tensor rule, or `part` rules covering every slice."""
  parts = [r.transform.part for r in hits]
  if all(p is None for p in parts):
    return None if len(hits) == 1 else f"key {key!r} matches {len(hits)} rules: {[r.source.pattern for r in hits]}"
  if any(p is None for p in parts) or len({(p[0], p[2]) for p in parts}) != 1:
    return f"key {key!r}: rules {[r.source.pattern for r in hits]} mix whole-tensor and sliced reads"
  axis, _, count = parts[0]
  if sorted(p[1] for p in parts) != list(range(count)):
    return (f"key {key!r}: rules read slices {sorted(p[1] for p in parts)} of {count} along axis {axis}; "
            "every slice must be read exactly once")
  return None


def zeros_view(shape: Sequence[int], dtype=np.float32) -> np.ndarray:
  """A read-only zero-stride array of `shape`: 4 bytes whatever its size; transforms keep it a view."""
  return np.broadcast_to(np.zeros((), dtype), tuple(shape))


def shape_source(shapes: Mapping[str, Sequence[int]]) -> dict[str, Callable[[], np.ndarray]]:
  """{name: shape} -> a source whose loaders give zero-stride views (no tensor behind them)."""
  return {k: (lambda s=tuple(s): zeros_view(s)) for k, s in shapes.items()}


def _materialise(place: Callable[[np.ndarray], object] | None) -> Callable:
  def store(got: np.ndarray, want: jax.ShapeDtypeStruct) -> object:
    got = np.ascontiguousarray(got, dtype=want.dtype)
    return place(got) if place is not None else got
  return store


def _abstract(got: np.ndarray, want: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(got.shape), want.dtype)


def convert(
    source: Mapping[str, Callable[[], np.ndarray]],
    rules: Sequence[Rule],
    abstract: Mapping[str, jax.ShapeDtypeStruct],
    *,
    ignore: Iterable[str] = (),
    where: str = "checkpoint",
    place: Callable[[np.ndarray], object] | None = None,
) -> dict[str, np.ndarray]:
  """Streams `source` (name -> loader) through `rules` into {our path: array of the abstract dtype}.

  `abstract` is the flat {path: ShapeDtypeStruct} of the target model. `place` (e.g. jax.device_put)
  moves each converted tensor as soon as it is ready, so no second host copy of the model builds up.
  """
  return _convert(source, rules, abstract, ignore, where, _materialise(place))


def check(
    shapes: Mapping[str, Sequence[int]],
    rules: Sequence[Rule],
    abstract: Mapping[str, jax.ShapeDtypeStruct],
    *,
    ignore: Iterable[str] = (),
    where: str = "key list",
) -> dict[str, jax.ShapeDtypeStruct]:
  """`convert` of a checkpoint known only by {name: shape}: the same matching, transforms and problems
  (raised together in one ConversionError), no tensor read or allocated. -> {our path: ShapeDtypeStruct}."""
  return _convert(shape_source(shapes), rules, abstract, ignore, where, _abstract)


def _convert(source: Mapping[str, Callable[[], np.ndarray]], rules: Sequence[Rule],
             abstract: Mapping[str, jax.ShapeDtypeStruct], ignore: Iterable[str], where: str,
             store: Callable[[np.ndarray, jax.ShapeDtypeStruct], object]) -> dict:
  """The one import loop; `store(tensor, abstract leaf)` makes what is kept of a converted tensor."""
  compiled = compile_rules(rules)
  ignore_re = [re.compile(p) for p in ignore]
  out: dict[str, np.ndarray] = {}
  problems: list[str] = []
  origin: dict[str, str] = {}
  for key in source:
    if any(p.fullmatch(key) for p in ignore_re):  # an explicit skip wins over a rule (tied lm_head)
      continue
    hits = [r for r in compiled if r.source.fullmatch(key)]
    if not hits:
      problems.append(f"unexpected key {key!r} (matches no rule and no IGNORE entry)")
      continue
    problem = _check_parts(key, hits)
    if problem:
      problems.append(problem)
      continue
    tensor = source[key]()
    for rule in hits:
      dst = rule.source.fullmatch(key).expand(rule.target)
      if dst not in abstract:
        problems.append(f"{key!r} -> {dst!r}: the model has no such parameter")
        continue
      if dst in out:
        problems.append(f"{key!r} -> {dst!r}: already filled from {origin[dst]!r}")
        continue
      want = abstract[dst]
      try:
        got = rule.transform.forward(tensor, tuple(want.shape))
      except (ValueError, TypeError) as e:  # a reshape that cannot fit names the tensor
        problems.append(f"{key!r} -> {dst!r}: {rule.transform.name} failed: {e}")
        continue
      if tuple(got.shape) != tuple(want.shape):
        problems.append(
            f"{key!r} -> {dst!r}: {rule.transform.name} gave {tuple(got.shape)}, model expects {tuple(want.shape)}")
        continue
      out[dst] = store(got, want)
      origin[dst] = key
  missing = sorted(set(abstract) - set(out))
  if missing:
    problems.append(f"{len(missing)} model parameters not filled: {missing[:20]}{' ...' if len(missing) > 20 else ''}")
  if problems:
    raise ConversionError(f"{where}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
  return out


def export(params: Mapping[str, np.ndarray], rules: Sequence[Rule], *, where: str = "params") -> dict[str, np.ndarray]:
  """{our path: array} -> {source key: array in the source layout}, the table run backwards."""
  return _export(params, rules, where, np.ascontiguousarray,
                 lambda parts, axis: np.concatenate(parts, axis=axis))


def export_shapes(abstract: Mapping[str, Any], rules: Sequence[Rule], *, where: str = "params"
                  ) -> dict[str, tuple[int, ...]]:
  """`export` of abstract leaves (anything with a .shape): {source key: shape}, nothing allocated."""
  def join(parts: Sequence[np.ndarray], axis: int) -> np.ndarray:
    shape = list(parts[0].shape)
    shape[axis] = sum(p.shape[axis] for p in parts)
    return zeros_view(shape)

  views = {path: zeros_view(leaf.shape) for path, leaf in abstract.items()}
  return {k: tuple(v.shape) for k, v in _export(views, rules, where, lambda t: t, join).items()}


def _export(params: Mapping[str, np.ndarray], rules: Sequence[Rule], where: str,
            finish: Callable[[np.ndarray], np.ndarray], join: Callable[[Sequence[np.ndarray], int], np.ndarray]
            ) -> dict[str, np.ndarray]:
  """The one export loop; `finish` makes the kept tensor, `join` rebuilds a fused one from its slices."""
  compiled = compile_rules(rules)
  out: dict[str, np.ndarray] = {}
  slices: dict[str, dict[int, np.ndarray]] = {}   # fused source key -> {slice index: tensor}
  layout: dict[str, tuple[int, int]] = {}         # fused source key -> (axis, count)
  problems = []
  for path, value in params.items():
    hits = [(r, m) for r in compiled if (m := r.target_re.fullmatch(path))]
    if len(hits) != 1:
      problems.append(f"{path!r} matches {len(hits)} export rules")
      continue
    rule, m = hits[0]
    key, tensor = rule.source_key(m), finish(rule.transform.inverse(np.asarray(value)))
    if rule.transform.part is None:
      out[key] = tensor
      continue
    axis, index, count = rule.transform.part
    slices.setdefault(key, {})[index] = tensor
    layout[key] = (axis, count)
  for key, got in slices.items():
    axis, count = layout[key]
    if sorted(got) != list(range(count)):
      problems.append(f"{key!r}: slices {sorted(got)} of {count} present; cannot rebuild the fused tensor")
      continue
    out[key] = join([got[i] for i in range(count)], axis)
  if problems:
    raise ConversionError(f"{where}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
  return out


def prefixed(rules: Sequence[Rule], source_prefix: str, target_prefix: str) -> tuple[Rule, ...]:
  """A family's rules nested in a bigger checkpoint: `source_prefix` (a regex of literals) before each
  source key, `target_prefix` before each target path (e.g. TUNA's `tuna.` LLM under `llm/`)."""
  return tuple((source_prefix + src, target_prefix + dst, t) for src, dst, t in rules)


@dataclasses.dataclass(frozen=True)
class Part:
  """One sub-model of a bundled checkpoint: its key map (rules, ignore) and the flat abstract params it fills.
  A part that is not `required` may be absent from the checkpoint (no key under its prefix)."""

  rules: Sequence[Rule]
  abstract: Mapping[str, jax.ShapeDtypeStruct]
  ignore: Sequence[str] = ()
  required: bool = True


def convert_bundle(source: Mapping[str, Callable[[], np.ndarray]], parts: Mapping[str, Part], *,
                   where: str = "checkpoint", place: Callable[[np.ndarray], object] | None = None
                   ) -> dict[str, dict[str, np.ndarray] | None]:
  """A checkpoint whose key prefixes hold sub-models -> {prefix: flat params of that part, or None if absent}.

  `parts` is the declaration {prefix: Part} (TUNA: {"": the TUNA map, "vae.model.": the original Wan map}); each
  key goes to the part of the longest prefix it starts with ("" takes the rest) and is read without that prefix.
  Problems of every part are raised together.
  """
  return _bundle(source, parts, where, _materialise(place))


def check_bundle(shapes: Mapping[str, Sequence[int]], parts: Mapping[str, Part], *, where: str = "key list"
                 ) -> dict[str, dict[str, jax.ShapeDtypeStruct] | None]:
  """`convert_bundle` of a checkpoint known only by {name: shape} (see `check`)."""
  return _bundle(shape_source(shapes), parts, where, _abstract)


def _bundle(source: Mapping[str, Callable[[], np.ndarray]], parts: Mapping[str, Part], where: str,
            store: Callable) -> dict[str, dict | None]:
  prefixes = sorted(parts, key=len, reverse=True)
  routed: dict[str, dict[str, Callable[[], np.ndarray]]] = {p: {} for p in parts}
  unrouted = []
  for key in source:
    prefix = next((p for p in prefixes if key.startswith(p)), None)
    if prefix is None:
      unrouted.append(key)
    else:
      routed[prefix][key[len(prefix):]] = source[key]
  problems = [f"unexpected key {k!r} (under none of the prefixes {sorted(parts)})" for k in unrouted[:20]]
  out: dict[str, dict[str, np.ndarray] | None] = {}
  for prefix, part in parts.items():
    if not routed[prefix] and not part.required:
      out[prefix] = None
      continue
    try:
      out[prefix] = _convert(routed[prefix], part.rules, part.abstract, part.ignore,
                             f"{where} [{prefix or 'main'}]", store)
    except ConversionError as e:
      problems.append(str(e))
  if problems:
    raise ConversionError(f"{where}: " + "\n".join(problems))
  return out
