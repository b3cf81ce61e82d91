"""Training-step benchmark: step time, throughput and MFU of one config on the local devices.

  python scripts/bench_train.py                                  # ~100M Qwen LM, TUNA-like length 1152
  python scripts/bench_train.py --config configs/qwen_lm.py:tiny --steps 2   # smoke
  python scripts/bench_train.py --config configs/<task>.py:<variant> --dtype bfloat16

The task comes from the config (`config.task`), so any registered task is benchmarked the same way.
MFU = analytic model FLOPs per step / step time / (peak FLOP/s * devices). Peak: the device's data
sheet (unimm_jax.training.metrics.PEAK_FLOPS), --config.peak_tflops, or on CPU a matmul measured in
this run in the same dtype (the reference the MFU ratio is taken against). XLA's cost analysis of the
compiled step is printed beside the analytic count (it includes rematerialisation and the optimizer).
"""

from __future__ import annotations

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", os.path.join(ROOT, "configs", "qwen_lm.py") + ":100m",
                                "configs/<file>.py[:variant]", lock_config=False)
flags.DEFINE_integer("steps", 3, "timed steps (after one compile + warm-up step)")
flags.DEFINE_integer("batch", 1, "global batch size (overrides config.batch_size)")
flags.DEFINE_string("dtype", "", "compute dtype override (bfloat16, float32); empty = the config's")
FLAGS = flags.FLAGS


def matmul_peak(dtype, n: int = 2048, reps: int = 5) -> float:
  """FLOP/s of an n x n matmul on device 0: what this device sustains on the core op."""
  import jax
  import jax.numpy as jnp
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  t = time.perf_counter()
  for _ in range(reps):
    f(a).block_until_ready()
  return 2 * n**3 * reps / (time.perf_counter() - t)


def measure(config, batches, steps: int, compiler_options: dict | None = None, devices=None) -> dict:
  """Builds `config` on `devices` (default: all local devices; an fsdp mesh), runs one compile + warm-up step
  and `steps` timed steps on batches from the iterator `batches` (this process's rows), -> the numbers `main`
  prints (see `table`). compiler_options go to XLA's compile of the step (scripts/device_check.py's dry run:
  one CPU device, a fast compile)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np

  from unimm_jax import sharding
  from unimm_jax.training import metrics, trainer

  # a TUNA config nests its decoder and flow head; each carries its own dtypes
  towers = [config.model[k] for k in ("llm", "head") if k in config.model] or [config.model]
  config.mesh.ici = (1, -1, 1)
  mesh = sharding.make_mesh(config.mesh.ici, config.mesh.dcn, devices=devices)
  rules = sharding.rules_from_config(config.sharding.rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    s = trainer.build(config, mesh, rules)
    state = s.init(jax.random.PRNGKey(0))
    batch = s.global_batch(next(batches))
    t = time.perf_counter()
    step = s.step.lower(state, batch).compile(compiler_options)
    compile_s = time.perf_counter() - t
    xla_flops = (step.cost_analysis() or {}).get("flops", float("nan"))
    state, out = step(state, batch)
    jax.block_until_ready(out)
    times = []
    for _ in range(steps):
      batch = s.global_batch(next(batches))
      t = time.perf_counter()
      state, out = step(state, batch)
      jax.block_until_ready(out)
      times.append(time.perf_counter() - t)
  step_s = float(np.median(times))
  flops = s.task.flops_per_example * config.batch_size
  dev = jax.devices()[0]
  peak = metrics.peak_flops(dev, float(config.peak_tflops))
  peak_src = "data sheet" if peak else "measured matmul"
  if peak is None:
    peak = matmul_peak(jnp.dtype(towers[0].dtype))
  return dict(
      devices=mesh.size, device_kind=dev.device_kind, platform=dev.platform, task=config.task,
      params=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params)),
      dtype=str(towers[0].dtype), param_dtype=str(towers[0].param_dtype), remat=str(towers[0].remat),
      scan_layers=bool(towers[0].scan_layers), batch=int(config.batch_size), tokens=s.task.tokens_per_example,
      compile_s=compile_s, step_s=step_s, steps=steps, flops=flops, xla_flops=xla_flops,
      peak=peak, peak_src=peak_src, mfu=flops / step_s / (peak * mesh.size), loss=float(out["loss"]))


def table(r: dict, config_name: str) -> list[tuple[str, str]]:
  """`measure`'s numbers as the printed (name, value) rows."""
  return [
      ("device", f"{r['devices']} x {r['device_kind']} ({r['platform']})"),
      ("task / config", f"{r['task']} / {config_name}"),
      ("params", f"{r['params'] / 1e6:.1f}M"),
      ("dtype (compute / params)", f"{r['dtype']} / {r['param_dtype']}"),
      ("remat / scan", f"{r['remat']} / {r['scan_layers']}"),
      ("batch x tokens", f"{r['batch']} x {r['tokens']}"),
      ("compile", f"{r['compile_s']:.1f} s"),
      ("step time (median)", f"{r['step_s'] * 1e3:.1f} ms over {r['steps']} steps"),
      ("tokens/s", f"{r['batch'] * r['tokens'] / r['step_s']:,.0f}"),
      ("analytic TFLOP/step", f"{r['flops'] / 1e12:.3f}"),
      ("XLA cost-analysis / analytic", f"{r['xla_flops'] / r['flops']:.3f}"),
      ("achieved TFLOP/s/device", f"{r['flops'] / r['step_s'] / r['devices'] / 1e12:.3f}"),
      (f"peak TFLOP/s/device ({r['peak_src']})", f"{r['peak'] / 1e12:.3f}"),
      ("MFU (achieved / peak)", f"{r['mfu']:.1%}"),
      ("loss after warm-up + steps", f"{r['loss']:.4f}"),
  ]


def main(argv):
  del argv
  from unimm_jax import registry

  config = FLAGS.config
  config.batch_size = FLAGS.batch
  if FLAGS.dtype:
    for m in [config.model[k] for k in ("llm", "head") if k in config.model] or [config.model]:
      m.dtype = FLAGS.dtype
  batches = iter(registry.dataset(config.data.name)(config, config.batch_size, 0, 1))
  rows = table(measure(config, batches, FLAGS.steps), config_flags.get_config_filename(FLAGS["config"]))
  width = max(len(k) for k, _ in rows)
  for k, v in rows:
    print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
  app.run(main)
