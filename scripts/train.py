"""Train any task from a config file.

  python scripts/train.py --config configs/qwen_lm.py:tiny --workdir runs/lm_tiny [--config.optim.lr=1e-3]

An existing checkpoint in --workdir is resumed. Multi-host: launched on a TPU pod / under SLURM the
processes find each other; elsewhere pass --coordinator_address, --num_processes and --process_id.
SIGTERM saves a checkpoint at the next step boundary and exits with status 0.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/ is not installed

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "configs/<file>.py[:variant]", lock_config=True)
flags.DEFINE_string("workdir", None, "checkpoints, event files and config.json go here")
flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (multi-host without a cluster manager)")
flags.DEFINE_integer("num_processes", 0, "number of processes (with --coordinator_address)")
flags.DEFINE_integer("process_id", -1, "this process's index (with --coordinator_address)")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from unimm_jax.training import distributed, trainer
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  import jax
  logging.info("process %d/%d, %d devices (%s)", jax.process_index(), jax.process_count(), jax.device_count(),
               jax.devices()[0].device_kind)
  trainer.train(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
