"""The trainer: any Task, any mesh, from a ConfigDict (see configs/common.py for every field).

`train(config, workdir)` is the whole job; `build(config, mesh, rules)` gives the pieces (sharded
init, jitted step, batch placement) that tests and benchmarks drive directly. Both must run inside
`jax.set_mesh(mesh)` and `nn.logical_axis_rules(rules)`, entered once by `train` or the caller.

A run resumes from the newest checkpoint in its workdir that restores (training/checkpointing.py), after
comparing the config with the run's config.json: a change of the model, objective or data is refused
unless `resume` says otherwise. SIGTERM / SIGINT stop it within seconds wherever it waits (input,
compilation, setup) or at the end of the running step; the last completed step is saved and `train`
raises `Interrupted`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from absl import logging
from jax.experimental import multihost_utils

from unimm_jax import registry, sharding
from unimm_jax.training import checkpointing, metrics, optim
from unimm_jax.training.task import Task

NONFINITE = ("skip", "stop")


# resume: "auto" continues the run in workdir and refuses a config change outside RESUMABLE_CHANGES;
# "warm_start" continues from its train state with any config it fits, the data starting afresh;
# "new_run" moves the old run to workdir/previous/<n>/ and starts from scratch.
RESUME = ("auto", "warm_start", "new_run")
# Fields a resumed run may change (re.fullmatch over dotted paths): schedule length and learning rate,
# logging, checkpointing, layout. Anything else changes the model, the objective or the data it reads.
RESUMABLE_CHANGES = (
    r"steps", r"log_every", r"checkpoint\..*", r"profile\..*", r"peak_tflops", r"init_from", r"nonfinite.*",
    r"mesh\..*", r"sharding\..*", r"sample\..*", r"accum_steps", r"data\.max_consecutive_skips",
    r"optim\.(lr|warmup_steps|schedule|end_lr_frac|clip_norm|weight_decay|no_decay|b1|b2|eps)",
)
# (field, condition) checked by `train` before anything is built; fields a config lacks are not checked.
NUMERIC_FIELDS = (
    ("steps", "> 0"), ("batch_size", "> 0"), ("accum_steps", "> 0"), ("log_every", "> 0"), ("data.seq_len", "> 0"),
    ("data.max_consecutive_skips", "> 0"), ("optim.lr", ">= 0"), ("optim.warmup_steps", ">= 0"),
    ("optim.end_lr_frac", ">= 0"), ("optim.clip_norm", ">= 0"), ("optim.weight_decay", ">= 0"), ("optim.eps", "> 0"),
    ("optim.ema_decay", "in [0, 1)"), ("checkpoint.every", ">= 0"), ("checkpoint.keep", ">= 0"),
    ("checkpoint.keep_every", ">= 0"), ("nonfinite_max_consecutive", ">= 0"), ("nonfinite_max_total", ">= 0"),
    ("peak_tflops", ">= 0"), ("profile.start", ">= -1"), ("profile.steps", "> 0"),
)
_CONDITIONS = {"> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0, ">= -1": lambda v: v >= -1,
               "in [0, 1)": lambda v: 0 <= v < 1}


class ConfigError(ValueError):
  """A config field or flag that cannot work, named; raised before anything is built or written."""


class NonFiniteLoss(RuntimeError):
  """Raised by `train` with nonfinite="stop", or past the skip caps of nonfinite="skip", after checkpointing."""


class Interrupted(RuntimeError):
  """Raised by `train` after SIGTERM / SIGINT once the last completed step is checkpointed; rerun to resume.
  `step`: the last completed step (None: stopped during setup); `latest`: the newest checkpoint on disk."""

  def __init__(self, signum: int, step: int | None, latest: int | None, workdir: str):
    self.signum, self.step, self.latest, self.workdir = signum, step, latest, workdir
    where = f"{workdir}/checkpoints"
    if latest is None:
      what = "before its first checkpoint; nothing to resume from"
    elif step == latest:
      what = f"at step {step}, checkpointed in {where}"
    else:
      what = f"{'during setup' if step is None else f'at step {step}'}; the newest checkpoint is step {latest} in {where}"
    super().__init__(f"{signal.Signals(signum).name}: training stopped {what}; run the same command again to "
                     f"{'resume' if latest is not None else 'start over'}")


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # optimizer steps taken, skipped ones included
  params: Any
  opt_state: Any
  ema_params: Any          # None without EMA
  rng: jax.Array           # raw uint32 key; step s uses fold_in(rng, s)
  skipped: jax.Array       # steps whose loss or gradient was not finite (state kept)


# =============================================================================================
# Model, optimizer and shardings
# =============================================================================================

@dataclasses.dataclass
class Setup:
  """The jitted pieces of one training configuration on one mesh."""

  task: Task
  mesh: jax.sharding.Mesh
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  trainable: Any                       # tree of bools over params
  state_shardings: TrainState
  batch_sharding: jax.sharding.NamedSharding
  abstract_state: TrainState           # ShapeDtypeStructs carrying the shardings (restore target)
  init: Callable[[jax.Array], TrainState]
  init_from_params: Callable[[Any, jax.Array], TrainState]
  step: Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]

  def global_batch(self, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows -> global arrays sharded over the batch mesh axes."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
            for k, v in local.items()}


def _opt_shardings(abstract_opt: Any, abstract_params: Any, param_shardings: Any,
                   replicated: jax.sharding.Sharding) -> Any:
  """Optimizer leaves that mirror a param (same path suffix and shape) take its sharding."""
  by_path = {optim.path_str(kp): (a.shape, s) for (kp, a), s in zip(
      jax.tree_util.tree_flatten_with_path(abstract_params)[0], jax.tree.leaves(param_shardings), strict=True)}

  def pick(kp, leaf):
    for i in range(len(kp)):
      shape, s = by_path.get(optim.path_str(kp[i:]), (None, None))
      if shape == leaf.shape:
        return s
    return replicated
  return jax.tree_util.tree_map_with_path(pick, abstract_opt)


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules) -> Setup:
  """Task, optimizer, shardings and the jitted init/step for `config` on `mesh` (call inside the
  mesh and rules contexts)."""
  if config.task not in registry.TASKS:
    raise ConfigError(f"config.task {config.task!r} is not one of {sorted(registry.TASKS)}")
  if config.nonfinite not in NONFINITE:
    raise ConfigError(f"config.nonfinite {config.nonfinite!r} is not one of {NONFINITE}")
  task = registry.task(config.task)(config)
  batch_spec = nn.logical_to_mesh_axes(("act_batch",), rules)
  batch_devices = int(np.prod([mesh.shape[a] for a in jax.tree.leaves(tuple(batch_spec))]))
  accum = int(config.accum_steps)
  if config.batch_size % (accum * batch_devices * jax.process_count()):
    raise ConfigError(f"batch_size {config.batch_size} must be divisible by accum_steps {accum} * "
                     f"{batch_devices} batch-sharded devices * {jax.process_count()} processes")

  boxed = jax.eval_shape(task.init_fn, jax.random.PRNGKey(0))
  param_sh = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
  abstract_params = jax.tree.map(  # strip the metadata without a sharding constraint (not traced)
      lambda b: b.value, boxed, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
  if mesh.shape["fsdp"] * mesh.shape["tensor"] > 1:
    sharding.check_tolerance(abstract_params, param_sh, float(config.sharding.tolerance), f"task {task.name}")
  tx, trainable, schedule = optim.build(config.optim, int(config.steps), abstract_params, task.frozen)
  ema_decay = float(config.optim.ema_decay)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def state_from_params(params, rng) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=params if ema_decay > 0 else None, rng=rng,
                      skipped=jnp.zeros((), jnp.int32))

  def init_state(rng) -> TrainState:
    init_rng, train_rng = jax.random.split(rng)
    return state_from_params(nn.meta.unbox(task.init_fn(init_rng)), train_rng)

  abstract = jax.eval_shape(init_state, jax.random.PRNGKey(0))
  opt_sh = _opt_shardings(abstract.opt_state, abstract_params, param_sh, replicated)
  state_sh = TrainState(
      step=replicated, params=param_sh, opt_state=opt_sh,
      ema_params=param_sh if ema_decay > 0 else None, rng=replicated, skipped=replicated)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
  batch_sh = jax.sharding.NamedSharding(mesh, batch_spec)
  step_fn = _make_step(task, tx, schedule, trainable, accum, ema_decay, bool(config.optim.ema_warmup), param_sh,
                       mesh, batch_spec)
  return Setup(
      task=task, mesh=mesh, tx=tx, schedule=schedule, trainable=trainable, state_shardings=state_sh,
      batch_sharding=batch_sh, abstract_state=abstract,
      init=jax.jit(init_state, out_shardings=state_sh),
      init_from_params=jax.jit(state_from_params, in_shardings=(param_sh, replicated), out_shardings=state_sh),
      step=jax.jit(step_fn, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated),
                   donate_argnums=0))


# =============================================================================================
# Update step
# =============================================================================================

def _make_step(task: Task, tx, schedule, trainable, accum: int, ema_decay: float, ema_warmup: bool, param_sh, mesh,
               batch_spec):
  def loss_on(params, batch, rng, norms):
    # Frozen params are constants to autodiff: no gradient work is done for them.
    params = jax.tree.map(lambda t, p: p if t else jax.lax.stop_gradient(p), trainable, params)
    return task.loss_fn(params, batch, rng, norms)

  grad_fn = jax.value_and_grad(loss_on, has_aux=True)

  def split(x):  # [B ...] -> [A B/A ...]; microbatch i = rows i, A+i, 2A+i... so each spans all devices
    x = jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1)
    spec = jax.sharding.PartitionSpec(None, *batch_spec)
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))

  def step(state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    norms = task.normalizers(batch)  # over the whole global batch, so accumulation == large batch
    if accum == 1:
      (loss, aux), grads = grad_fn(state.params, batch, rng, norms)
    else:
      micro = jax.tree.map(split, batch)
      shapes = jax.eval_shape(grad_fn, state.params, jax.tree.map(lambda x: x[0], micro), rng, norms)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)
      zeros = (zeros[0], jax.lax.with_sharding_constraint(zeros[1], param_sh))

      def body(acc, xs):
        mb, i = xs
        out = grad_fn(state.params, mb, jax.random.fold_in(rng, i), norms)
        return jax.tree.map(lambda a, o: a + o.astype(jnp.float32), acc, out), None

      ((loss, aux), grads), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(accum)))
      grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optim.apply_updates(state.params, updates, trainable)
    ema = None
    if ema_decay > 0:
      decay = optim.ema_decay_at(ema_decay, ema_warmup, state.step - state.skipped)
      ema = optim.ema_update(state.ema_params, params, decay)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    new = TrainState(step=state.step + 1, params=keep(params, state.params),
                     opt_state=keep(opt_state, state.opt_state),
                     ema_params=keep(ema, state.ema_params) if ema_decay > 0 else None,
                     rng=state.rng, skipped=state.skipped + (~finite).astype(jnp.int32))
    out = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step - state.skipped),
           "finite": finite, "skipped": new.skipped, **{f"loss/{k}": v for k, v in aux.items()}}
    return new, out

  return step


# =============================================================================================
# Loop: data, checkpoints, metrics, preemption
# =============================================================================================

class _Stop(BaseException):
  """A stop signal arrived while the loop waited (input, compilation, setup). A BaseException, like
  KeyboardInterrupt, so that no `except Exception` on the way (a restore's fallback) mistakes it for an error."""


class _Preemption:
  """SIGTERM / SIGINT: the first one sets `signum`, read at the next step boundary (where the step is saved),
  and raises `_Stop` at once inside `waiting()`; a second one raises KeyboardInterrupt anywhere (no save).

  Waits are interruptible on one process only: with several, one process leaving a collective alone would
  hang the others, so they stop together at the step boundary (`agreed`)."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum: int | None = None
    self._interruptible = jax.process_count() == 1
    self._waiting = False
    self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None:
      raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping without saving")
    self.signum = signum
    logging.warning("%s: stopping after the current step (send it again to stop without saving)",
                    signal.Signals(signum).name)
    if self._waiting:
      raise _Stop

  @contextlib.contextmanager
  def waiting(self):
    """A region where nothing would be lost by stopping at once: blocked on input or compilation."""
    if self.signum is not None and self._interruptible:
      raise _Stop
    self._waiting = self._interruptible
    try:
      yield
    finally:
      self._waiting = False

  def agreed(self) -> bool:
    """Any process saw a signal (all processes must stop at the same step)."""
    if jax.process_count() == 1:
      return self.signum is not None
    return bool(multihost_utils.process_allgather(np.asarray(self.signum is not None)).any())

  def close(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _compile(s: Setup, state: TrainState, batch: Mapping[str, jax.Array], preempt: _Preemption, seen: set) -> None:
  """Compiles the step for a new batch signature in a worker thread: XLA does not return to Python until
  it is done (minutes for a large model), so the main thread waits where a stop signal can reach it. The
  step's own call then finds the executable in jit's cache."""
  key = tuple((k, v.shape, str(v.dtype)) for k, v in sorted(batch.items()))
  if key in seen:
    return
  rules, failure, done = nn.get_logical_axis_rules(), [], threading.Event()

  def work():
    try:
      with jax.set_mesh(s.mesh), nn.logical_axis_rules(rules):  # both are per thread
        s.step.lower(state, batch).compile()
    except Exception as e:  # noqa: BLE001 -- handed to the main thread
      failure.append(e)
    finally:
      done.set()

  threading.Thread(target=work, name="compile train step", daemon=True).start()
  with preempt.waiting():
    done.wait()
  if failure:
    raise failure[0]
  seen.add(key)


class _SkipCap:
  """nonfinite="skip" gives up after `consecutive` skipped steps in a row or `total` in the run (0: no cap).
  A step's flags are read when the next step has been dispatched, so the check never stalls the device."""

  def __init__(self, consecutive: int, total: int):
    self.consecutive, self.total = consecutive, total
    self.run, self.pending = 0, None

  def push(self, step: int, out: Mapping[str, jax.Array], last: bool) -> str | None:
    """Queues this step's flags and checks the previous step's (and this one's if `last`): why to stop, or None."""
    previous, self.pending = self.pending, (step, out["finite"], out["skipped"])
    why = self._check(*previous) if previous else None
    if last and why is None:
      why, self.pending = self._check(*self.pending), None
    return why

  def _check(self, step: int, finite, skipped) -> str | None:
    finite, skipped = jax.device_get((finite, skipped))
    self.run = 0 if finite else self.run + 1
    if self.consecutive and self.run >= self.consecutive:
      return (f"steps {step - self.run + 1}-{step}: {self.run} steps in a row had a non-finite loss or gradient "
              f"(config.nonfinite_max_consecutive = {self.consecutive})")
    if self.total and skipped >= self.total:
      return (f"step {step}: {int(skipped)} steps of this run had a non-finite loss or gradient "
              f"(config.nonfinite_max_total = {self.total})")
    return None


def _build_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  return sharding.make_mesh(tuple(config.mesh.ici), tuple(config.mesh.dcn))


def _validate(config: ml_collections.ConfigDict, resume: str, restore_step: int | None) -> None:
  """Raises ConfigError listing every field that cannot work, before anything is built or written."""
  problems = []
  for field, condition in NUMERIC_FIELDS:
    node, parts = config, field.split(".")
    for part in parts:
      node = node.get(part) if hasattr(node, "get") else None
    if node is None:
      continue
    if isinstance(node, bool) or not isinstance(node, (int, float)) or not _CONDITIONS[condition](node):
      problems.append(f"config.{field}={node!r} (must be {condition})")
  for field, table in (("task", registry.TASKS), ("nonfinite", NONFINITE), ("data.name", registry.DATASETS)):
    value = config.task if field == "task" else config.nonfinite if field == "nonfinite" else config.data.name
    if value not in table:
      problems.append(f"config.{field}={value!r} (must be one of {sorted(table)})")
  if resume not in RESUME:
    problems.append(f"resume={resume!r} (must be one of {RESUME})")
  if restore_step is not None and (restore_step < 0 or resume == "new_run"):
    problems.append(f"restore_step={restore_step} (must be a saved step >= 0, and not with resume='new_run')")
  if problems:
    raise ConfigError("invalid config: " + "; ".join(problems))


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
  return out


def _config_changes(config: ml_collections.ConfigDict, workdir: str) -> tuple[list[str], list[str]]:
  """(resumable, other) differences between `config` and the run's config.json, as "field: old -> new"."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return [], []
  with open(path) as f:
    old = _flat(json.load(f))
  new = _flat(json.loads(config.to_json_best_effort()))
  missing = object()
  changes = [(k, old.get(k, missing), new.get(k, missing)) for k in sorted(set(old) | set(new))
             if old.get(k, missing) != new.get(k, missing)]
  show = lambda v: "(absent)" if v is missing else json.dumps(v)  # noqa: E731
  fine, other = [], []
  for k, a, b in changes:
    (fine if any(re.fullmatch(p, k) for p in RESUMABLE_CHANGES) else other).append(f"{k}: {show(a)} -> {show(b)}")
  return fine, other


def _set_run_aside(workdir: str) -> str | None:
  """resume="new_run": moves the run's checkpoints, events and configs to workdir/previous/<n>/ (never deletes)."""
  names = [n for n in os.listdir(workdir) if n in ("checkpoints", checkpointing.ASIDE, "events", "profile")
           or re.fullmatch(r"config(\.\d+)?\.json", n)] if os.path.isdir(workdir) else []
  if not names:
    return None
  n = 1
  while os.path.exists(os.path.join(workdir, "previous", str(n))):
    n += 1
  dst = os.path.join(workdir, "previous", str(n))
  if jax.process_index() == 0:
    os.makedirs(dst)
    for name in names:
      shutil.move(os.path.join(workdir, name), os.path.join(dst, name))
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("new run")
  return dst


def _write_config(config: ml_collections.ConfigDict, workdir: str, step: int) -> None:
  """config.json is the config of the latest session; a different one it replaces is kept as
  config.<step>.json, the config that trained up to `step`."""
  path = os.path.join(workdir, "config.json")
  text = config.to_json_best_effort(indent=1)
  if os.path.exists(path):
    with open(path) as f:
      if f.read() == text:
        return
    n, keep = 1, os.path.join(workdir, f"config.{step}.json")
    while os.path.exists(keep):
      n += 1
      keep = os.path.join(workdir, f"config.{step}.{n}.json")
    os.replace(path, keep)
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def train(config: ml_collections.ConfigDict, workdir: str, *, resume: str = "auto",
          restore_step: int | None = None) -> TrainState:
  """Trains for config.steps optimizer steps, resuming from the newest checkpoint in `workdir` that restores
  (or from `restore_step`; newer steps are set aside). `resume` is one of RESUME. Raises ConfigError before
  anything is written, Interrupted after a stop signal, NonFiniteLoss, checkpointing.CheckpointError."""
  _validate(config, resume, restore_step)
  try:
    mesh = _build_mesh(config)
  except ValueError as e:  # sizes that do not divide the devices
    raise ConfigError(f"config.mesh: {e}") from e
  rules = sharding.rules_from_config(config.sharding.rules)
  workdir = os.path.abspath(workdir)
  if resume == "new_run":
    previous = _set_run_aside(workdir)
    if previous:
      logging.warning("resume=new_run: the previous run in %s is now in %s", workdir, previous)
  mngr = checkpointing.manager(workdir, config.checkpoint)
  try:
    if mngr.all_steps():
      fine, other = _config_changes(config, workdir)
      if other and resume == "auto":
        raise ConfigError(
            f"{workdir} holds a run with another config: {'; '.join(other)}. These change the model, the "
            "objective or the data, so its checkpoints cannot continue it: use another --workdir, or "
            "--resume=warm_start (keep the train state, restart the data) or --resume=new_run (keep the old "
            f"run in {workdir}/previous/)")
      if fine or other:
        logging.warning("resuming %s with config changes: %s", workdir, "; ".join(fine + other))
    pretrained = None
    if config.init_from and not mngr.all_steps():
      # Loaded before entering the mesh: the converter builds its abstract model outside any mesh.
      task = registry.task(config.task)(config)
      if task.load_params is None:
        raise ConfigError(f"config.init_from is set but task {task.name!r} cannot load pretrained params")
      pretrained = task.load_params(config.init_from)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      try:
        setup = build(config, mesh, rules)
      except ConfigError:
        raise
      except ValueError as e:  # sharding tolerance, freeze patterns, sizes the task rejects: all the config's
        raise ConfigError(str(e)) from e
      return _loop(config, workdir, setup, mngr, pretrained, resume, restore_step)
  finally:
    mngr.close()


def _open_data(config: ml_collections.ConfigDict):
  per_process = config.batch_size // jax.process_count()
  try:
    return iter(registry.dataset(config.data.name)(config, per_process, jax.process_index(), jax.process_count()))
  except ConfigError:
    raise
  except (ValueError, OSError) as e:  # a source that is missing or does not fit the model: the flag is at fault
    raise ConfigError(str(e)) from e


def _loop(config: ml_collections.ConfigDict, workdir: str, s: Setup, mngr, pretrained, resume: str,
          restore_step: int | None) -> TrainState:
  lead = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  preempt = _Preemption()
  data = writer = bar = None
  state = done = start = None  # the state after the last completed step, that step, and the first one's
  saved = None              # the newest step checkpointed in workdir (no need to save it again)
  profiling = False
  try:
    with preempt.waiting():  # opening sources and restoring: a signal here stops before any step
      data = _open_data(config)
      resumed = checkpointing.resume(mngr, s.abstract_state, None if resume == "warm_start" else data,
                                     step=restore_step)
    if resumed is not None:
      saved, state = resumed
      if resume == "warm_start":
        logging.warning("warm start from %s at step %d: the train state is restored, the data starts afresh",
                        workdir, saved)
      else:
        logging.info("resumed from %s at step %d", workdir, saved)
    elif pretrained is not None:
      params = jax.device_put(pretrained, s.state_shardings.params)
      state = s.init_from_params(params, jax.random.split(jax.random.PRNGKey(config.seed))[1])
    else:
      state = s.init(jax.random.PRNGKey(config.seed))
    start = done = int(state.step)
    if lead:
      _write_config(config, workdir, start)
    position = checkpointing.DataPosition(data)

    writer = metrics.EventWriter(os.path.join(workdir, "events")) if lead else None
    peak = metrics.peak_flops(jax.devices()[0], float(config.peak_tflops))
    flops_per_step = s.task.flops_per_example * config.batch_size
    cap = _SkipCap(int(config.nonfinite_max_consecutive), int(config.nonfinite_max_total))
    compiled: set = set()
    bar = tqdm.tqdm(total=config.steps, initial=start, disable=not lead, dynamic_ncols=True)
    t_last, steps_since, waited = time.perf_counter(), 0, 0.0
    logged_skips = {"steps": int(state.skipped), "data": sum(  # a resumed run says what is new since
        v for k, v in (data.stats() if hasattr(data, "stats") else {}).items() if k.startswith("skipped/"))}
    for step in range(start + 1, config.steps + 1):
      if step == config.profile.start + 1 and config.profile.start >= 0 and lead:
        jax.profiler.start_trace(os.path.join(workdir, "profile"))
        profiling = True
      t_wait = time.perf_counter()
      with preempt.waiting():
        batch = s.global_batch(next(data))
      waited += time.perf_counter() - t_wait
      _compile(s, state, batch, preempt, compiled)
      state, out = s.step(state, batch)
      done, position = step, checkpointing.DataPosition(data)
      steps_since += 1
      bar.update(1)
      log_now = step % config.log_every == 0 or step == config.steps or step == start + 1
      if config.nonfinite == "stop":
        out = jax.device_get(out)
        if not out["finite"]:
          checkpointing.save(mngr, step, state, position)
          saved = step
          raise NonFiniteLoss(f"step {step}: loss {out['loss']}, grad norm {out['grad_norm']}; the state of "
                              f"step {step - 1} is checkpointed as step {step} in {workdir}")
      else:
        why = cap.push(step, out, last=step == config.steps)
        if why:
          checkpointing.save(mngr, step, state, position)
          saved = step
          raise NonFiniteLoss(f"{why}; the state is checkpointed as step {step} in {workdir}: lower "
                              f"config.optim.lr (now {config.optim.lr}) and resume, or set nonfinite='stop'")
      if log_now:
        out = jax.device_get(out)
        scalars = {k: float(v) for k, v in out.items() if k != "finite"}
        scalars["compute/flops"] = flops_per_step * step
        if step > start + 1:  # the first step's time is mostly compilation
          dt = (time.perf_counter() - t_last) / steps_since
          scalars["perf/step_time_s"] = dt
          scalars["perf/tokens_per_s"] = s.task.tokens_per_example * config.batch_size / dt
          scalars["perf/tflops_per_device"] = flops_per_step / dt / jax.device_count() / 1e12
          if s.task.images_per_example:
            scalars["perf/images_per_s"] = s.task.images_per_example * config.batch_size / dt
          if peak:
            scalars["perf/mfu"] = flops_per_step / dt / (peak * jax.device_count())
          # Steps are dispatched asynchronously, so time blocked in next(data) is time the device could
          # have been fed: the share of wall time the input pipeline costs.
          scalars["perf/input_wait"] = waited / (time.perf_counter() - t_last)
        if hasattr(data, "stats"):  # this process's pipeline counters: samples, efficiency, skipped/<reason>
          scalars.update({f"data/{k}": float(v) for k, v in data.stats().items()})
        _warn_skips(scalars, logged_skips, step)
        if lead:
          writer.scalars(step, scalars)
          bar.set_postfix(loss=f"{scalars['loss']:.4f}", lr=f"{scalars['lr']:.2e}", refresh=False)
          tqdm.tqdm.write(f"step {step}: " + ", ".join(f"{k}={v:.5g}" for k, v in sorted(scalars.items())))
        t_last, steps_since, waited = time.perf_counter(), 0, 0.0
      if profiling and step == config.profile.start + config.profile.steps:
        jax.profiler.stop_trace()
        profiling = False
      stop = preempt.agreed()
      if checkpointing.should_save(step, config.checkpoint) or step == config.steps or stop:
        checkpointing.save(mngr, step, state, position)
        saved = step
      if stop:
        break
  except _Stop:  # waiting for input or compilation: the last step completed in this session is the one to keep
    if done is not None and done > start and done != saved:
      checkpointing.save(mngr, done, state, position)
      saved = done
  finally:
    if profiling:
      jax.profiler.stop_trace()
    preempt.close()
    if bar is not None:
      bar.close()
    mngr.wait_until_finished()
    if data is not None and hasattr(data, "close"):  # grain worker processes, prefetch threads
      data.close()
    if writer:
      writer.close()
  if preempt.signum is not None:
    raise Interrupted(preempt.signum, done, mngr.latest_step(), workdir)
  return state


def _warn_skips(scalars: dict[str, float], logged: dict[str, int], step: int) -> None:
  """Says once per log interval how many steps (non-finite) and records (bad data) were skipped since the last."""
  steps = int(scalars["skipped"])
  records = {k[len("data/skipped/"):]: int(v) for k, v in scalars.items() if k.startswith("data/skipped/")}
  if steps > logged["steps"]:
    logging.warning("step %d: %d steps skipped for a non-finite loss or gradient since the last log, %d in all",
                    step, steps - logged["steps"], steps)
  if sum(records.values()) > logged["data"]:
    logging.warning("step %d: %d records skipped since the last log, %d in all (%s)", step,
                    sum(records.values()) - logged["data"], sum(records.values()),
                    ", ".join(f"{k} {v}" for k, v in sorted(records.items())))
  logged.update(steps=steps, data=sum(records.values()))
