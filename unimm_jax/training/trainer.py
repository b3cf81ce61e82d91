"""The trainer: any Task, any mesh, from a ConfigDict (see configs/common.py for every field).

`train(config, workdir)` is the whole job; `build(config, mesh, rules)` gives the pieces (sharded
init, jitted step, batch placement) that tests and benchmarks drive directly. Both must run inside
`jax.set_mesh(mesh)` and `nn.logical_axis_rules(rules)`, entered once by `train` or the caller.
"""

from __future__ import annotations

import dataclasses
import os
import signal
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


class NonFiniteLoss(RuntimeError):
  """Raised by `train` with nonfinite="stop" after checkpointing the last finite state."""


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
  if config.nonfinite not in NONFINITE:
    raise ValueError(f"config.nonfinite {config.nonfinite!r} is not one of {NONFINITE}")
  task = registry.task(config.task)(config)
  batch_spec = nn.logical_to_mesh_axes(("act_batch",), rules)
  batch_devices = int(np.prod([mesh.shape[a] for a in jax.tree.leaves(tuple(batch_spec))]))
  accum = int(config.accum_steps)
  if config.batch_size % (accum * batch_devices * jax.process_count()):
    raise ValueError(f"batch_size {config.batch_size} must be divisible by accum_steps {accum} * "
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

class _Preemption:
  """SIGTERM sets a flag; the loop saves and exits at the next step boundary."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def agreed(self) -> bool:
    """Any process saw SIGTERM (all processes must stop at the same step)."""
    if jax.process_count() == 1:
      return self.requested
    return bool(multihost_utils.process_allgather(np.asarray(self.requested)).any())

  def close(self):
    signal.signal(signal.SIGTERM, self._previous)


def _build_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  return sharding.make_mesh(tuple(config.mesh.ici), tuple(config.mesh.dcn))


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains for config.steps optimizer steps, resuming from the latest checkpoint in `workdir`."""
  build_task = registry.task(config.task)
  mesh = _build_mesh(config)
  rules = sharding.rules_from_config(config.sharding.rules)
  mngr = checkpointing.manager(workdir, config.checkpoint)
  pretrained = None
  if config.init_from and mngr.latest_step() is None:
    # Loaded before entering the mesh: the converter builds its abstract model outside any mesh.
    task = build_task(config)
    if task.load_params is None:
      raise ValueError(f"config.init_from is set but task {task.name!r} cannot load pretrained params")
    pretrained = task.load_params(config.init_from)
  try:
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return _loop(config, workdir, build(config, mesh, rules), mngr, pretrained)
  finally:
    mngr.close()


def _loop(config: ml_collections.ConfigDict, workdir: str, s: Setup, mngr, pretrained) -> TrainState:
  lead = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  if lead:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=1))
  per_process = config.batch_size // jax.process_count()
  data = iter(registry.dataset(config.data.name)(config, per_process, jax.process_index(), jax.process_count()))

  latest = mngr.latest_step()
  if latest is not None:
    state = checkpointing.restore(mngr, latest, s.abstract_state, data)
    logging.info("resumed from %s at step %d", workdir, latest)
  elif pretrained is not None:
    params = jax.device_put(pretrained, s.state_shardings.params)
    state = s.init_from_params(params, jax.random.split(jax.random.PRNGKey(config.seed))[1])
  else:
    state = s.init(jax.random.PRNGKey(config.seed))
  start = int(state.step)

  writer = metrics.EventWriter(os.path.join(workdir, "events")) if lead else None
  peak = metrics.peak_flops(jax.devices()[0], float(config.peak_tflops))
  flops_per_step = s.task.flops_per_example * config.batch_size
  preempt = _Preemption()
  bar = tqdm.tqdm(total=config.steps, initial=start, disable=not lead, dynamic_ncols=True)
  profiling = False
  t_last, steps_since, waited = time.perf_counter(), 0, 0.0
  try:
    for step in range(start + 1, config.steps + 1):
      if step == config.profile.start + 1 and config.profile.start >= 0 and lead:
        jax.profiler.start_trace(os.path.join(workdir, "profile"))
        profiling = True
      t_wait = time.perf_counter()
      batch = next(data)
      waited += time.perf_counter() - t_wait
      state, out = s.step(state, s.global_batch(batch))
      steps_since += 1
      bar.update(1)
      log_now = step % config.log_every == 0 or step == config.steps or step == start + 1
      if config.nonfinite == "stop" or log_now:
        out = jax.device_get(out)
        if not out["finite"] and config.nonfinite == "stop":
          checkpointing.save(mngr, step, state, data)
          mngr.wait_until_finished()
          raise NonFiniteLoss(f"step {step}: loss {out['loss']}, grad norm {out['grad_norm']}; the state of "
                              f"step {step - 1} is checkpointed as step {step} in {workdir}")
      if log_now:
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
        checkpointing.save(mngr, step, state, data)
      if stop:
        logging.warning("SIGTERM: saved step %d to %s, exiting", step, workdir)
        break
  finally:
    if profiling:
      jax.profiler.stop_trace()
    preempt.close()
    bar.close()
    mngr.wait_until_finished()
    if hasattr(data, "close"):  # grain worker processes, prefetch threads
      data.close()
    if writer:
      writer.close()
  return state

