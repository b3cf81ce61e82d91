"""Smoke tests of scripts/bench_train.py and scripts/scaling.py on their tiny settings, and a stopped sweep."""

import importlib.util
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs.scaling import qwen_lm as sweep  # noqa: E402
from unimm_jax.training import metrics, trainer  # noqa: E402


def _scaling():
  spec = importlib.util.spec_from_file_location("scaling_script", os.path.join(ROOT, "scripts", "scaling.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_scaling_sweep_configs_differ_only_in_size_and_budget():
  runs = sweep.runs("tiny")
  assert len(runs) == 4
  a, b = sweep.get_config(runs[0]), sweep.get_config(runs[-1])
  assert (a.model.embed, a.steps) == (32, 3) and (b.model.embed, b.steps) == (64, 6)
  assert a.optim == b.optim and a.data == b.data
  with pytest.raises(KeyError, match="sizes"):
    sweep.get_config("family=tiny,size=l")
  with pytest.raises(KeyError, match="choose one of"):
    sweep.runs("huge")


def test_scaling_list_reports_params_flops_and_status(tmp_path, capsys):
  _scaling().main(["list", "--family", "tiny", "--root", str(tmp_path)])
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 5 and all(line.split()[-2:] == ["todo", "-"] for line in lines[1:])


@pytest.mark.slow
def test_scaling_plot_draws_loss_against_compute(tmp_path, capsys):
  script = _scaling()
  for arg in sweep.runs("tiny")[:2]:
    trainer.train(sweep.get_config(arg), str(tmp_path / arg))
  capsys.readouterr()  # drop the training logs
  script.main(["list", "--family", "tiny", "--root", str(tmp_path)])
  status = [line.split()[-2] for line in capsys.readouterr().out.strip().splitlines()[1:]]
  assert status == ["done", "done", "todo", "todo"]
  script.main(["plot", "--family", "tiny", "--root", str(tmp_path)])
  with open(tmp_path / "scaling.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.parametrize("config", ["qwen_lm.py:tiny", "tuna_tiny.py:smoke"])  # TUNA nests its model config
def test_bench_train_reports_device_dtype_and_mfu(config):
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "scripts", "bench_train.py"),
       "--config", os.path.join(ROOT, "configs", config), "--steps", "2"],
      env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  table = dict(line.split("  ", 1) for line in out.stdout.strip().splitlines())
  table = {k.strip(): v.strip() for k, v in table.items()}
  assert table["device"].endswith("(cpu)") and table["dtype (compute / params)"] == "float32 / float32"
  assert 0 < float(table["MFU (achieved / peak)"].rstrip("%")) < 100


@pytest.mark.slow
def test_scaling_launch_hands_a_stop_to_the_running_train_and_ends_the_sweep(tmp_path):
  arg = sweep.runs("tiny")[0]
  proc = subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "scripts", "scaling.py"), "launch", "--family", "tiny", "--root",
       str(tmp_path), "--config.steps=100000", "--config.checkpoint.every=0", "--config.log_every=1"],
      env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True)
  deadline = time.time() + 300
  while len(metrics.read_scalars(str(tmp_path / arg / "events")).get("loss", {})) < 2:  # the run is training
    assert time.time() < deadline and proc.poll() is None, proc.stdout.read()[-3000:] if proc.poll() else "slow"
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)  # to the sweep only, as a scheduler would
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
  assert f"scaling: run {arg} was stopped; the same launch command resumes it" in out
  assert "train: SIGTERM: training stopped at step" in out  # the run got the signal, saved and said so
  assert len(os.listdir(tmp_path / arg / "checkpoints")) == 1
