"""Multi-host start-up: `jax.distributed.initialize` from explicit flags or the cluster environment.

Explicit: coordinator address + number of processes + this process's id (e.g. from a launcher).
Environment: JAX's cluster detection (Cloud TPU pods, SLURM, Open MPI, Kubernetes, or
JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID). A plain single-machine run starts nothing.
"""

from __future__ import annotations

import os

import jax

# Variables whose presence means a launcher started several cooperating processes.
_CLUSTER_ENV = {
    "SLURM_NTASKS": lambda v: int(v) > 1,
    "OMPI_COMM_WORLD_SIZE": lambda v: int(v) > 1,
    "TPU_WORKER_HOSTNAMES": lambda v: "," in v,    # Cloud TPU pod: one host name per worker
    "MEGASCALE_COORDINATOR_ADDRESS": lambda v: bool(v),  # multi-slice TPU
    "JAX_COORDINATOR_ADDRESS": lambda v: bool(v),
}


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> bool:
  """Joins the distributed runtime if asked to or if launched on a cluster; returns whether it did."""
  explicit = (bool(coordinator_address), num_processes > 0, process_id >= 0)
  if any(explicit):
    if not all(explicit):
      raise ValueError("distributed: pass all of --coordinator_address, --num_processes and --process_id "
                       f"(got {coordinator_address!r}, {num_processes}, {process_id})")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True
  if any(name in os.environ and is_multi(os.environ[name]) for name, is_multi in _CLUSTER_ENV.items()):
    jax.distributed.initialize()
    return True
  return False
