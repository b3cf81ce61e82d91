"""Hugging Face / PyTorch checkpoints <-> our Orbax checkpoints, for every family of `unimm_jax.registry`.

A family (convert/family.py) says which `model_type`s it reads, how its config maps, which module it
builds and its key map (`maps/<family>.py`); this module finds the family of a directory and runs the engine.
"""

from __future__ import annotations

import dataclasses
import json
import re
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from unimm_jax import checkpoint, registry
from unimm_jax.convert import engine, sources
from unimm_jax.convert.errors import ConversionError
from unimm_jax.convert.family import Family, abstract_params
from unimm_jax.convert.safetensors_writer import save_safetensors

# Copied beside converted weights and back on export: tokenizer, chat template, generation and image-processor
# settings (the image-chat pipelines read preprocessor_config.json).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
    "preprocessor_config.json", "processor_config.json",
)


def model_type_of(hf_cfg: Mapping[str, Any]) -> str | None:
  """config.json's `model_type` (transformers) or `_class_name` (diffusers)."""
  return hf_cfg.get("model_type") or hf_cfg.get("_class_name")


def family_for_model_type(model_type: str | None, where: str) -> Family:
  families = registry.families()
  for fam in families:
    if model_type in fam.hf_model_types:
      return fam
  supported = sorted(t for f in families for t in f.hf_model_types)
  raise ConversionError(f"{where}: unsupported model_type {model_type!r}; supported: {supported}")


def family_of(path: str) -> Family:
  """The family of a converted directory (its unimm_config.json), or a ConversionError naming it."""
  name = checkpoint.read_meta(path).get("family")
  try:
    return registry.family(name)
  except ValueError as e:
    raise ConversionError(f"{path}: {e}") from None


def read_hf_config(src: str) -> dict[str, Any]:
  path = os.path.join(src, "config.json") if os.path.isdir(src) else None
  if path is None or not os.path.isfile(path):
    raise ConversionError(f"{src}: no config.json (expected a Hugging Face model directory)")
  with open(path) as f:
    return json.load(f)


def _source_dtype(hf_cfg: Mapping[str, Any]) -> str:
  dtype = hf_cfg.get("dtype") or hf_cfg.get("torch_dtype") or "float32"
  return {"float16": "float16", "bfloat16": "bfloat16"}.get(str(dtype).removeprefix("torch."), "float32")


def _renamed(source: sources.LazyTensors, prefixes: Mapping[str, str],
             legacy: Sequence[tuple[str, str]] = ()) -> dict[str, Callable]:
  out = {}
  for key in source:
    for old, new in prefixes.items():
      if key.startswith(old):
        key_new = new + key[len(old):]
        break
    else:
      key_new = key
    for pattern, repl in legacy:
      key_new = re.sub(pattern, repl, key_new)
    out[key_new] = source[key]
  return out


def convert_hf(src: str, *, param_dtype: str | None = None, place=None, **config_overrides) -> tuple[Family, Any, dict]:
  """HF model directory -> (family, our config, nested params in loop layout), in memory.

  Params are numpy arrays, or whatever `place` (e.g. jax.device_put) makes of each one.
  """
  hf_cfg = read_hf_config(src)
  fam = family_for_model_type(model_type_of(hf_cfg), os.path.join(src, "config.json"))
  cfg = fam.config_from_hf(hf_cfg)
  cfg = dataclasses.replace(cfg, param_dtype=param_dtype or _source_dtype(hf_cfg), **config_overrides)
  if getattr(cfg, "scan_layers", False):
    cfg = dataclasses.replace(cfg, scan_layers=False)  # conversion is always in the loop layout
  abstract = engine.flatten(abstract_params(fam, cfg))
  source = _renamed(sources.open_weights(src), fam.key_prefixes(model_type_of(hf_cfg)), fam.legacy_keys)
  flat = engine.convert(source, fam.rules(cfg), abstract, ignore=fam.ignore(cfg), where=src, place=place)
  return fam, cfg, engine.unflatten(flat)


def convert_to_orbax(src: str, dst: str, *, param_dtype: str | None = None, overwrite: bool = False) -> dict:
  """HF directory -> converted directory (Orbax params + unimm_config.json + tokenizer files)."""
  if os.path.exists(dst) and not overwrite:
    raise ConversionError(f"{dst}: destination exists (use --overwrite)")
  t0 = time.perf_counter()
  # Device arrays: Orbax writes them without another host copy (peak RSS ~ 1x the checkpoint).
  fam, cfg, params = convert_hf(src, param_dtype=param_dtype, place=jax.device_put)
  t1 = time.perf_counter()
  meta = {"family": fam.name, "config": cfg.to_dict(), "hf_config": read_hf_config(src),
          "source": os.path.abspath(src)}
  extra = {n: os.path.join(src, n) for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))}
  checkpoint.save(dst, params, meta, extra_files=extra, overwrite=overwrite)
  n_bytes = sum(int(v.nbytes) for v in engine.flatten(params).values())
  return {"family": fam.name, "tensors": len(engine.flatten(params)), "bytes": n_bytes,
          "convert_s": t1 - t0, "save_s": time.perf_counter() - t1}


def export_to_hf(ckpt: str, dst: str, *, overwrite: bool = False) -> dict:
  """Converted directory -> HF directory (the family's weights file + config.json + tokenizer files)."""
  if os.path.exists(dst) and not overwrite:
    raise ConversionError(f"{dst}: destination exists (use --overwrite)")
  meta = checkpoint.read_meta(ckpt)
  fam = family_of(ckpt)
  fam.check_exportable(ckpt)
  cfg = fam.config_cls.from_dict(meta["config"])
  params = checkpoint.restore(ckpt, abstract_params(fam, cfg))
  flat = {k: np.asarray(v) for k, v in engine.flatten(params).items()}
  tensors = engine.export(flat, fam.rules(cfg), where=ckpt)
  hf_cfg = meta.get("hf_config") or fam.hf_config(cfg)
  back = {new: old for old, new in fam.key_prefixes(model_type_of(hf_cfg)).items()}
  tensors = _renamed(sources.LazyTensors({k: (lambda v=v: v) for k, v in tensors.items()}, {}, {}), back)
  tensors = {k: load() for k, load in tensors.items()}
  parent = os.path.dirname(os.path.abspath(dst))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(dst) + ".tmp-", dir=parent)
  try:
    save_safetensors(os.path.join(tmp, fam.weights_file), tensors, {"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf_cfg, f, indent=1)
    for n in TOKENIZER_FILES:
      if os.path.isfile(os.path.join(ckpt, n)):
        shutil.copy2(os.path.join(ckpt, n), os.path.join(tmp, n))
    if os.path.exists(dst):
      shutil.rmtree(dst)
    os.replace(tmp, dst)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return {"family": fam.name, "tensors": len(tensors)}
