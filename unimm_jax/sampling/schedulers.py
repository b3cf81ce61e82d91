"""diffusers schedulers, read from a `scheduler_config.json` and run by `sampling/diffusion.denoise`.

SCHEDULERS maps diffusers' `_class_name` to our implementation ("module:attr", imported on use); each class
has `from_config(config: dict, num_inference_steps: int, **options) -> scheduler` (options: what diffusers'
`set_timesteps` takes, e.g. `mu` for dynamic shifting or custom `sigmas`) and the interface documented in
sampling/diffusion.py. Every step equals diffusers' within 1e-5 on random model outputs (tests).

Config fields follow diffusers: one missing from the file takes the class default (files written by older
diffusers lack newer fields, and diffusers fills them the same way); one the class does not know is refused.
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


def config_fields(config: Mapping[str, Any], defaults: Mapping[str, Any], where: str) -> dict[str, Any]:
  """The scheduler's fields: `defaults` overridden by `config`; "_" keys are metadata (_class_name, versions);
  any other key the scheduler does not know is a ValueError naming it."""
  unknown = sorted(k for k in config if not k.startswith("_") and k not in defaults)
  if unknown:
    raise ValueError(f"{where}: scheduler config fields {unknown} are not supported (known: {sorted(defaults)})")
  return {**defaults, **{k: v for k, v in config.items() if not k.startswith("_")}}


def check_options(options: Mapping[str, Any], known: tuple[str, ...], where: str) -> None:
  """Raises a ValueError naming any option (from_config keyword) that is not in `known`."""
  unknown = sorted(set(options) - set(known))
  if unknown:
    raise ValueError(f"{where}: unknown scheduler options {unknown} (known: {sorted(known)})")


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
