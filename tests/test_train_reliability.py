"""Training that survives damage and stops cleanly: a damaged latest checkpoint, a resume whose config does
not fit, a chosen restore step, nonsense config values, runaway non-finite steps, and SIGTERM / SIGINT
wherever the trainer waits (real signals to real scripts/train.py processes, each bounded by a timeout)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # configs/

from configs import qwen_lm  # noqa: E402
from test_train_resume import SignalAt  # noqa: E402
from unimm_jax.training import checkpointing, metrics, trainer  # noqa: E402

CONFIG = os.path.join(ROOT, "configs", "qwen_lm.py") + ":tiny"


def tiny(**overrides):
  config = qwen_lm.get_config("tiny")
  config.update_from_flattened_dict({"steps": 6, "checkpoint.every": 3, "log_every": 1, **overrides})
  return config


@pytest.fixture(scope="module")
def run6(tmp_path_factory):
  """A finished 6-step run with checkpoints 3 and 6, and its losses."""
  workdir = str(tmp_path_factory.mktemp("run6"))
  trainer.train(tiny(), workdir)
  return workdir, metrics.read_scalars(os.path.join(workdir, "events"))["loss"]


def read(*path):
  with open(os.path.join(*path)) as f:
    return f.read()


def copy_of(run6, tmp_path):
  shutil.copytree(run6[0], tmp_path / "run")
  return str(tmp_path / "run")


def damage(workdir, step, how):
  state = os.path.join(workdir, "checkpoints", str(step), "state")
  blobs = os.path.join(state, "ocdbt.process_0", "d")
  biggest = os.path.join(blobs, max(os.listdir(blobs), key=lambda n: os.path.getsize(os.path.join(blobs, n))))
  if how == "truncated":  # a disk that filled up, a copy cut short
    os.truncate(biggest, os.path.getsize(biggest) // 2)
  elif how == "missing_file":
    os.remove(biggest)
  else:  # unreadable metadata
    with open(os.path.join(state, "_METADATA"), "w") as f:
      f.write("{not json")


@pytest.mark.parametrize("how, reason", [("truncated", "OUT_OF_RANGE"), ("missing_file", "FAILED_PRECONDITION"),
                                         ("metadata", "JSONDecodeError")])
def test_damaged_latest_step_is_set_aside_and_the_previous_one_resumed(run6, tmp_path, how, reason, caplog):
  workdir = copy_of(run6, tmp_path)
  damage(workdir, 6, how)
  state = trainer.train(tiny(steps=3), workdir)  # steps 6 -> 3 is a resumable change: nothing left to train
  assert int(state.step) == 3
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["3"]
  aside = os.path.join(workdir, "checkpoints_aside")
  assert sorted(os.listdir(aside)) == ["6.damaged", "6.damaged.txt"]  # moved, never deleted
  note = read(aside, "6.damaged.txt")
  assert re.search(reason, note), note
  assert re.search(rf"checkpoint step 6 is damaged \(.*({reason})", caplog.text), caplog.text
  rows = checkpointing.list_steps(workdir)
  assert [(r["step"], r["state"].split(" ")[0]) for r in rows] == [(3, "readable"), (6, "set")]
  assert "(damaged)" in rows[1]["state"]


@pytest.mark.slow
def test_resume_past_a_truncated_step_retrains_the_same_losses(run6, tmp_path):
  workdir = copy_of(run6, tmp_path)
  damage(workdir, 6, "truncated")
  trainer.train(tiny(), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
  assert metrics.read_scalars(os.path.join(workdir, "events"))["loss"] == run6[1]


def test_no_restorable_step_is_an_error_that_moves_nothing(run6, tmp_path):
  workdir = copy_of(run6, tmp_path)
  damage(workdir, 6, "truncated")
  damage(workdir, 3, "metadata")
  with pytest.raises(checkpointing.CheckpointError, match=r"no checkpoint restores \(step 6: .*OUT_OF_RANGE.*; "
                                                          r"step 3: JSONDecodeError.*Nothing was moved"):
    trainer.train(tiny(), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
  assert not os.path.exists(os.path.join(workdir, "checkpoints_aside"))
  with pytest.raises(checkpointing.CheckpointError):  # still refused: never a silent fresh start
    trainer.train(tiny(), workdir)


def test_a_changed_model_is_refused_naming_the_fields_and_the_stored_config_is_kept(run6, tmp_path):
  workdir = copy_of(run6, tmp_path)
  stored = read(workdir, "config.json")
  with pytest.raises(trainer.ConfigError, match=r"another config: .*model\.embed: 64 -> 128.*--resume=warm_start"):
    trainer.train(tiny(**{"model.embed": 128}), workdir)
  assert read(workdir, "config.json") == stored
  # warm_start lets the config through; the stored arrays still do not fit, and say which and how
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"/6 does not fit this model .*params\.embed_tokens\.embedding: stored \(256, 64\), "
                           r"model \(256, 128\)"):
    trainer.train(tiny(**{"model.embed": 128}), workdir, resume="warm_start")
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]  # not damage: nothing moved


def test_resumable_changes_are_logged_and_the_old_config_kept_beside(run6, tmp_path, caplog):
  workdir = copy_of(run6, tmp_path)
  with pytest.raises(trainer.ConfigError, match=r"data\.seed: 0 -> 1"):
    trainer.train(tiny(**{"data.seed": 1}), workdir)
  state = trainer.train(tiny(**{"optim.lr": 1e-3, "data.seed": 1}), workdir, resume="warm_start")
  assert int(state.step) == 6
  assert "config changes: optim.lr: 0.003 -> 0.001; data.seed: 0 -> 1" in caplog.text
  assert "warm start from" in caplog.text and "the data starts afresh" in caplog.text
  assert json.loads(read(workdir, "config.json"))["optim"]["lr"] == 1e-3
  assert json.loads(read(workdir, "config.6.json"))["optim"]["lr"] == 3e-3


def test_restore_step_sets_the_newer_steps_aside(run6, tmp_path):
  workdir = copy_of(run6, tmp_path)
  with pytest.raises(checkpointing.CheckpointError, match=r"no step 4 to restore; the steps are \[3, 6\]"):
    trainer.train(tiny(), workdir, restore_step=4)
  assert int(trainer.train(tiny(steps=3), workdir, restore_step=3).step) == 3
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["3"]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints_aside"))) == ["6.superseded", "6.superseded.txt"]


@pytest.mark.slow
def test_new_run_keeps_the_old_run_in_previous(run6, tmp_path):
  workdir = copy_of(run6, tmp_path)
  state = trainer.train(tiny(steps=1, **{"model.embed": 32}), workdir, resume="new_run")
  assert int(state.step) == 1 and os.listdir(os.path.join(workdir, "checkpoints")) == ["1"]
  old = os.path.join(workdir, "previous", "1")
  assert sorted(os.listdir(old)) == ["checkpoints", "config.json", "events"]
  assert sorted(os.listdir(os.path.join(old, "checkpoints"))) == ["3", "6"]
  assert json.loads(read(old, "config.json"))["model"]["embed"] == 64


def test_nonsense_config_values_are_listed_before_anything_is_written(tmp_path):
  with pytest.raises(trainer.ConfigError, match=r"config\.steps=-5 \(must be > 0\); config\.batch_size=0 "
                                                r"\(must be > 0\); config\.log_every=0 .*config\.optim\.lr=-0\.1"):
    trainer.train(tiny(steps=-5, batch_size=0, log_every=0, **{"optim.lr": -0.1}), str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


@pytest.mark.slow
def test_skip_cap_stops_a_diverging_run_and_names_the_steps(tmp_path, caplog):
  # lr 1e10 (the case): once the first update blows the params up, every step is non-finite
  config = tiny(steps=20, log_every=2, nonfinite_max_consecutive=4, **{"optim.lr": 1e10})
  with pytest.raises(trainer.NonFiniteLoss, match=r"steps (\d+)-(\d+): 4 steps in a row had a non-finite loss .*"
                                                  r"checkpointed as step (\d+)"):
    trainer.train(config, str(tmp_path))
  assert "steps skipped for a non-finite loss or gradient" in caplog.text
  assert checkpointing.list_steps(str(tmp_path))[-1]["step"] < 20


def test_skip_cap_counts_steps_in_a_row_and_in_all_reading_each_one_step_late():
  def run(cap, flags):
    return [cap.push(i + 1, {"finite": np.bool_(f), "skipped": np.int32(n)}, last=i + 1 == len(flags))
            for i, (f, n) in enumerate(flags)]

  why = run(trainer._SkipCap(consecutive=0, total=3), [(True, 0), (False, 1), (True, 1), (False, 2), (False, 3),
                                                        (True, 3)])
  assert why[:5] == [None] * 5 and why[5].startswith("step 5: 3 steps of this run")
  why = run(trainer._SkipCap(consecutive=2, total=0), [(False, 1), (True, 1), (False, 2), (False, 3), (True, 3)])
  assert why[:4] == [None] * 4 and why[4].startswith("steps 3-4: 2 steps in a row")
  why = run(trainer._SkipCap(consecutive=2, total=0), [(True, 0), (False, 1), (False, 2)])
  assert why[2].startswith("steps 2-3: 2 steps in a row")  # the last step is checked at once


# --- real signals to scripts/train.py ---------------------------------------------------------------------

class BlockAt(SignalAt):
  """Wraps the data iterator: batch `at` blocks for an hour (a stalled filesystem, a source that never ends),
  after writing "waiting for batch <at>" to stderr."""

  def __init__(self, base, at):
    super().__init__(base, at, after=None, sig=None, workdir=None)

  def __next__(self):
    self.n += 1
    if self.n == self.at:
      print(f"waiting for batch {self.at}", file=sys.stderr, flush=True)
      time.sleep(3600)
    return next(self.it)


def slow_compile(self, *args, **kwargs):
  print("a slow compilation started", file=sys.stderr, flush=True)
  time.sleep(3600)


CHILD = """
import os, runpy, sys
sys.path[:0] = [{root!r}, {tests!r}]
import jax, test_train_reliability as t
from unimm_jax import registry
from unimm_jax.training import trainer
{patch}
sys.argv = ["train.py", "--config", {config!r}, "--workdir", {workdir!r}, *{flags!r}]
runpy.run_path(os.path.join({root!r}, "scripts", "train.py"), run_name="__main__")
"""


def signal_when(workdir, patch, marker, sig, *flags):
  """Runs scripts/train.py with `patch` applied; sends `sig` once `marker` is on its stderr -> (status, stderr).
  The trainer must be gone within 60 s of the signal (it takes about one on this machine)."""
  code = CHILD.format(root=ROOT, tests=os.path.dirname(__file__), patch=patch, config=CONFIG, workdir=workdir,
                      flags=list(flags))
  proc = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""),
                          stderr=subprocess.PIPE, text=True)
  lines, deadline = [], time.time() + 300
  for line in proc.stderr:
    lines.append(line)
    if marker in line:
      break
    assert time.time() < deadline, "".join(lines[-30:])
  proc.send_signal(sig)
  try:
    _, rest = proc.communicate(timeout=60)
  except subprocess.TimeoutExpired:
    proc.kill()
    raise AssertionError("the trainer did not stop within 60 s of the signal") from None
  return proc.returncode, "".join(lines) + rest


def test_sigterm_while_waiting_for_input_saves_the_last_step_and_exits_143(tmp_path):
  workdir = str(tmp_path)
  status, err = signal_when(workdir, 'registry.DATASETS["synthetic_tokens"] = t.BlockAt('
                                        'registry.dataset("synthetic_tokens"), 3)',
                               "waiting for batch 3", signal.SIGTERM, "--config.checkpoint.every=0",
                               "--config.steps=8")
  assert status == 128 + signal.SIGTERM, err[-3000:]
  last = err.strip().splitlines()[-1]
  assert last.startswith("train: SIGTERM: training stopped at step 2, checkpointed in") and "again to resume" in last
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]


def test_sigint_while_compiling_stops_at_once_with_nothing_to_save(tmp_path):
  workdir = str(tmp_path)
  status, err = signal_when(workdir, "jax.stages.Lowered.compile = t.slow_compile", "a slow compilation started",
                               signal.SIGINT)
  assert status == 128 + signal.SIGINT, err[-3000:]
  assert err.strip().splitlines()[-1].startswith("train: SIGINT: training stopped before its first checkpoint")
  assert not os.listdir(os.path.join(workdir, "checkpoints"))


def test_flag_errors_end_in_one_line_and_list_steps_shows_the_run(run6):
  def train_py(*args):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "train.py"), *args], capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""))
    return r.returncode, r.stdout, r.stderr.strip().splitlines()

  status, _, err = train_py("--config", CONFIG, "--workdir", "/nowhere", "--config.steps=-5")
  assert (status, err[-1]) == (2, "train: error: invalid config: config.steps=-5 (must be > 0)")
  status, _, err = train_py("--config", CONFIG, "--workdir", "/nowhere", "--config.nosuch=1")
  assert status == 2 and err[-1] == "train: error: --config.nosuch=1: no such field or value 'nosuch'", err
  status, out, _ = train_py("--workdir", run6[0], "--list_steps")
  rows = [line.split() for line in out.splitlines()[1:-1]]
  assert status == 0 and [(r[0], r[3]) for r in rows] == [("3", "readable"), ("6", "readable")], out


def test_sigterm_as_interrupt_turns_sigterm_into_keyboard_interrupt_inside_the_block_only():
  from unimm_jax import cli
  before = signal.getsignal(signal.SIGTERM)
  with pytest.raises(KeyboardInterrupt, match="SIGTERM"), cli.sigterm_as_interrupt():
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
  assert signal.getsignal(signal.SIGTERM) is before
