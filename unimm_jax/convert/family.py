"""What the converter, `unimm_jax.load` and the CLIs know of a model family: one `Family` per family, defined
beside its key map (convert/maps/<family>.py) and listed in `unimm_jax.registry.FAMILIES`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax

from unimm_jax.convert.errors import ConversionError

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"   # the name diffusers' from_pretrained looks for


@dataclasses.dataclass(frozen=True)
class Reference:
  """A release without an HF config.json, converted by `scripts/convert.py --<flag> VARIANT --src ... --dst ...`.

  parts: the extra path flags it reads (name -> help), shared by name between families (`--vae`, `--siglip`).
  convert: "module:function", called as convert(variant, src, dst, parts: {name: path or None}, overwrite)
  and returning a JSON-able report.
  """

  flag: str
  help: str
  convert: str
  parts: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Family:
  """One model family.

  hf_model_types: `model_type` (transformers) / `_class_name` (diffusers) values of the config.json it reads.
  part_of: model_types of bigger checkpoints holding this family's model, read only when the family is asked
    for by name (`unimm_jax.load(dir, family=...)`, `scripts/convert.py --family`): Qwen2.5-VL's text decoder.
  config_from_hf: HF config dict -> our config; None when the family has no HF form (it has a `reference`).
  module / example_inputs: the linen module of a config and inputs that build all of its params.
  rules / ignore: the key map of a config (convert/engine.py), IGNORE patterns written down.
  key_prefixes: source prefix -> the rules' prefix, per HF model_type of the file.
  hf_config: our config -> config.json for export; None: no HF form (export is refused).
  pipeline: "module:function" loading a converted directory for scripts/sample.py, edit.py, chat.py --image.
  stack_layers: loop -> scan layout of loaded params for a config with scan_layers (default: the top-level
    `layers_{i}`; models with several towers stack each).
  """

  name: str
  config_cls: type
  module: Callable[[Any], nn.Module]
  example_inputs: Callable[[Any], tuple]
  rules: Callable[[Any], tuple]
  ignore: Callable[[Any], tuple] = lambda cfg: ()
  hf_model_types: tuple[str, ...] = ()
  part_of: tuple[str, ...] = ()
  config_from_hf: Callable[[Mapping[str, Any]], Any] | None = None
  key_prefixes: Callable[[str], dict[str, str]] = lambda model_type: {}
  hf_config: Callable[[Any], dict[str, Any]] | None = None
  reads_text: bool = True                         # load() also loads the tokenizer (not vision towers)
  weights_file: str = "model.safetensors"         # what export writes (diffusers: diffusion_pytorch_model)
  legacy_keys: tuple[tuple[str, str], ...] = ()   # (regex, replacement) renames of older releases, import only
  reference: Reference | None = None
  pipeline: str | None = None
  stack_layers: Callable[[Any, Any], Any] | None = None

  def check_exportable(self, where: str) -> None:
    if self.hf_config is None:
      how = f" (it converts from its release with scripts/convert.py --{self.reference.flag})" if self.reference else ""
      raise ConversionError(f"{where}: family {self.name!r} has no Hugging Face form to export to{how}")


def abstract_params(fam: Family, cfg: Any) -> dict:
  """Nested ShapeDtypeStructs of the model's params, without allocating them."""
  boxed = jax.eval_shape(fam.module(cfg).init, jax.random.key(0), *fam.example_inputs(cfg))["params"]
  # `.value`, not nn.meta.unbox: unboxing applies a sharding constraint, which fails on abstract
  # values inside jax.set_mesh
  return jax.tree.map(lambda b: b.value, boxed, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
