"""diffusers schedulers, read from a `scheduler_config.json` and run by `sampling/diffusion.denoise`.

SCHEDULERS maps diffusers' `_class_name` to our implementation ("module:attr", imported on use); each class
has `from_config(config: dict, num_inference_steps: int, **options) -> scheduler` (options: what diffusers'
`set_timesteps` takes, e.g. `mu` for dynamic shifting or custom `sigmas`) and the interface documented in
sampling/diffusion.py. Every step equals diffusers' within 1e-5 on random model outputs (tests).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from unimm_jax import registry

SCHEDULERS = {
    "FlowMatchEulerDiscreteScheduler": "unimm_jax.sampling.flow_match_euler:FlowMatchEuler",
    "DPMSolverMultistepScheduler": "unimm_jax.sampling.dpm_solver:DPMSolverMultistep",
}


def read_config(path: str) -> dict[str, Any]:
  """A diffusers scheduler directory or its scheduler_config.json -> the config dict."""
  file = os.path.join(path, "scheduler_config.json") if os.path.isdir(path) else path
  if not os.path.isfile(file):
    raise ValueError(f"{path}: no scheduler_config.json")
  with open(file) as f:
    return json.load(f)


def from_config(config: Mapping[str, Any] | str, num_inference_steps: int, **options) -> Any:
  """A scheduler for `num_inference_steps` steps from a diffusers scheduler config (dict, file or directory)."""
  d = read_config(config) if isinstance(config, str) else dict(config)
  name = d.get("_class_name")
  cls = registry.lookup(SCHEDULERS, name, "scheduler _class_name")
  return cls.from_config(d, num_inference_steps, **options)
