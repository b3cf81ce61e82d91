"""Ming-Lite-Uni: the released directory -> ours.

Ours: the MLLM side (family "ming": ViT, LLM, connector, projections, queries, the SANA-side MLP) at the top, the
SANA DiT in `transformer/` and the DC-AE in `vae/` as their own converted checkpoints, `scheduler/` and the
tokenizer files copied.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Mapping

import jax

from unimm_jax import checkpoint
from unimm_jax.convert import engine, hf, sources
from unimm_jax.convert.errors import ConversionError
from unimm_jax.convert.family import abstract_params
from unimm_jax.convert.maps import ming as ming_map
from unimm_jax.models import ming, qwen, qwen_vit

DIT_DIR, VAE_DIR, SCHEDULER_DIR = "transformer", "vae", "scheduler"
LLM_DIR = "qwen2_5_llm"


def _part(src: str, name: str) -> str:
  path = os.path.join(src, name)
  if not os.path.isdir(path):
    raise ConversionError(f"{src}: the Ming-Lite-Uni part {name}/ is missing (a release holds "
                          f"{', '.join(ming_map.PARTS + (DIT_DIR, VAE_DIR, SCHEDULER_DIR))})")
  return path


def _json(path: str) -> dict:
  if not os.path.isfile(path):
    raise ConversionError(f"{path}: missing")
  with open(path) as f:
    return json.load(f)


def config_from_release(src: str) -> ming.MingConfig:
  """The parts' config.json files (and the SANA-side MLP's shapes in mlp/) -> MingConfig."""
  vision = qwen_vit.config_from_hf(_json(os.path.join(_part(src, "qwen2_5_vit"), "config.json")))
  # the reference hard-codes the M-RoPE sections, whatever the config says
  text = dataclasses.replace(qwen.config_from_hf(_json(os.path.join(_part(src, LLM_DIR), "config.json"))),
                             mrope_sections=ming.MROPE_SECTIONS)
  if text.head_dim != 128:
    raise ConversionError(f"{src}/{LLM_DIR}/config.json: head_dim {text.head_dim}; the fixed M-RoPE sections "
                          f"{ming.MROPE_SECTIONS} need 128")
  connector = qwen.config_from_hf(_json(os.path.join(_part(src, "connector"), "config.json")))
  mlp = sources.open_weights(_part(src, "mlp"))
  shapes = mlp.shapes
  for key in ("mlp.fc1.weight", "mlp.fc2.weight"):
    if key not in shapes:
      raise ConversionError(f"{src}/mlp: no {key!r} (the SANA-side MLP); first keys: {list(shapes)[:8]}")
  scales = sorted(int(k.rsplit(".", 1)[1].split("x")[0]) for k in shapes if k.startswith("query_tokens_dict."))
  if not scales:
    raise ConversionError(f"{src}/mlp: no query_tokens_dict.<s>x<s> tensors")
  ids = token_ids(os.path.join(src, LLM_DIR))
  return ming.MingConfig(vision=vision, text=text, connector=connector, mlp_hidden=shapes["mlp.fc1.weight"][0],
                         caption_channels=shapes["mlp.fc2.weight"][0], scales=tuple(scales),
                         tokens_per_second=float(_json(os.path.join(src, "qwen2_5_vit", "config.json")).get(
                             "tokens_per_second", 2.0)), **ids)


def token_ids(tokenizer_dir: str) -> dict[str, int]:
  """Ids of Ming's special tokens from the tokenizer (the reference adds them at load time when absent)."""
  import transformers
  tokenizer = with_ming_tokens(transformers.AutoTokenizer.from_pretrained(tokenizer_dir))
  return {field: tokenizer.convert_tokens_to_ids(token)
          for field, token in (("image_token_id", "<imagePatch>"), ("image_start_token_id", "<image>"),
                               ("image_end_token_id", "</image>"), ("eos_token_id", "<|im_end|>"))}


# process.py: the tokens the reference adds (special) when it loads the tokenizer, in this order
ADDED_TOKENS = ("[item]", "<html>", "</html>", "<body>", "</body>", "<table>", "</table>", "<tr>", "</tr>", "<td>",
                "</td>", "<think>", "</think>", "<answer>", "</answer>", "<imagePatch>", "<image>", "</image>",
                "<video>", "</video>", "<gen_imagePatch>", "<gen_image>", "</gen_image>", "<imageHere>",
                "<end_of_chunk>", "<end_of_audio>", "<audioPatch>", "<audio>", "</audio>", "<gen_audioPatch>",
                "<gen_audio>", "</gen_audio>", "<audioHere>", "<framePatch>")


def with_ming_tokens(tokenizer):
  """The tokenizer as the reference uses it: ADDED_TOKENS appended as special tokens (those already there keep
  their ids)."""
  tokenizer.add_tokens(list(ADDED_TOKENS), special_tokens=True)
  return tokenizer


def release_source(src: str) -> sources.LazyTensors:
  """The four MLLM-side parts' tensors under their directory names (`qwen2_5_vit.blocks.0...`)."""
  loaders, shapes, origin = {}, {}, {}
  for name in ming_map.PARTS:
    part = sources.open_weights(_part(src, name))
    for k in part:
      loaders[f"{name}.{k}"], shapes[f"{name}.{k}"], origin[f"{name}.{k}"] = part[k], part.shapes[k], part.origin[k]
  return sources.LazyTensors(loaders, shapes, origin)


def convert_release(src: str, place=None) -> tuple[ming.MingConfig, dict]:
  cfg = config_from_release(src)
  abstract = engine.flatten(abstract_params(ming_map.FAMILY, cfg))
  flat = engine.convert(release_source(src), ming_map.RULES, abstract, ignore=ming_map.IGNORE, where=src, place=place)
  return cfg, engine.unflatten(flat)


def convert_cli(variant: str, src: str | None, dst: str, parts: Mapping[str, str | None], overwrite: bool) -> dict:
  """`scripts/convert.py --ming RELEASE_DIR --dst OUT` (or `--ming RELEASE_DIR --src RELEASE_DIR`)."""
  del parts
  if src and os.path.abspath(src) != os.path.abspath(variant):
    raise ConversionError(f"--ming {variant} and --src {src}: name the release directory once (--ming DIR)")
  src = variant
  if not dst:
    raise ConversionError("--ming needs --dst")
  checkpoint.clean_partial(dst)  # first: a destination an interrupted run had moved aside comes back
  cfg, params = convert_release(src, place=jax.device_put)
  dit_dir, vae_dir = _part(src, DIT_DIR), _part(src, VAE_DIR)
  sched = os.path.join(_part(src, SCHEDULER_DIR), "scheduler_config.json")
  _json(sched)
  llm = os.path.join(src, LLM_DIR)
  extra = {n: os.path.join(llm, n) for n in hf.TOKENIZER_FILES if os.path.isfile(os.path.join(llm, n))}
  with tempfile.TemporaryDirectory() as tmp:
    for name, part in ((DIT_DIR, dit_dir), (VAE_DIR, vae_dir)):
      fam, part_cfg, part_params = hf.convert_hf(part)
      checkpoint.save(os.path.join(tmp, name), part_params, {"family": fam.name, "config": part_cfg.to_dict()})
      extra[name] = os.path.join(tmp, name)
    extra[SCHEDULER_DIR] = os.path.dirname(sched)
    checkpoint.save(dst, params, {"family": "ming", "config": cfg.to_dict()}, extra_files=extra, overwrite=overwrite)
  return {"family": "ming", "scales": list(cfg.scales), "connector_embed": cfg.connector.embed,
          "caption_channels": cfg.caption_channels}
