"""Preemption and multi-host, for real: SIGKILL / SIGTERM mid-run then resume, two processes over gloo,
and the scripts/train.py entry point. Per-step losses come from the runs' TensorBoard event files."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # configs/

from configs import qwen_lm  # noqa: E402
from unimm_jax.training import checkpointing, metrics, trainer  # noqa: E402

OVERRIDES = {"steps": 8, "checkpoint.every": 3, "log_every": 1}


def tiny(**overrides):
  config = qwen_lm.get_config("tiny")
  config.update_from_flattened_dict({**OVERRIDES, **overrides})
  return config


class SignalAt:
  """Wraps the data iterator; when batch `at` is requested (step `at` starts), waits until checkpoint
  `after` is on disk, then sends `sig` to this process."""

  def __init__(self, base, at, after, sig, workdir):
    self.base, self.at, self.after, self.sig, self.workdir, self.n = base, at, after, sig, workdir, 0

  def __call__(self, *args):
    self.it, self.n = iter(self.base(*args)), 0
    return self

  def __iter__(self):
    return self

  def __next__(self):
    self.n += 1
    if self.n == self.at:
      deadline = time.time() + 60
      while not os.path.isdir(os.path.join(self.workdir, "checkpoints", str(self.after))):
        assert time.time() < deadline, "checkpoint never finished"
        time.sleep(0.02)
      os.kill(os.getpid(), self.sig)
    return next(self.it)

  def get_state(self):  # grain's checkpoint handler stores bytes for iterators that are not grain's
    return json.dumps(self.it.get_state()).encode()

  def set_state(self, state):
    self.it.set_state(json.loads(state))


CHILD = """
import os, signal, sys
sys.path[:0] = [{root!r}, {tests!r}]
import test_train_resume as t
from unimm_jax import registry
from unimm_jax.training import trainer
registry.DATASETS["synthetic_tokens"] = t.SignalAt(registry.dataset("synthetic_tokens"), {at}, {after},
                                                   signal.SIGKILL, {workdir!r})
trainer.train(t.tiny(), {workdir!r})
"""


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  trainer.train(tiny(), workdir)
  return metrics.read_scalars(os.path.join(workdir, "events"))["loss"]


def test_resume_after_sigkill_gives_bitwise_equal_losses(reference, tmp_path):
  workdir = str(tmp_path)
  code = CHILD.format(root=ROOT, tests=os.path.dirname(__file__), at=6, after=3, workdir=workdir)
  proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, JAX_PLATFORMS="cpu"),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3"]
  killed = metrics.read_scalars(os.path.join(workdir, "events"))["loss"]
  assert sorted(killed) == [1, 2, 3, 4, 5]
  trainer.train(tiny(), workdir)  # resumes at step 3: steps 4 and 5 are redone
  resumed = metrics.read_scalars(os.path.join(workdir, "events"))["loss"]
  assert resumed == reference, (resumed, reference)


@pytest.mark.slow
def test_sigterm_saves_at_the_step_boundary_and_resume_matches(reference, tmp_path, monkeypatch):
  workdir = str(tmp_path)
  position = checkpointing.DataPosition

  def signal_after_step_5(data):  # taken before step 1 and after each step, outside any wait: the boundary path
    if len(signal_after_step_5.calls) == 5:
      os.kill(os.getpid(), signal.SIGTERM)
    signal_after_step_5.calls.append(1)
    return position(data)

  signal_after_step_5.calls = []
  monkeypatch.setattr(checkpointing, "DataPosition", signal_after_step_5)
  with pytest.raises(trainer.Interrupted, match=r"SIGTERM: training stopped at step 5, checkpointed") as e:
    trainer.train(tiny(), workdir)
  assert (e.value.step, e.value.latest) == (5, 5)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int) == ["3", "5"]
  monkeypatch.undo()
  trainer.train(tiny(), workdir)
  assert metrics.read_scalars(os.path.join(workdir, "events"))["loss"] == reference


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _script(workdir, devices, *extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  cmd = [sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--config",
         os.path.join(ROOT, "configs", "qwen_lm.py") + ":tiny", "--workdir", workdir, "--config.steps=4",
         "--config.log_every=1", *extra]
  return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_train_script_runs_the_tiny_config(tmp_path):
  proc = _script(str(tmp_path), 8, "--config.optim.schedule=linear", "--config.profile.start=2",
                 "--config.profile.steps=1")
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-3000:]
  scalars = metrics.read_scalars(str(tmp_path / "events"))
  assert sorted(scalars["loss"]) == [1, 2, 3, 4] and sorted(scalars["perf/tokens_per_s"]) == [2, 3, 4]
  assert os.listdir(tmp_path / "checkpoints") == ["4"]
  assert json.load(open(tmp_path / "config.json"))["optim"]["schedule"] == "linear"
  traces = [f for _, _, files in os.walk(tmp_path / "profile") for f in files]
  assert any(f.endswith(".xplane.pb") for f in traces), traces


@pytest.mark.slow
def test_two_processes_over_gloo_match_one_process(tmp_path):
  one = _script(str(tmp_path / "one"), 4)
  assert one.wait(timeout=600) == 0, one.stdout.read()[-3000:]
  port = _free_port()
  procs = [_script(str(tmp_path / "two"), 2, f"--coordinator_address=localhost:{port}", "--num_processes=2",
                   f"--process_id={i}") for i in range(2)]
  for p in procs:
    assert p.wait(timeout=600) == 0, p.stdout.read()[-3000:]
  want = metrics.read_scalars(str(tmp_path / "one" / "events"))
  got = metrics.read_scalars(str(tmp_path / "two" / "events"))
  assert sorted(got["loss"]) == [1, 2, 3, 4]
  for tag in ("loss", "grad_norm"):
    for step, value in want[tag].items():
      assert got[tag][step] == pytest.approx(value, rel=1e-6, abs=1e-6), (tag, step)
