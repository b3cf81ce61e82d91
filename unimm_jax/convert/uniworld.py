"""UniWorld-V1 release + FLUX.1-dev + SigLIP -> one converted directory (family "uniworld").

The release (`--src`) is a sharded save_pretrained directory; FLUX.1-dev's VAE, CLIP-L and T5-XXL and the SigLIP
tower come from their own directories. Every source is streamed (engine.convert_bundle reads one tensor at a
time: the 7B + 12B do not fit host memory twice). Layout of the destination:

  (params)           UniWorld: vlm, connectors, denoiser (FLUX), siglip, task_head (--task_head)
  vae/ t5/ clip/     FLUX.1-dev's VAE, text_encoder_2, text_encoder as their own converted checkpoints
  tokenizer_2/ tokenizer_clip/   their tokenizers; scheduler_config.json; the Qwen2.5-VL tokenizer and processor
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import jax

from unimm_jax import checkpoint
from unimm_jax.convert import engine, hf, sources
from unimm_jax.convert.errors import ConversionError
from unimm_jax.convert.maps import uniworld as uniworld_map
from unimm_jax.models import uniworld, vae_kl

VAE_DIR, T5_DIR, CLIP_DIR = "vae", "t5", "clip"
SCHEDULER_FILE = "scheduler_config.json"
PROCESSOR_FILES = ("preprocessor_config.json", "chat_template.json", "chat_template.jinja")
VARIANTS = ("v1",)


def _json(path: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    raise ConversionError(f"{path}: missing")
  with open(path) as f:
    return json.load(f)


def _has_weights(path: str | None) -> bool:
  return bool(path) and any(os.path.exists(os.path.join(path, n)) for n in sources.WEIGHT_FILES)


def _prefixed(src: sources.LazyTensors, prefix: str) -> sources.LazyTensors:
  return sources.LazyTensors({prefix + k: src[k] for k in src}, {prefix + k: src.shapes[k] for k in src},
                             {prefix + k: src.origin[k] for k in src})


def convert(src: str, *, siglip: str, flux: str, task_head: str | None = None, place=None
            ) -> tuple[uniworld.UniWorldConfig, dict, vae_kl.AutoencoderKLConfig, dict, dict[str, list[str]]]:
  """(config, UniWorld params, VAE config, VAE params, {part: the files it came from}).

  src: the release directory (its config.json, model*.safetensors); siglip: a SigLIP vision directory (config.json,
  weights unless src holds `siglip.*`); flux: a FLUX.1-dev directory (vae/config.json, vae weights unless src holds
  `vae.*`); task_head: task_head_final.pt.
  """
  config_dir = os.path.dirname(src) if os.path.isfile(src) else src
  source = sources.open_weights(src)
  head_width = None
  pieces = [source]
  if task_head:
    head = _prefixed(sources.open_weights(task_head), uniworld_map.TASK_HEAD)
    first = head.shapes.get(uniworld_map.TASK_HEAD + "0.weight")
    if first is None:
      raise ConversionError(f"{task_head}: no '0.weight'; is this UniWorld's task_head_final.pt? "
                            f"(keys: {sorted(head)[:6]})")
    head_width = first[0]
    pieces.append(head)
  for prefix, path in ((uniworld_map.SIGLIP, siglip), (uniworld_map.VAE, os.path.join(flux, "vae"))):
    inside = any(k.startswith(prefix) for k in source)
    if _has_weights(path):
      if inside:
        raise ConversionError(f"{src} holds {prefix}* tensors and {path} has weights too: pass one source")
      pieces.append(_prefixed(sources.open_weights(path), prefix))
    elif not inside:
      raise ConversionError(f"no {prefix}* tensors in {src} and no weights in {path}")
  merged = sources.merge(pieces)
  cfg = uniworld.config_from_hf(_json(os.path.join(config_dir, "config.json")),
                                _json(os.path.join(siglip, "config.json")), head_width)
  vae_cfg = vae_kl.config_from_diffusers(_json(os.path.join(flux, "vae", "config.json")))
  out = engine.convert_bundle(merged, uniworld_map.parts(cfg, vae_cfg), where=src, place=place)
  flat = dict(out[""])
  flat.update({"siglip/" + k: v for k, v in out[uniworld_map.SIGLIP].items()})
  if cfg.task_head:
    flat.update({"task_head/" + k: v for k, v in out[uniworld_map.TASK_HEAD].items()})
  report: dict[str, list[str]] = {}
  for key in merged:
    prefix = next((p for p in (uniworld_map.SIGLIP, uniworld_map.VAE, uniworld_map.TASK_HEAD) if key.startswith(p)),
                  "uniworld.")
    report.setdefault(prefix[:-1], [])
    if merged.origin[key] not in report[prefix[:-1]]:
      report[prefix[:-1]].append(merged.origin[key])
  return cfg, engine.unflatten(flat), vae_cfg, engine.unflatten(out[uniworld_map.VAE]), report


def save(dst: str, src: str, flux: str, cfg: uniworld.UniWorldConfig, params: dict, vae_cfg: Any, vae_params: dict,
         report: Mapping[str, Any], *, overwrite: bool = False) -> dict[str, Any]:
  """Writes the destination atomically (checkpoint.save): nothing is touched if any part fails."""
  config_dir = os.path.dirname(src) if os.path.isfile(src) else src
  extra = {n: os.path.join(config_dir, n) for n in (*hf.TOKENIZER_FILES, *PROCESSOR_FILES)
           if os.path.isfile(os.path.join(config_dir, n))}
  report = dict(report)
  scheduler = os.path.join(flux, "scheduler", SCHEDULER_FILE)
  if not os.path.isfile(scheduler):
    raise ConversionError(f"{scheduler}: missing (FLUX.1-dev's FlowMatchEulerDiscreteScheduler config)")
  extra[SCHEDULER_FILE] = scheduler
  with tempfile.TemporaryDirectory() as tmp:
    checkpoint.save(os.path.join(tmp, VAE_DIR), vae_params, {"family": "vae_kl", "config": vae_cfg.to_dict()})
    extra[VAE_DIR] = os.path.join(tmp, VAE_DIR)
    # the text encoders FLUX's conditioning needs (T5-XXL prompt embeddings, CLIP-L pooled vector)
    for name, sub, tok, tok_dst in ((T5_DIR, "text_encoder_2", "tokenizer_2", "tokenizer_t5"),
                                    (CLIP_DIR, "text_encoder", "tokenizer", "tokenizer_clip")):
      path = os.path.join(flux, sub)
      if not _has_weights(path):
        report[name] = []
        continue
      hf.convert_to_orbax(path, os.path.join(tmp, name))
      extra[name] = os.path.join(tmp, name)
      report[name] = [path]
      if os.path.isdir(os.path.join(flux, tok)):
        extra[tok_dst] = os.path.join(flux, tok)
    checkpoint.save(dst, params, {"family": "uniworld", "config": cfg.to_dict(), "sources": report},
                    extra_files=extra, overwrite=overwrite)
  return report


def convert_cli(variant: str, src: str | None, dst: str, parts: Mapping[str, str | None], overwrite: bool) -> dict:
  """`scripts/convert.py --uniworld v1 --src UNIWORLD_DIR --flux FLUX_DEV_DIR --siglip SIGLIP_DIR
  [--task_head task_head_final.pt] --dst OUT`."""
  checkpoint.clean_partial(dst)
  if variant not in VARIANTS:
    raise ConversionError(f"--uniworld {variant!r}: known releases {VARIANTS}")
  missing = [f"--{n}" for n, v in (("src", src), ("flux", parts.get("flux")), ("siglip", parts.get("siglip")))
             if not v]
  if missing:
    raise ConversionError(f"--uniworld needs {', '.join(missing)}")
  cfg, params, vae_cfg, vae_params, report = convert(src, siglip=parts["siglip"], flux=parts["flux"],
                                                     task_head=parts.get("task_head"), place=jax.device_put)
  report = save(dst, src, parts["flux"], cfg, params, vae_cfg, vae_params, report, overwrite=overwrite)
  return {"family": "uniworld", "variant": variant, "task_head": cfg.task_head, "sources": report}
