"""Hugging Face / PyTorch checkpoints <-> our Orbax checkpoints, by model family.

`FAMILIES` is the table of what can be converted: which `model_type`s a family reads, how its
config maps, which module it builds, and its key map (`maps/<family>.py`).
"""

from __future__ import annotations

import dataclasses
import json
import re
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unimm_jax import checkpoint
from unimm_jax.convert import engine, sources
from unimm_jax.convert.errors import ConversionError
from unimm_jax.convert.maps import qwen as qwen_map
from unimm_jax.convert.maps import siglip as siglip_map
from unimm_jax.convert.maps import vae_kl as vae_kl_map
from unimm_jax.convert.maps import tuna as tuna_map
from unimm_jax.convert.maps import vae_wan as vae_wan_map
from unimm_jax.convert.safetensors_writer import save_safetensors
from unimm_jax.models import qwen
from unimm_jax.models import siglip
from unimm_jax.models import tuna, vae_kl, vae_wan

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"   # the name diffusers' from_pretrained looks for


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  hf_model_types: tuple[str, ...]
  config_cls: type
  config_from_hf: Callable[[Mapping[str, Any]], Any]
  module: Callable[[Any], nn.Module]
  example_inputs: Callable[[Any], tuple]
  rules: tuple
  ignore: Callable[[Any], tuple]
  key_prefixes: Callable[[str], dict[str, str]]   # source prefix -> rules' prefix, per HF model_type
  hf_config: Callable[[Any], dict[str, Any]]      # our config -> config.json for export
  reads_text: bool = True                         # load() also loads the tokenizer (not vision towers)
  weights_file: str = "model.safetensors"         # what export writes (diffusers: diffusion_pytorch_model)
  legacy_keys: tuple[tuple[str, str], ...] = ()   # (regex, replacement) renames of older releases, import only


def _qwen_hf_config(cfg: qwen.QwenConfig) -> dict[str, Any]:
  if cfg.model_type == "qwen2_5_vl_text":
    raise ConversionError("export of a Qwen2.5-VL text decoder needs the source config.json (convert from HF)")
  arch = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[cfg.model_type]
  return {
      "architectures": [arch], "model_type": cfg.model_type, "vocab_size": cfg.vocab, "hidden_size": cfg.embed,
      "intermediate_size": cfg.mlp, "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.heads,
      "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "hidden_act": cfg.act,
      "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_embeddings,
      "attention_bias": cfg.qkv_bias, "max_position_embeddings": 32768, "torch_dtype": cfg.param_dtype,
  }


def _siglip_family(version: int) -> Family:
  """SigLIP (conv stem, bicubic table resize) or SigLIP2 (linear stem, NaFlex): one module, two maps."""
  name = "siglip" if version == 1 else "siglip2"

  def hf_config(cfg: siglip.SiglipVisionConfig) -> dict[str, Any]:
    d = {"hidden_size": cfg.embed, "intermediate_size": cfg.mlp, "num_hidden_layers": cfg.depth,
         "num_attention_heads": cfg.heads, "num_channels": cfg.channels, "patch_size": cfg.patch,
         "hidden_act": cfg.act, "layer_norm_eps": cfg.norm_eps, "vision_use_head": cfg.use_head,
         "torch_dtype": cfg.param_dtype}
    if version == 2:
      return {"architectures": ["Siglip2VisionModel"], "model_type": "siglip2_vision_model",
              "num_patches": cfg.posemb_grid ** 2, **d}
    return {"architectures": ["SiglipVisionModel"], "model_type": "siglip_vision_model",
            "image_size": cfg.posemb_grid * cfg.patch, **d}

  return Family(
      name=name, hf_model_types=(f"{name}_vision_model", name), config_cls=siglip.SiglipVisionConfig,
      config_from_hf=siglip.config_from_hf, module=siglip.VisionTransformer,
      example_inputs=lambda cfg: (jnp.zeros((1, cfg.patch, cfg.patch, cfg.channels), jnp.float32),),  # 1 patch
      rules=siglip_map.RULES_SIGLIP if version == 1 else siglip_map.RULES_SIGLIP2, ignore=siglip_map.ignore,
      key_prefixes=siglip_map.hf_prefix_for, hf_config=hf_config, reads_text=False)


FAMILIES: dict[str, Family] = {
    "qwen": Family(
        name="qwen", hf_model_types=("qwen2", "qwen3", "qwen2_5_vl", "qwen2_5_vl_text"),
        config_cls=qwen.QwenConfig, config_from_hf=qwen.config_from_hf, module=qwen.Qwen,
        example_inputs=lambda cfg: (jnp.zeros((1, 1), jnp.int32),), rules=qwen_map.RULES,
        ignore=lambda cfg: qwen_map.IGNORE_TIED if cfg.tie_embeddings else qwen_map.IGNORE,
        key_prefixes=qwen_map.hf_prefix_for, hf_config=_qwen_hf_config),
    "siglip": _siglip_family(1),
    "siglip2": _siglip_family(2),
    # diffusers models name their class (`_class_name`) instead of a model_type; see model_type_of.
    "vae_kl": Family(
        name="vae_kl", hf_model_types=("AutoencoderKL",), config_cls=vae_kl.AutoencoderKLConfig,
        config_from_hf=vae_kl.config_from_diffusers, module=vae_kl.AutoencoderKL,
        example_inputs=lambda cfg: (jnp.zeros((1, cfg.downscale, cfg.downscale, cfg.in_channels)),),
        rules=vae_kl_map.RULES, ignore=lambda cfg: vae_kl_map.IGNORE, key_prefixes=lambda model_type: {},
        hf_config=vae_kl.diffusers_config, weights_file=DIFFUSERS_WEIGHTS, legacy_keys=vae_kl_map.LEGACY),
    "vae_wan": Family(  # example: 5 frames, so the streamed (cached) chunk path builds its params too
        name="vae_wan", hf_model_types=("AutoencoderKLWan",), config_cls=vae_wan.WanVAEConfig,
        config_from_hf=vae_wan.config_from_diffusers, module=vae_wan.WanVAE,
        example_inputs=lambda cfg: (jnp.zeros((1, 5, cfg.scale_factor_spatial, cfg.scale_factor_spatial,
                                               cfg.in_channels // cfg.patch ** 2)),),
        rules=vae_wan_map.RULES, ignore=lambda cfg: vae_wan_map.IGNORE, key_prefixes=lambda model_type: {},
        hf_config=vae_wan.diffusers_config, weights_file=DIFFUSERS_WEIGHTS),
    # tuna-2 checkpoints carry no config.json: they are converted by convert/tuna.py, loaded from ours.
    "tuna": Family(
        name="tuna", hf_model_types=(), config_cls=tuna.TunaConfig, config_from_hf=None, module=tuna.Tuna,
        example_inputs=lambda cfg: (tuna.model_inputs(cfg),), rules=tuna_map.RULES_SIGLIP, ignore=tuna_map.ignore,
        key_prefixes=lambda model_type: {}, hf_config=None),
}


def model_type_of(hf_cfg: Mapping[str, Any]) -> str | None:
  """config.json's `model_type` (transformers) or `_class_name` (diffusers)."""
  return hf_cfg.get("model_type") or hf_cfg.get("_class_name")


def family_for_model_type(model_type: str | None, where: str) -> Family:
  for fam in FAMILIES.values():
    if model_type in fam.hf_model_types:
      return fam
  supported = sorted(t for f in FAMILIES.values() for t in f.hf_model_types)
  raise ConversionError(f"{where}: unsupported model_type {model_type!r}; supported: {supported}")


def abstract_params(fam: Family, cfg: Any) -> dict:
  """Nested ShapeDtypeStructs of the model's params, without allocating them."""
  boxed = jax.eval_shape(fam.module(cfg).init, jax.random.key(0), *fam.example_inputs(cfg))["params"]
  # `.value`, not nn.meta.unbox: unboxing applies a sharding constraint, which fails on abstract
  # values inside jax.set_mesh
  return jax.tree.map(lambda b: b.value, boxed, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def _read_hf_config(src: str) -> dict[str, Any]:
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
  hf_cfg = _read_hf_config(src)
  fam = family_for_model_type(model_type_of(hf_cfg), os.path.join(src, "config.json"))
  cfg = fam.config_from_hf(hf_cfg)
  cfg = dataclasses.replace(cfg, param_dtype=param_dtype or _source_dtype(hf_cfg), **config_overrides)
  if getattr(cfg, "scan_layers", False):
    cfg = dataclasses.replace(cfg, scan_layers=False)  # conversion is always in the loop layout
  abstract = engine.flatten(abstract_params(fam, cfg))
  source = _renamed(sources.open_weights(src), fam.key_prefixes(model_type_of(hf_cfg)), fam.legacy_keys)
  flat = engine.convert(source, fam.rules, abstract, ignore=fam.ignore(cfg), where=src, place=place)
  return fam, cfg, engine.unflatten(flat)


def convert_to_orbax(src: str, dst: str, *, param_dtype: str | None = None, overwrite: bool = False) -> dict:
  """HF directory -> converted directory (Orbax params + unimm_config.json + tokenizer files)."""
  checkpoint.clean_partial(dst)  # first: a destination an interrupted run had moved aside comes back
  if os.path.exists(dst) and not overwrite:
    raise ConversionError(f"{dst}: destination exists (use --overwrite)")
  t0 = time.perf_counter()
  # Device arrays: Orbax writes them without another host copy (peak RSS ~ 1x the checkpoint).
  fam, cfg, params = convert_hf(src, param_dtype=param_dtype, place=jax.device_put)
  t1 = time.perf_counter()
  meta = {"family": fam.name, "config": cfg.to_dict(), "hf_config": _read_hf_config(src),
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
  fam = FAMILIES[meta["family"]]
  cfg = fam.config_cls.from_dict(meta["config"])
  params = checkpoint.restore(ckpt, abstract_params(fam, cfg))
  flat = {k: np.asarray(v) for k, v in engine.flatten(params).items()}
  tensors = engine.export(flat, fam.rules, where=ckpt)
  hf_cfg = meta.get("hf_config") or fam.hf_config(cfg)
  back = {new: old for old, new in fam.key_prefixes(model_type_of(hf_cfg)).items()}
  tensors = _renamed(sources.LazyTensors({k: (lambda v=v: v) for k, v in tensors.items()}, {}, {}), back)
  tensors = {k: load() for k, load in tensors.items()}
  with checkpoint.staged(dst, overwrite=overwrite) as tmp:
    save_safetensors(os.path.join(tmp, fam.weights_file), tensors, {"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf_cfg, f, indent=1)
    for n in TOKENIZER_FILES:
      if os.path.isfile(os.path.join(ckpt, n)):
        shutil.copy2(os.path.join(ckpt, n), os.path.join(tmp, n))
  return {"family": fam.name, "tensors": len(tensors)}
