"""The one table of what unimm-jax can build: model families, training tasks, datasets.

Every entry names where its object lives ("module:attribute"), imported only when asked for: nothing
registers itself on import, and a family's code is not loaded until it is used. `unimm_jax.load`, the
converter (`unimm_jax.convert.hf`, `scripts/convert.py`), the trainer and the CLIs (`scripts/sample.py`,
`edit.py`, `chat.py`) all read these tables, so adding a family is one line in FAMILIES pointing at its
`Family` (convert/family.py; it lives with the family's key map in convert/maps/<family>.py).
Tests may put a callable instead of a string (monkeypatch.setitem).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

FAMILIES: dict[str, str] = {
    "qwen": "unimm_jax.convert.maps.qwen:FAMILY",
    "qwen_vl": "unimm_jax.convert.maps.qwen_vl:FAMILY",
    "qwen_vit": "unimm_jax.convert.maps.qwen_vl:FAMILY_VIT",
    "siglip": "unimm_jax.convert.maps.siglip:FAMILY_SIGLIP",
    "siglip2": "unimm_jax.convert.maps.siglip:FAMILY_SIGLIP2",
    "aimv2": "unimm_jax.convert.maps.aimv2:FAMILY",
    "vae_kl": "unimm_jax.convert.maps.vae_kl:FAMILY",
    "vae_wan": "unimm_jax.convert.maps.vae_wan:FAMILY",
    "tuna": "unimm_jax.convert.maps.tuna:FAMILY",
    "t5": "unimm_jax.convert.maps.t5:FAMILY",
    "clip_text": "unimm_jax.convert.maps.clip_text:FAMILY",
    "sana": "unimm_jax.convert.maps.sana:FAMILY",
    "dc_ae": "unimm_jax.convert.maps.dc_ae:FAMILY",
    "flux": "unimm_jax.convert.maps.flux:FAMILY",
    "internvl": "unimm_jax.convert.maps.internvl:FAMILY",
    "internvl_chat": "unimm_jax.convert.maps.internvl:FAMILY_ORIGINAL",
    "ming": "unimm_jax.convert.maps.ming:FAMILY",
    "uniworld": "unimm_jax.convert.maps.uniworld:FAMILY",
    "ovis_u1": "unimm_jax.convert.maps.ovis_u1:FAMILY",
    "openuni": "unimm_jax.convert.maps.openuni:FAMILY",
}

# config.task -> builder(config) -> training.task.Task
TASKS: dict[str, str | Callable] = {
    "lm": "unimm_jax.training.lm:build",
    "tuna": "unimm_jax.training.tuna_task:build",
    "openuni": "unimm_jax.training.openuni_task:build",
    "ming": "unimm_jax.training.ming_task:build",
    "ovis_u1": "unimm_jax.training.ovis_u1_task:build",
    "uniworld": "unimm_jax.training.uniworld_task:build",
}

# config.data.name -> builder(config, batch_per_process, process_index, process_count) -> grain.IterDataset
DATASETS: dict[str, str | Callable] = {
    "synthetic_tokens": "unimm_jax.data.synthetic:from_config",
    "shapes_tuna": "unimm_jax.data.tuna_data:shapes_from_config",
    "tuna_streams": "unimm_jax.data.tuna_data:streams_from_config",
    "shapes_openuni": "unimm_jax.data.openuni_data:shapes_from_config",
    "shapes_ming": "unimm_jax.data.ming_data:shapes_from_config",
    "shapes_ovis": "unimm_jax.data.ovis_data:shapes_from_config",
    "shapes_uniworld": "unimm_jax.data.uniworld_data:shapes_from_config",
}


def resolve(entry: str | Any) -> Any:
  """"module:attribute" -> the object (anything else is returned as it is)."""
  if not isinstance(entry, str):
    return entry
  module, _, attr = entry.partition(":")
  return getattr(importlib.import_module(module), attr)


def lookup(table: Mapping[str, Any], name: str, what: str) -> Any:
  """table[name], resolved, or a ValueError naming `what` and the choices."""
  if name not in table:
    raise ValueError(f"{what} {name!r} is not one of {sorted(table)}")
  return resolve(table[name])


def family(name: str) -> Any:
  return lookup(FAMILIES, name, "model family")


def families() -> list[Any]:
  return [resolve(entry) for entry in FAMILIES.values()]


def task(name: str) -> Callable:
  return lookup(TASKS, name, "config.task")


def dataset(name: str) -> Callable:
  return lookup(DATASETS, name, "config.data.name")
