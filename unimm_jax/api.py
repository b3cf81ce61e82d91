"""`unimm_jax.load`: one call from a checkpoint directory to a runnable model."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax

from unimm_jax import checkpoint
from unimm_jax.convert import hf
from unimm_jax.convert.errors import ConversionError


@dataclasses.dataclass
class Loaded:
  module: nn.Module
  params: Any
  config: Any
  family: str
  tokenizer: Any = None


def _tokenizer(path: str):
  if not any(os.path.isfile(os.path.join(path, n)) for n in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
    return None
  import transformers
  return transformers.AutoTokenizer.from_pretrained(path)


def load(path: str, **config_overrides) -> Loaded:
  """Loads an HF directory (converted on the fly) or a converted directory.

  config_overrides replace runtime fields of the config (dtype, scan_layers, remat, attention_impl).
  For an LLM, `out.module.apply({'params': out.params}, input_ids).logits` are the logits.
  """
  if not os.path.isdir(path):
    raise ConversionError(f"{path}: no such directory")
  if checkpoint.is_converted(path):
    meta = checkpoint.read_meta(path)
    if meta.get("family") not in hf.FAMILIES:
      raise ConversionError(f"{path}: unknown family {meta.get('family')!r}; known: {sorted(hf.FAMILIES)}")
    fam = hf.FAMILIES[meta["family"]]
    cfg = fam.config_cls.from_dict(meta["config"])
    loop_cfg = dataclasses.replace(cfg, **{k: v for k, v in config_overrides.items() if k != "scan_layers"})
    params = checkpoint.restore(path, hf.abstract_params(fam, dataclasses.replace(loop_cfg, scan_layers=False))
                                if hasattr(cfg, "scan_layers") else hf.abstract_params(fam, loop_cfg))
  else:
    fam, loop_cfg, params = hf.convert_hf(path, **{k: v for k, v in config_overrides.items() if k != "scan_layers"})
    params = jax.tree.map(jax.numpy.asarray, params)
  cfg = dataclasses.replace(loop_cfg, **config_overrides)
  if getattr(cfg, "scan_layers", False):
    params = checkpoint.stack_layers(params, getattr(cfg, "num_layers", cfg.depth))  # built layers (truncated towers)
  # A vision tower's directory may carry its text tower's tokenizer (SigLIP): not ours to load.
  tokenizer = _tokenizer(path) if fam.reads_text else None
  return Loaded(module=fam.module(cfg), params=params, config=cfg, family=fam.name, tokenizer=tokenizer)
