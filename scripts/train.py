"""Train any task from a config file.

  python scripts/train.py --config configs/qwen_lm.py:tiny --workdir runs/lm_tiny [--config.optim.lr=1e-3]
  python scripts/train.py --workdir runs/lm_tiny --list_steps        # the run's checkpoints and their state

The newest checkpoint in --workdir that restores is resumed (a damaged one is moved to
checkpoints_aside/, never deleted); --restore_step N resumes from step N instead (newer steps are set
aside). A resume whose config changes the model, objective or data is refused, naming the fields:
--resume=warm_start keeps the train state and restarts the data, --resume=new_run keeps the old run in
previous/ and starts afresh. Multi-host: launched on a TPU pod / under SLURM the processes find each
other; elsewhere pass --coordinator_address, --num_processes and --process_id.

SIGTERM / Ctrl-C save the last completed step and exit with status 128 + signal (143 / 130): run the
same command again to resume; a second signal exits at once without saving. A bad flag or config value
exits with status 2, a run that cannot go on (non-finite loss, unusable data) with 1, in one line each.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/ is not installed

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from unimm_jax import cli  # noqa: E402
from unimm_jax.data import packing  # noqa: E402
from unimm_jax.training import checkpointing, trainer  # noqa: E402

config_flags.DEFINE_config_file("config", None, "configs/<file>.py[:variant]", lock_config=True)
flags.DEFINE_string("workdir", None, "checkpoints, event files and config.json go here")
flags.DEFINE_enum("resume", "auto", trainer.RESUME, "auto: continue the run in --workdir (a config change of the "
                  "model, objective or data is refused); warm_start: continue from its train state with this "
                  "config, the data from its start; new_run: keep the old run in previous/, start afresh")
flags.DEFINE_integer("restore_step", None, "resume from this saved step (newer steps are set aside)", lower_bound=0)
flags.DEFINE_bool("list_steps", False, "list the run's checkpoints with their state and exit")
flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (multi-host without a cluster manager)")
flags.DEFINE_integer("num_processes", 0, "number of processes (with --coordinator_address)")
flags.DEFINE_integer("process_id", -1, "this process's index (with --coordinator_address)")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def list_steps(workdir: str) -> None:
  rows = checkpointing.list_steps(workdir)
  if not rows:
    print(f"{workdir}: no checkpoints")
    return
  print(f"{'step':>8s}  {'saved':19s}  state")
  for r in rows:
    print(f"{r['step']:8d}  {r['saved']:19s}  {r['state']}")
  print("resume restores the newest readable step, checked by restoring it; --restore_step N picks another")


def main(argv):
  del argv
  if FLAGS.list_steps:
    return list_steps(FLAGS.workdir)
  if FLAGS.config is None:
    cli.fail("train", "error: --config is required (configs/<file>.py[:variant]), unless --list_steps", 2)
  from unimm_jax.training import distributed
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  import jax
  logging.info("process %d/%d, %d devices (%s)", jax.process_index(), jax.process_count(), jax.device_count(),
               jax.devices()[0].device_kind)
  try:
    trainer.train(FLAGS.config, FLAGS.workdir, resume=FLAGS.resume, restore_step=FLAGS.restore_step)
  except trainer.Interrupted as e:
    cli.fail("train", e, 128 + e.signum)
  except (trainer.ConfigError, checkpointing.CheckpointError) as e:
    cli.fail("train", f"error: {e}", 2)
  except (trainer.NonFiniteLoss, packing.TooManySkips) as e:
    cli.fail("train", f"error: {e}", 1)


if __name__ == "__main__":
  try:  # a stop before training starts (or a second one inside it, which skips the save)
    with cli.sigterm_as_interrupt():
      app.run(main, flags_parser=cli.flags_parser("train"))
  except KeyboardInterrupt as e:
    cli.stopped("train", e, "stopped before a step could be saved; --workdir holds the checkpoints it had")
