"""Scaling studies: list, launch and plot the runs of a sweep defined in configs/scaling/<x>.py.

  python scripts/scaling.py --sweep configs/scaling/qwen_lm.py --family tiny --root runs/scaling list
  python scripts/scaling.py ... launch      # runs scripts/train.py per run, sequentially, skipping finished ones;
                                            # SIGTERM / Ctrl-C stop the running one (it saves) and the sweep
  python scripts/scaling.py ... plot        # loss vs training FLOPs from the event files -> <root>/scaling.png

A sweep file defines `runs(family) -> [arg]` and `get_config(arg)`; run i's workdir is <root>/<arg>.
Compute is the task's analytic FLOPs (the `compute/flops` scalar the trainer logs).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from unimm_jax import registry  # noqa: E402
from unimm_jax.training import metrics  # noqa: E402


def load_sweep(path: str):
  spec = importlib.util.spec_from_file_location("sweep", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def run_table(sweep, family: str, root: str) -> list[dict]:
  rows = []
  for arg in sweep.runs(family):
    config = sweep.get_config(arg)
    task = registry.task(config.task)(config)
    workdir = os.path.join(root, arg)
    losses = metrics.read_scalars(os.path.join(workdir, "events")).get("loss", {})
    rows.append(dict(arg=arg, workdir=workdir, steps=config.steps, params=_num_params(task),
                     flops=task.flops_per_example * config.batch_size * config.steps,
                     done=config.steps in losses, last_loss=losses[max(losses)] if losses else None))
  return rows


def _num_params(task) -> int:
  import jax
  import numpy as np
  boxed = jax.eval_shape(task.init_fn, jax.random.PRNGKey(0))
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(boxed)))


def cmd_list(rows) -> None:
  print(f"{'run':48s} {'params':>12s} {'steps':>7s} {'train FLOPs':>12s} {'status':>8s} {'loss':>8s}")
  for r in rows:
    loss = f"{r['last_loss']:.4f}" if r["last_loss"] is not None else "-"
    print(f"{r['arg']:48s} {r['params']:12,d} {r['steps']:7d} {r['flops']:12.3e} "
          f"{'done' if r['done'] else 'todo':>8s} {loss:>8s}")


def _train(cmd: list[str]) -> int:
  """Runs scripts/train.py in its own process group, handing it this process's SIGINT / SIGTERM: a Ctrl-C
  reaches it once, through here, so it saves and exits (a second one, passed on too, stops it at once).
  The sweep waits for it instead of dying first and leaving it running."""
  proc = subprocess.Popen(cmd, start_new_session=True)
  forward = lambda signum, frame: proc.send_signal(signum)  # noqa: E731
  previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
  try:
    return proc.wait()
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)


def cmd_launch(rows, sweep_path: str, extra: list[str]) -> None:
  for r in rows:
    if r["done"]:
      continue
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "train.py"), f"--config={sweep_path}:{r['arg']}",
           f"--workdir={r['workdir']}", *extra]
    print(" ".join(cmd), flush=True)
    code = _train(cmd)
    if code in (128 + signal.SIGINT, 128 + signal.SIGTERM) or code < 0:
      print(f"scaling: run {r['arg']} was stopped; the same launch command resumes it and the runs after it",
            file=sys.stderr)
      sys.exit(128 - code if code < 0 else code)
    if code:
      print(f"scaling: run {r['arg']} failed (exit status {code}; its error is above); the sweep stopped there",
            file=sys.stderr)
      sys.exit(1)


def cmd_plot(rows, out: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 5))
  plotted = 0
  for r in rows:
    scalars = metrics.read_scalars(os.path.join(r["workdir"], "events"))
    if "loss" not in scalars or "compute/flops" not in scalars:
      continue
    steps = sorted(set(scalars["loss"]) & set(scalars["compute/flops"]))
    ax.plot([scalars["compute/flops"][s] for s in steps], [scalars["loss"][s] for s in steps],
            label=f"{r['arg'].split(',', 1)[1]} ({r['params'] / 1e6:.2g}M)")
    plotted += 1
  if not plotted:
    raise SystemExit(f"plot: no run under {os.path.dirname(out)} has event files yet (run `launch` first)")
  ax.set(xscale="log", xlabel="training FLOPs (analytic)", ylabel="train loss", title="loss vs compute")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  print(f"wrote {out} ({plotted} runs)")


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("command", choices=("list", "launch", "plot"))
  p.add_argument("--sweep", default=os.path.join(ROOT, "configs", "scaling", "qwen_lm.py"))
  p.add_argument("--family", default="tiny")
  p.add_argument("--root", required=True, help="one workdir per run below this directory")
  p.add_argument("--out", default="", help="plot path (default <root>/scaling.png)")
  args, extra = p.parse_known_args(argv)  # extra flags go to scripts/train.py (e.g. --config.peak_tflops=...)
  sweep = load_sweep(args.sweep)
  rows = run_table(sweep, args.family, args.root)
  if args.command == "list":
    cmd_list(rows)
  elif args.command == "launch":
    cmd_launch(rows, args.sweep, extra)
  else:
    cmd_plot(rows, args.out or os.path.join(args.root, "scaling.png"))


if __name__ == "__main__":
  main()
