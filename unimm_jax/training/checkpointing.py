"""Training checkpoints: Orbax CheckpointManager over {train state, grain data iterator state}.

Layout: <workdir>/checkpoints/<step>/{state, data}. `state` is the sharded TrainState (restored
straight into its target shardings); `data` is the grain iterator state of every process (grain's
own Orbax handler, one JSON per process), so a resumed run reads exactly the batches it would have.
Saves are asynchronous: `save` returns once the arrays are copied off the devices.

`resume` restores the newest step that really restores. A step that fails (a truncated or missing file,
unreadable metadata) is moved to <workdir>/checkpoints_aside/<step>.damaged with the reason beside it in
<step>.damaged.txt, and the next older step is tried; nothing is ever deleted. A step whose stored tree
does not fit the model is not damage: that is an error naming the parameters, and nothing is moved.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

ASIDE = "checkpoints_aside"   # steps moved out of checkpoints/, never deleted (Orbax does not look here)


class CheckpointError(RuntimeError):
  """No step restores, the step asked for does not exist or does not restore, or it does not fit the model."""


def manager(workdir: str, cfg: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """Keeps the last `cfg.keep` checkpoints, plus every step divisible by `cfg.keep_every` (if > 0).
  When to save is decided by `should_save` (Orbax's own policy would also save the first step).
  Temporary directories of saves cut short (a kill, a second Ctrl-C) are removed when it starts."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=int(cfg.keep) or None, keep_period=int(cfg.keep_every) or None,
      enable_async_checkpointing=bool(cfg.async_save), cleanup_tmp_directories=True)
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"), options=options,
      item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()})


def should_save(step: int, cfg: ml_collections.ConfigDict) -> bool:
  return cfg.every > 0 and step % cfg.every == 0


class DataPosition:
  """The data iterator's state taken right after a step's batch, so that step can be saved with its own
  position even when the iterator has been interrupted half-way through the next batch. grain's handler
  writes the bytes of a non-grain item as they are: the same file a grain iterator would write."""

  def __init__(self, data_iter: Any):
    state = data_iter.get_state()
    self._bytes = json.dumps(state, indent=4).encode() if isinstance(data_iter, grain.DatasetIterator) else state

  def get_state(self) -> bytes:
    return self._bytes


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data: Any) -> None:
  """Starts an asynchronous save of `state` and the data position (an iterator or a `DataPosition`)."""
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data)), force=True)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any, data_iter: Any | None) -> Any:
  """Restores the state into `abstract_state` (ShapeDtypeStructs with shardings) and sets `data_iter` to
  the saved position (None: the state alone, the data starts afresh). Orbax raises on a tree or shape
  mismatch; `mismatches` names the parameters first."""
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  if data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
  return mngr.restore(step, args=ocp.args.Composite(**items))["state"]


def _name(path) -> str:
  """A tree path in Orbax's naming (`opt_state.inner_states.trainable.inner_state.1.0.mu...`)."""
  return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def mismatches(mngr: ocp.CheckpointManager, step: int, abstract_state: Any) -> list[str]:
  """What differs between the tree stored at `step` and `abstract_state`: missing and unexpected arrays and
  shapes, by name. Raises whatever Orbax raises when the step's metadata cannot be read."""
  stored = {v.name: tuple(v.shape) for v in jax.tree.leaves(mngr.item_metadata(step)["state"])}
  want = {_name(p): tuple(a.shape) for p, a in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
  order = lambda k: (not k.startswith("params."), k)  # noqa: E731 -- the params first, their optimizer state after
  out = [f"{k}: stored {stored[k]}, model {want[k]}" for k in sorted(set(stored) & set(want), key=order)
         if stored[k] != want[k]]
  out += [f"{k}: not in the checkpoint" for k in sorted(set(want) - set(stored), key=order)]
  out += [f"{k}: in the checkpoint, not in the model" for k in sorted(set(stored) - set(want), key=order)]
  return out


def _reason(e: BaseException) -> str:
  """The innermost cause of a failed restore, one line (TensorStore appends its whole spec)."""
  while e.__cause__ is not None:
    e = e.__cause__
  text = str(e).split(" [tensorstore_spec=")[0].split("See full TensorStore details")[0].strip()
  text = " ".join(text.split())
  return f"{type(e).__name__}: {text[:400]}"


def _agreed(ok: bool) -> bool:
  """True when every process succeeded (they must agree on which step they resume)."""
  if jax.process_count() == 1:
    return ok
  return bool(multihost_utils.process_allgather(np.asarray(ok)).all())


def set_aside(mngr: ocp.CheckpointManager, step: int, why: str, detail: str) -> str:
  """Moves checkpoints/<step> to checkpoints_aside/<step>.<why> (process 0) and writes the reason beside it;
  returns the new path. The manager is reloaded, so it no longer lists the step."""
  root = os.path.dirname(str(mngr.directory))
  aside = os.path.join(root, ASIDE)
  dst = os.path.join(aside, f"{step}.{why}")
  if jax.process_index() == 0:
    os.makedirs(aside, exist_ok=True)
    n = 1
    while os.path.exists(dst):  # the same step set aside twice (e.g. damaged again after a rerun)
      n += 1
      dst = os.path.join(aside, f"{step}.{why}.{n}")
    os.replace(os.path.join(str(mngr.directory), str(step)), dst)
    with open(dst + ".txt", "w") as f:
      f.write(f"moved here {time.strftime('%Y-%m-%d %H:%M:%S')} ({why}): {detail}\n")
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"set aside step {step}")
  mngr.reload()
  return dst


def resume(mngr: ocp.CheckpointManager, abstract_state: Any, data_iter: Any | None, *,
           step: int | None = None) -> tuple[int, Any] | None:
  """-> (step, state) of the newest step that restores (or of `step`), None when there is no checkpoint.

  Each candidate is checked against the model first (`mismatches`: an error naming the arrays, nothing
  moved), then restored for real. Steps newer than the one resumed are set aside: damaged ones as
  `<step>.damaged`, and with an explicit `step` the newer good ones as `<step>.superseded` (its training
  continues from `step`). When no step restores, nothing is moved and CheckpointError lists each step's
  reason: never a silent fresh start.
  """
  where = str(mngr.directory)
  steps = sorted(mngr.all_steps(), reverse=True)
  if step is not None:
    if step not in steps:
      raise CheckpointError(f"{where}: no step {step} to restore; the steps are {sorted(steps)}")
    candidates = [step]
  else:
    candidates = steps
  if not candidates:
    return None
  failed: list[tuple[int, str]] = []
  for s in candidates:
    problem = None
    try:
      wrong = mismatches(mngr, s, abstract_state)
    except Exception as e:  # noqa: BLE001 -- unreadable metadata is damage, whatever Orbax raises
      wrong, problem = [], _reason(e)
    if wrong:
      raise CheckpointError(f"{where}/{s} does not fit this model ({len(wrong)} arrays): " + "; ".join(wrong[:8])
                            + ("; ..." if len(wrong) > 8 else ""))
    if problem is None:
      try:
        state = restore(mngr, s, abstract_state, data_iter)
        jax.block_until_ready(state)
      except Exception as e:  # noqa: BLE001 -- a truncated or missing file surfaces as any of several types
        problem = _reason(e)
    if _agreed(problem is None):
      for bad, why in failed:
        path = set_aside(mngr, bad, "damaged", why)
        logging.warning("checkpoint step %d is damaged (%s); moved it to %s", bad, why, path)
      for newer in (n for n in steps if n > s and n not in dict(failed)):
        path = set_aside(mngr, newer, "superseded", f"training continues from step {s} (restore_step)")
        logging.warning("step %d is newer than the step asked for (%d); moved it to %s", newer, s, path)
      return s, state
    failed.append((s, problem or "failed on another process"))
    logging.error("checkpoint step %d of %s does not restore: %s", s, where, failed[-1][1])
  listing = "; ".join(f"step {s}: {why}" for s, why in failed)
  if step is not None:
    raise CheckpointError(f"{where}: step {step} does not restore ({listing}); nothing was moved")
  raise CheckpointError(f"{where}: no checkpoint restores ({listing}). Nothing was moved; to start afresh use "
                        "another --workdir or --resume=new_run (which keeps this run in previous/)")


def _mtime(path: str) -> str:
  return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(path)))


def list_steps(workdir: str) -> list[dict[str, Any]]:
  """The run's steps, oldest first, each {step, saved, state, path}: `readable` when its metadata reads
  (a full restore, done on resume, is the real test), `damaged: <reason>` otherwise; then the steps set
  aside, with the reason recorded when they were moved."""
  root = os.path.abspath(workdir)
  rows = []
  ckpts = os.path.join(root, "checkpoints")
  if os.path.isdir(ckpts):
    mngr = ocp.CheckpointManager(ckpts, options=ocp.CheckpointManagerOptions(read_only=True),
                                 item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                "data": grain.checkpoint.CheckpointHandler()})
    for s in sorted(mngr.all_steps()):
      path = os.path.join(ckpts, str(s))
      try:
        n = len(jax.tree.leaves(mngr.item_metadata(s)["state"]))
        data = [f for f in os.listdir(os.path.join(path, "data")) if f.endswith(".json")]
        state = f"readable ({n} arrays, data position of {len(data)} process(es))" if data else \
            "damaged: no data position (data/process_*.json)"
      except Exception as e:  # noqa: BLE001 -- any failure to read is what the listing reports
        state = f"damaged: {_reason(e)}"
      rows.append(dict(step=s, saved=_mtime(path), state=state, path=path))
    mngr.close()
  aside = os.path.join(root, ASIDE)
  if os.path.isdir(aside):
    for name in sorted(os.listdir(aside), key=lambda n: (int(n.split(".")[0]), n)):
      path = os.path.join(aside, name)
      if not os.path.isdir(path):
        continue
      note = "no reason recorded"
      if os.path.exists(path + ".txt"):
        with open(path + ".txt") as f:
          note = f.read().strip()
      rows.append(dict(step=int(name.split(".")[0]), saved=_mtime(path), state=f"set aside, {note}", path=path))
  return rows
