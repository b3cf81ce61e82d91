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


def main(argv):
  del argv
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np

  from unimm_jax import registry, sharding
  from unimm_jax.training import metrics, trainer

  config = FLAGS.config
  config.batch_size = FLAGS.batch
  # a TUNA config nests its decoder and flow head; each carries its own dtypes
  towers = [config.model[k] for k in ("llm", "head") if k in config.model] or [config.model]
  if FLAGS.dtype:
    for m in towers:
      m.dtype = FLAGS.dtype
  config.mesh.ici = (1, -1, 1)
  mesh = sharding.make_mesh(config.mesh.ici, config.mesh.dcn)
  rules = sharding.rules_from_config(config.sharding.rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    s = trainer.build(config, mesh, rules)
    state = s.init(jax.random.PRNGKey(0))
    data = iter(registry.dataset(config.data.name)(config, config.batch_size, 0, 1))
    batch = s.global_batch(next(data))
    t = time.perf_counter()
    compiled = s.step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t
    xla_flops = (compiled.cost_analysis() or {}).get("flops", float("nan"))
    state, out = s.step(state, batch)
    jax.block_until_ready(out)
    times = []
    for _ in range(FLAGS.steps):
      batch = s.global_batch(next(data))
      t = time.perf_counter()
      state, out = s.step(state, batch)
      jax.block_until_ready(out)
      times.append(time.perf_counter() - t)
  step_s = float(np.median(times))
  flops = s.task.flops_per_example * config.batch_size
  dev = jax.devices()[0]
  peak = metrics.peak_flops(dev, float(config.peak_tflops))
  peak_src = "data sheet" if peak else "measured matmul"
  if peak is None:
    peak = matmul_peak(jnp.dtype(towers[0].dtype))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  tokens = s.task.tokens_per_example * config.batch_size
  rows = [
      ("device", f"{jax.device_count()} x {dev.device_kind} ({dev.platform})"),
      ("task / config", f"{config.task} / {config_flags.get_config_filename(FLAGS['config'])}"),
      ("params", f"{n_params / 1e6:.1f}M"),
      ("dtype (compute / params)", f"{towers[0].dtype} / {towers[0].param_dtype}"),
      ("remat / scan", f"{towers[0].remat} / {towers[0].scan_layers}"),
      ("batch x tokens", f"{config.batch_size} x {s.task.tokens_per_example}"),
      ("compile", f"{compile_s:.1f} s"),
      ("step time (median)", f"{step_s * 1e3:.1f} ms over {FLAGS.steps} steps"),
      ("tokens/s", f"{tokens / step_s:,.0f}"),
      ("analytic TFLOP/step", f"{flops / 1e12:.3f}"),
      ("XLA cost-analysis / analytic", f"{xla_flops / flops:.3f}"),
      ("achieved TFLOP/s/device", f"{flops / step_s / jax.device_count() / 1e12:.3f}"),
      (f"peak TFLOP/s/device ({peak_src})", f"{peak / 1e12:.3f}"),
      ("MFU (achieved / peak)", f"{flops / step_s / (peak * jax.device_count()):.1%}"),
      ("loss after warm-up + steps", f"{float(out['loss']):.4f}"),
  ]
  width = max(len(k) for k, _ in rows)
  for k, v in rows:
    print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
  app.run(main)
