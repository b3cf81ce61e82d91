"""`unimm_jax.load`: one call from a checkpoint directory to a runnable model."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax

from unimm_jax import checkpoint, registry
from unimm_jax.convert import hf
from unimm_jax.convert.errors import ConversionError
from unimm_jax.convert.family import abstract_params


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


def load(path: str, family: str | None = None, **config_overrides) -> Loaded:
  """Loads an HF directory (converted on the fly) or a converted directory.

  config_overrides replace runtime fields of the config (dtype, scan_layers, remat, attention_impl).
  For an LLM, `out.module.apply({'params': out.params}, input_ids).logits` are the logits.
  `family` reads an HF directory with the named family instead of the one of its model_type, e.g. "qwen" for
  the text decoder alone of a Qwen2.5-VL checkpoint (Family.part_of).
  """
  if not os.path.isdir(path):
    raise ConversionError(f"{path}: no such directory")
  if checkpoint.is_converted(path):
    fam = hf.family_of(path)
    if family is not None and family != fam.name:
      raise ConversionError(f"{path}: a converted {fam.name!r} checkpoint, not a {family!r} one")
    cfg = fam.config_cls.from_dict(checkpoint.read_meta(path)["config"])
    loop_cfg = dataclasses.replace(cfg, **{k: v for k, v in config_overrides.items() if k != "scan_layers"})
    params = checkpoint.restore(path, abstract_params(fam, dataclasses.replace(loop_cfg, scan_layers=False))
                                if hasattr(cfg, "scan_layers") else abstract_params(fam, loop_cfg))
  else:
    fam, loop_cfg, params = hf.convert_hf(path, family=family,
                                          **{k: v for k, v in config_overrides.items() if k != "scan_layers"})
    params = jax.tree.map(jax.numpy.asarray, params)
  cfg = dataclasses.replace(loop_cfg, **config_overrides)
  if getattr(cfg, "scan_layers", False):
    params = (fam.stack_layers(params, cfg) if fam.stack_layers is not None
              else checkpoint.stack_layers(params, getattr(cfg, "num_layers", cfg.depth)))  # built layers (truncated)
  # A vision tower's directory may carry its text tower's tokenizer (SigLIP): not ours to load.
  tokenizer = _tokenizer(path) if fam.reads_text else None
  return Loaded(module=fam.module(cfg), params=params, config=cfg, family=fam.name, tokenizer=tokenizer)


def family_of(path: str) -> Any:
  """The Family of a converted or HF directory (from unimm_config.json or config.json's model_type)."""
  if not os.path.isdir(path):
    raise ConversionError(f"{path}: no such directory")
  return hf.family_of(path) if checkpoint.is_converted(path) else hf.family_for_model_type(
      hf.model_type_of(hf.read_hf_config(path)), os.path.join(path, "config.json"))


def load_pipeline(path: str) -> Any:
  """A checkpoint's sampling pipeline, chosen by its family (`Family.pipeline`): what scripts/sample.py, edit.py
  and chat.py --image drive. It has `generate(prompts, size, cfg)`, `edit(images, instructions, cfg)`,
  `answer(images, questions)`, `read_image(path)` and `sampler_config(**overrides)` (None = the family default).
  An image-chat pipeline (`answer`) takes per question an image or a list of images; `max_images_per_prompt`
  (default 1) and `answers_text` (questions without images; default False) say what it accepts."""
  fam = family_of(path)
  if fam.pipeline is None:
    raise ConversionError(f"{path}: a {fam.name!r} checkpoint; that family has no generation or image-understanding "
                          f"pipeline (families with one: "
                          f"{sorted(f.name for f in registry.families() if f.pipeline)})")
  return registry.resolve(fam.pipeline)(path)
