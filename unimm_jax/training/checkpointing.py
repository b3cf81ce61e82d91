"""Training checkpoints: Orbax CheckpointManager over {train state, grain data iterator state}.

Layout: <workdir>/checkpoints/<step>/{state, data}. `state` is the sharded TrainState (restored
straight into its target shardings); `data` is the grain iterator state of every process (grain's
own Orbax handler, one JSON per process), so a resumed run reads exactly the batches it would have.
Saves are asynchronous: `save` returns once the arrays are copied off the devices.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import ml_collections
import orbax.checkpoint as ocp


def manager(workdir: str, cfg: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """Keeps the last `cfg.keep` checkpoints, plus every step divisible by `cfg.keep_every` (if > 0).
  When to save is decided by `should_save` (Orbax's own policy would also save the first step)."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=int(cfg.keep) or None,
      keep_period=int(cfg.keep_every) or None, enable_async_checkpointing=bool(cfg.async_save))
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"), options=options,
      item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()})


def should_save(step: int, cfg: ml_collections.ConfigDict) -> bool:
  return cfg.every > 0 and step % cfg.every == 0


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_iter: Any) -> None:
  """Starts an asynchronous save of `state` and the data position as checkpoint `step`."""
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter)), force=True)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any, data_iter: Any) -> Any:
  """Restores the state into `abstract_state` (ShapeDtypeStructs with shardings) and sets
  `data_iter` to the saved position. Orbax raises on a tree or shape mismatch."""
  out = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(data_iter)))
  return out["state"]
