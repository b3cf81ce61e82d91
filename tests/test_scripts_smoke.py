"""Smoke tests of the remaining entry points on tiny settings: LLM and conversion benchmarks, the demo."""

import json
import os
import re
import subprocess
import sys

import pytest

from unimm_jax.training import metrics

from scripts_run import ROOT, run


@pytest.mark.slow   # ~20 s: a benchmark's smoke run
def test_bench_llm_prints_the_table_with_ratios():
  out = run("scripts/bench_llm.py", "--tiny")
  rows = [line for line in out.splitlines() if re.search(r"\| +[0-9.]+x \|$", line)]
  assert [r.split("|")[1].strip() for r in rows] == ["prefill ms", "generate ms (total)", "decode tokens/s"]


@pytest.mark.slow   # ~20 s: a benchmark's smoke run
def test_bench_convert_reports_peak_rss_against_checkpoint_size():
  out = run("scripts/bench_convert.py", "--gb", "0.05")
  row = out.strip().splitlines()[-1]
  assert re.fullmatch(r"\| [0-9.]+ GB \| [0-9.]+ GB \| [0-9.]+ GB \| -?[0-9.]+ GB \| -?[0-9.]+x \(peak / size [0-9.]+x\) \| [0-9.]+ s \|", row), row


STOPPED_DEMO = """
import json, os, runpy, signal, sys
sys.path.insert(0, {root!r})
from unimm_jax import registry
base = registry.dataset("shapes_tuna")

class SigtermAtBatch3:  # the demo's data, and a SIGTERM while step 3 waits for its batch
  def __init__(self, *args):
    self.it, self.n = iter(base(*args)), 0
  def __iter__(self):
    return self
  def __next__(self):
    self.n += 1
    if self.n == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return next(self.it)
  def get_state(self):
    return json.dumps(self.it.get_state()).encode()
  def close(self):
    self.it.close()

registry.DATASETS["shapes_tuna"] = SigtermAtBatch3
sys.argv = ["scripts/demo.py", *{args!r}]
runpy.run_path("scripts/demo.py", run_name="__main__")
"""


def test_demo_runs_end_to_end_on_the_smoke_config(tmp_path):
  args = ["--workdir", str(tmp_path), "--config", "configs/tuna_tiny.py:smoke", "--config.sample.eval_per_category=1",
          "--config.sample.steps=2"]
  # stopped during training: it exits saying how to resume, having exported and evaluated nothing
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  stopped = subprocess.run([sys.executable, "-c", STOPPED_DEMO.format(root=ROOT, args=args)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
  assert stopped.returncode == 143, stopped.stderr[-3000:]
  last = stopped.stderr.strip().splitlines()[-1]
  assert last.startswith("demo: SIGTERM: training stopped at step 2, checkpointed in"), last
  assert "Nothing was exported or evaluated" in last and "resumes it" in last
  assert os.listdir(tmp_path / "checkpoints") == ["2"] and not os.path.exists(tmp_path / "export")
  run("scripts/demo.py", *args)  # the same command resumes at step 2 and finishes
  # logged: step 1 by the first session, 3 (its first) and 4 (the last) by the resumed one
  assert sorted(metrics.read_scalars(str(tmp_path / "events"))["loss"]) == [1, 3, 4]
  report = json.load(open(tmp_path / "report.json"))
  assert report["run"]["steps"] == 4
  assert set(report) >= {"generation", "understanding", "editing", "chance", "run"}
  for name in ("samples.png", "edits.png", "answers.txt", "report.md", "export/unimm_config.json"):
    assert os.path.exists(tmp_path / name), name
  # any converted checkpoint, here the demo's export, is scored by scripts/eval_shapes.py --ckpt
  out = run("scripts/eval_shapes.py", "--ckpt", str(tmp_path / "export"), "--per-category", "1", "--steps", "2",
            "--out", str(tmp_path / "ev"))
  scored = json.load(open(tmp_path / "ev" / "shapes_eval.json"))
  assert set(scored) >= {"generation", "understanding", "editing"} and "| generation |" in out
  bad = subprocess.run([sys.executable, "scripts/eval_shapes.py", "--ckpt", str(tmp_path / "nowhere")], cwd=ROOT,
                       capture_output=True, text=True)
  assert bad.returncode == 2 and "nowhere" in bad.stderr, bad.stderr[-2000:]
