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
import time
from collections.abc import Mapping, Sequence
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
    "spiece.model",  # sentencepiece tokenizers (T5)
    "preprocessor_config.json", "processor_config.json",   # image processors of vision-language models
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


def family_named(name: str, model_type: str | None, where: str) -> Family:
  """The family `name`, asked for explicitly, if it reads `model_type` (whole or as a part); else an error."""
  try:
    fam = registry.family(name)
  except ValueError as e:
    raise ConversionError(f"{where}: {e}") from None
  if model_type not in fam.hf_model_types + fam.part_of:
    raise ConversionError(f"{where}: family {name!r} does not read model_type {model_type!r} "
                          f"(it reads {list(fam.hf_model_types + fam.part_of)})")
  return fam


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


def _renamed(source: Mapping[str, Any], prefixes: Mapping[str, str],
             legacy: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
  """Renames the keys of a mapping (loaders, arrays or shapes): prefixes first, then legacy regexes."""
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


def convert_hf(src: str, *, param_dtype: str | None = None, place=None, family: str | None = None,
               **config_overrides) -> tuple[Family, Any, dict]:
  """HF model directory -> (family, our config, nested params in loop layout), in memory.

  Params are numpy arrays, or whatever `place` (e.g. jax.device_put) makes of each one. `family` picks a
  family by name instead of by model_type (one that reads a part of the checkpoint: Family.part_of).
  """
  hf_cfg = read_hf_config(src)
  where = os.path.join(src, "config.json")
  fam = (family_for_model_type(model_type_of(hf_cfg), where) if family is None
         else family_named(family, model_type_of(hf_cfg), where))
  cfg = fam.config_from_hf(hf_cfg)
  cfg = dataclasses.replace(cfg, param_dtype=param_dtype or _source_dtype(hf_cfg), **config_overrides)
  if getattr(cfg, "scan_layers", False):
    cfg = dataclasses.replace(cfg, scan_layers=False)  # conversion is always in the loop layout
  abstract = engine.flatten(abstract_params(fam, cfg))
  source = family_names(fam, model_type_of(hf_cfg), sources.open_weights(src))
  flat = engine.convert(source, fam.rules(cfg), abstract, ignore=fam.ignore(cfg), where=src, place=place)
  return fam, cfg, engine.unflatten(flat)


def family_names(fam: Family, model_type: str | None, source: Mapping[str, Any]) -> dict[str, Any]:
  """Keys of a file of `model_type` -> the names the family's rules read."""
  return _renamed(source, fam.key_prefixes(model_type), fam.legacy_keys)


def file_names(fam: Family, model_type: str | None, tensors: Mapping[str, Any]) -> dict[str, Any]:
  """Keys the family's rules export -> the names a file of `model_type` holds."""
  return _renamed(tensors, {new: old for old, new in fam.key_prefixes(model_type).items()})


def check_key_list(shapes: Mapping[str, Sequence[int]], fam: Family, cfg: Any, model_type: str, *,
                   where: str = "key list") -> dict[str, jax.ShapeDtypeStruct]:
  """What `convert_hf` would report for a checkpoint of `model_type` holding {name: shape}, converted into
  `cfg`, found without tensors (engine.check): every key mapped, every leaf filled with its shape."""
  abstract = engine.flatten(abstract_params(fam, cfg))
  return engine.check(family_names(fam, model_type, shapes), fam.rules(cfg), abstract,
                      ignore=fam.ignore(cfg), where=where)


def export_key_list(fam: Family, cfg: Any, model_type: str) -> dict[str, tuple[int, ...]]:
  """{name: shape} that `export_to_hf` writes for `cfg` as a `model_type` file, without tensors."""
  fam.check_exportable(f"family {fam.name}")
  abstract = engine.flatten(abstract_params(fam, cfg))
  return file_names(fam, model_type, engine.export_shapes(abstract, fam.rules(cfg)))


def convert_to_orbax(src: str, dst: str, *, param_dtype: str | None = None, overwrite: bool = False,
                     family: str | None = None) -> dict:
  """HF directory -> converted directory (Orbax params + unimm_config.json + tokenizer files)."""
  checkpoint.clean_partial(dst)  # first: a destination an interrupted run had moved aside comes back
  if os.path.exists(dst) and not overwrite:
    raise ConversionError(f"{dst}: destination exists (use --overwrite)")
  t0 = time.perf_counter()
  # Device arrays: Orbax writes them without another host copy (peak RSS ~ 1x the checkpoint).
  fam, cfg, params = convert_hf(src, param_dtype=param_dtype, place=jax.device_put, family=family)
  t1 = time.perf_counter()
  hf_cfg = read_hf_config(src)
  # A part of a bigger checkpoint is not described by its config.json: export rebuilds one or refuses.
  whole = model_type_of(hf_cfg) in fam.hf_model_types
  meta = {"family": fam.name, "config": cfg.to_dict(), "hf_config": hf_cfg if whole else None,
          "source": os.path.abspath(src)}
  extra = {n: os.path.join(src, n) for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))}
  checkpoint.save(dst, params, meta, extra_files=extra, overwrite=overwrite)
  n_bytes = sum(int(v.nbytes) for v in engine.flatten(params).values())
  return {"family": fam.name, "tensors": len(engine.flatten(params)), "bytes": n_bytes,
          "convert_s": t1 - t0, "save_s": time.perf_counter() - t1}


def export_to_hf(ckpt: str, dst: str, *, overwrite: bool = False) -> dict:
  """Converted directory -> HF directory (the family's weights file + config.json + tokenizer files)."""
  checkpoint.clean_partial(dst)
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
  tensors = file_names(fam, model_type_of(hf_cfg), tensors)
  with checkpoint.staged(dst, overwrite=overwrite) as tmp:
    save_safetensors(os.path.join(tmp, fam.weights_file), tensors, {"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf_cfg, f, indent=1)
    for n in TOKENIZER_FILES:
      if os.path.isfile(os.path.join(ckpt, n)):
        shutil.copy2(os.path.join(ckpt, n), os.path.join(tmp, n))
  return {"family": fam.name, "tensors": len(tensors)}
