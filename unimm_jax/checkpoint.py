"""Orbax checkpoints of converted models: params + a JSON record of family, config and layout.

On disk a converted model is a directory:
  unimm_config.json   {"family", "config", "layout": "loop", "params": {path: [shape, dtype]}, ...}
  params/             Orbax checkpoint of the nested param dict (loop layout: layers_{i})
  tokenizer files     copied from the source, when it had them
Writes go to a temporary sibling directory (`staged`) that replaces the destination at the end in one
atomic exchange, so a failure or an interrupt never leaves a half-written or changed destination;
what an interrupted run leaves beside it (`DST.tmp-*`, `DST.old-*`) is cleaned up by the next one.
Restore compares paths and shapes first.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from unimm_jax.convert.engine import flatten, unflatten
from unimm_jax.convert.errors import ConversionError

META_FILE = "unimm_config.json"
PARAMS_DIR = "params"


def is_converted(path: str) -> bool:
  return os.path.isfile(os.path.join(path, META_FILE))


def read_meta(path: str) -> dict[str, Any]:
  meta_path = os.path.join(path, META_FILE)
  if not os.path.isfile(meta_path):
    raise ConversionError(f"{path}: not a converted checkpoint (no {META_FILE})")
  with open(meta_path) as f:
    return json.load(f)


def clean_partial(dst: str) -> None:
  """Finishes or undoes what an interrupted `staged` left beside `dst`: a destination moved aside but not
  yet replaced (`DST.old-*/x`, when DST is missing) is put back; the rest (`DST.tmp-*`, `DST.old-*`) is removed.
  Two conversions to one destination at once are not supported: each cleans the other's temporaries."""
  dst = os.path.abspath(dst)
  parent, base = os.path.split(dst)
  if not os.path.isdir(parent):
    return
  for name in sorted(os.listdir(parent)):
    if not name.startswith((base + ".tmp-", base + ".old-")):
      continue
    path = os.path.join(parent, name)
    if name.startswith(base + ".old-") and os.path.exists(os.path.join(path, "x")) and not os.path.exists(dst):
      os.replace(os.path.join(path, "x"), dst)
      logging.warning("%s: put back the destination an interrupted conversion had moved to %s", dst, path)
    shutil.rmtree(path, ignore_errors=True)
    logging.warning("%s: removed %s, left by an interrupted conversion", dst, name)


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: str, b: str) -> bool:
  """Swaps two directories in one atomic step (Linux renameat2); False where the system cannot."""
  rename = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
  if rename is None:
    return False
  at_cwd = -100  # AT_FDCWD: the paths are absolute anyway
  if rename(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
    return True
  code = ctypes.get_errno()
  if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # filesystem or kernel without the exchange
    return False
  raise OSError(code, os.strerror(code), b)


@contextlib.contextmanager
def staged(dst: str, *, overwrite: bool) -> Iterator[str]:
  """Yields an empty temporary sibling of `dst` to write into. When the block succeeds it replaces `dst`: an
  atomic exchange where the system has one (else `dst` is renamed aside, the new one in, the old removed);
  when it fails or is interrupted it is removed and `dst` stays byte for byte as it was. Leftovers of an
  earlier interrupted run are cleaned first (`clean_partial`)."""
  dst = os.path.abspath(dst)
  clean_partial(dst)
  if os.path.exists(dst) and not overwrite:
    raise ConversionError(f"{dst}: destination exists (pass overwrite=True / --overwrite to replace it)")
  parent = os.path.dirname(dst)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(dst) + ".tmp-", dir=parent)
  try:
    yield tmp
    if not os.path.exists(dst):
      os.replace(tmp, dst)
    elif _exchange(tmp, dst):
      shutil.rmtree(tmp)  # now the old destination
    else:
      old = tempfile.mkdtemp(prefix=os.path.basename(dst) + ".old-", dir=parent)
      os.replace(dst, os.path.join(old, "x"))
      os.replace(tmp, dst)
      shutil.rmtree(old)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    clean_partial(dst)  # an old destination moved aside goes back
    raise


def save(dst: str, params: Mapping, meta: Mapping[str, Any], *, extra_files: Mapping[str, str] = (),
         overwrite: bool = False) -> None:
  """Writes params (loop layout) + meta to `dst` atomically (`staged`). extra_files: {name: source path}."""
  dst = os.path.abspath(dst)
  flat = flatten(params)
  if any(k == "layers" or k.startswith("layers/") for k in flat):
    raise ConversionError(f"{dst}: params are in the scan layout; save the loop layout (unstack_layers)")
  with staged(dst, overwrite=overwrite) as tmp:
    record = dict(meta, layout="loop",
                  params={k: [list(np.shape(v)), str(np.asarray(v).dtype if not hasattr(v, "dtype") else v.dtype)]
                          for k, v in sorted(flat.items())})
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(tmp, PARAMS_DIR), unflatten(flat))
    ckptr.wait_until_finished()
    for name, src in dict(extra_files).items():  # files (tokenizer) or whole directories (a TUNA's vae/)
      (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, os.path.join(tmp, name))
    with open(os.path.join(tmp, META_FILE), "w") as f:
      json.dump(record, f, indent=1)


def restore(path: str, abstract: Mapping) -> dict:
  """Restores params into the structure of `abstract` (nested ShapeDtypeStruct, optionally sharded).

  Refuses a checkpoint whose layout, parameter paths or shapes differ from the model's.
  """
  meta = read_meta(path)
  if meta.get("layout") != "loop":
    raise ConversionError(f"{path}: layout {meta.get('layout')!r} is not the loop layout")
  want = flatten(abstract)
  have = {k: tuple(v[0]) for k, v in meta["params"].items()}
  missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
  shapes = [f"{k}: checkpoint {have[k]}, model {tuple(want[k].shape)}"
            for k in sorted(set(want) & set(have)) if have[k] != tuple(want[k].shape)]
  if missing or unexpected or shapes:
    raise ConversionError(
        f"{path}: checkpoint does not fit the model:\n  missing: {missing[:20]}\n  unexpected: "
        f"{unexpected[:20]}\n  shape mismatches: {shapes[:20]}")
  target = unflatten({k: v if isinstance(v, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(v.shape, v.dtype)
                      for k, v in want.items()})
  return ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(path), PARAMS_DIR), target)


def stack_layers(params: Mapping, depth: int, prefix: str = "layers") -> dict:
  """Loop layout {prefix_i: tree} -> scan layout {prefix: tree stacked on axis 0}."""
  params = dict(params)
  layers = [params.pop(f"{prefix}_{i}") for i in range(depth)]
  if any(k.startswith(prefix + "_") for k in params):
    raise ConversionError(f"stack_layers: more than {depth} {prefix}_i entries")
  params[prefix] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return params


def unstack_layers(params: Mapping, prefix: str = "layers") -> dict:
  """Scan layout -> loop layout (inverse of stack_layers)."""
  params = dict(params)
  stacked = params.pop(prefix)
  depth = jax.tree.leaves(stacked)[0].shape[0]
  for i in range(depth):
    params[f"{prefix}_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return params
