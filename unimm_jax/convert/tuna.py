"""TUNA checkpoints: the tuna-2 reference format -> ours, and a stage-1 model assembled from parts.

Reference checkpoint: one state dict (`model.safetensors`, or a `.pt` / `.pth` file) with the
reference's names (maps/tuna.py), including the frozen Wan 2.2 VAE as `vae.model.*` (original Wan
naming). Our converted directory holds the TUNA params (family "tuna") and, when present, the VAE as
its own converted checkpoint in `vae/`.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from unimm_jax import api, checkpoint, schema
from unimm_jax.convert import engine, hf, original, sources
from unimm_jax.convert.errors import ConversionError
from unimm_jax.convert.family import abstract_params
from unimm_jax.convert.maps import tuna as tuna_map
from unimm_jax.convert.maps import vae_wan as vae_wan_map
from unimm_jax.models import tuna, vae_wan

VAE_PREFIX = "vae.model."
VAE_DIR = "vae"


def convert_reference(weights: str, cfg: tuna.TunaConfig, vae_cfg: vae_wan.WanVAEConfig | None = None,
                      place=None) -> tuple[tuna.TunaConfig, dict, dict | None]:
  """Reference state dict -> (config with the checkpoint's vocabulary, TUNA params, VAE params or None).

  The vocabulary is read from the checkpoint (TUNA resizes Qwen's for its added tokens). The bundle holds
  the TUNA model and, for latent TUNA, its frozen Wan 2.2 VAE under `vae.model.*` in the original naming.
  """
  src = sources.open_weights(weights)
  cfg = with_checkpoint_vocab(cfg, src.shapes, weights)
  out = engine.convert_bundle(src, reference_parts(cfg, vae_cfg), where=weights, place=place)
  vae_params = out[VAE_PREFIX] and engine.unflatten(out[VAE_PREFIX])
  return cfg, engine.unflatten(out[""]), vae_params


def with_checkpoint_vocab(cfg: tuna.TunaConfig, shapes: Mapping[str, tuple[int, ...]], where: str) -> tuna.TunaConfig:
  """`cfg` with the vocabulary of a reference checkpoint ({name: shape}) -- TUNA resizes Qwen's for its tokens --
  and the options its keys show: `aspect_ratio_embed.*` (add_aspect_ratio_embeds), `shared_adaln.*` (share_adaln).
  A head width other than the variant's is not guessed: its keys then fail with their shapes."""
  emb = "tuna.model.embed_tokens.weight"
  if emb not in shapes:
    raise ConversionError(f"{where}: no {emb!r}; is this a tuna-2 checkpoint? (first keys: {list(shapes)[:5]})")
  head = dataclasses.replace(cfg.head, share_adaln="shared_adaln.1.weight" in shapes)
  return dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, vocab=shapes[emb][0]), head=head,
                             aspect_ratio_embeds="aspect_ratio_embed.mlp.0.weight" in shapes)


def reference_parts(cfg: tuna.TunaConfig, vae_cfg: vae_wan.WanVAEConfig | None = None) -> dict[str, engine.Part]:
  """The bundle of a reference checkpoint: the TUNA map at "", the original-Wan map of its frozen VAE (optional:
  pixel TUNAs have none) at `vae.model.`."""
  fam = tuna_map.FAMILY
  return {"": engine.Part(fam.rules(cfg), engine.flatten(abstract_params(fam, cfg)), fam.ignore(cfg)),
          VAE_PREFIX: vae_wan_map.original_part(vae_cfg or vae_wan.preset("wan2.2"), required=False)}


def init_from_parts(cfg: tuna.TunaConfig, *, llm: str, siglip: str | None = None, seed: int = 0) -> tuple[tuna.TunaConfig, dict]:
  """A stage-1 TUNA as the reference builds it: pretrained Qwen2.5 (vocabulary resized to cfg.llm.vocab,
  new rows = mean of the old ones, as transformers' resize_token_embeddings), the first layers of a
  pretrained SigLIP/SigLIP2 tower with a fresh patch embedding and position table (the reference keeps
  them random too: their shapes differ), everything else freshly initialised."""
  llm_loaded = api.load(llm)
  if llm_loaded.family != "qwen":
    raise ConversionError(f"{llm}: expected a Qwen2/2.5 LLM, got family {llm_loaded.family!r}")
  keep = ("dtype", "param_dtype", "scan_layers", "remat", "attention_impl", "vocab")
  theirs = {k: v for k, v in dataclasses.asdict(llm_loaded.config).items() if k not in keep}
  ours = {k: v for k, v in dataclasses.asdict(cfg.llm).items() if k not in keep}
  if theirs != ours:
    diff = {k: (theirs[k], ours.get(k)) for k in theirs if theirs[k] != ours.get(k)}
    raise ConversionError(f"{llm}: LLM config differs from the TUNA config's llm (checkpoint, config): {diff}")
  inputs = schema.example_inputs(cfg.token_features)
  params = jax.tree.map(np.asarray, dict(tuna.Tuna(cfg).init(jax.random.key(seed), inputs)["params"]))
  params = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, params,
                        is_leaf=lambda x: hasattr(x, "value"))
  llm_params = jax.tree.map(np.asarray, llm_loaded.params)
  for path in ("embed_tokens/embedding", "lm_head/kernel"):
    node = engine.flatten(llm_params).get(path)
    if node is None:
      continue
    axis = 0 if path.startswith("embed") else 1
    old = node.shape[axis]
    if old > cfg.llm.vocab:
      raise ConversionError(f"{llm}: vocabulary {old} is larger than the TUNA config's {cfg.llm.vocab}")
    mean = node.mean(axis=axis, keepdims=True)
    grown = np.concatenate([node, np.repeat(mean, cfg.llm.vocab - old, axis=axis)], axis=axis)
    llm_params = engine.unflatten({**engine.flatten(llm_params), path: grown})
  params["llm"] = llm_params
  if cfg.encoder == "siglip":
    if siglip is None:
      raise ConversionError("init_from_parts: the SigLIP encoder variant needs a --siglip directory")
    tower = api.load(siglip)
    if tower.family not in ("siglip", "siglip2"):
      raise ConversionError(f"{siglip}: expected a SigLIP / SigLIP2 vision tower, got family {tower.family!r}")
    t_cfg, mine = tower.config, cfg.siglip
    if (t_cfg.embed, t_cfg.mlp, t_cfg.heads) != (mine.embed, mine.mlp, mine.heads) or t_cfg.depth < mine.num_layers:
      raise ConversionError(f"{siglip}: tower (embed, mlp, heads, depth) {(t_cfg.embed, t_cfg.mlp, t_cfg.heads, t_cfg.depth)}"
                            f" cannot provide {(mine.embed, mine.mlp, mine.heads)} x {mine.num_layers} layers")
    for i in range(mine.num_layers):
      params["vision_model"][f"layers_{i}"] = jax.tree.map(np.asarray, tower.params[f"layers_{i}"])
  return cfg, params


def save(dst: str, cfg: tuna.TunaConfig, params: dict, *, vae_cfg: vae_wan.WanVAEConfig | None = None,
         vae_params: dict | None = None, tokenizer: str | None = None, overwrite: bool = False) -> None:
  """Writes a converted TUNA directory atomically (params, config, tokenizer files, vae/)."""
  extra: dict[str, str] = {}
  if tokenizer:
    extra.update({n: os.path.join(tokenizer, n) for n in hf.TOKENIZER_FILES if os.path.isfile(os.path.join(tokenizer, n))})
  with tempfile.TemporaryDirectory() as tmp:
    if vae_params is not None:
      checkpoint.save(os.path.join(tmp, VAE_DIR), vae_params, {"family": "vae_wan", "config": vae_cfg.to_dict()})
      extra[VAE_DIR] = os.path.join(tmp, VAE_DIR)
    checkpoint.save(dst, params, {"family": "tuna", "config": cfg.to_dict()}, extra_files=extra, overwrite=overwrite)


def load_vae(path: str) -> Any:
  """The VAE stored beside a converted TUNA (None for the pixel variants)."""
  vae_path = os.path.join(path, VAE_DIR)
  return api.load(vae_path) if os.path.isdir(vae_path) else None


def convert_cli(variant: str, src: str | None, dst: str, parts: Mapping[str, str | None], overwrite: bool) -> dict:
  """`scripts/convert.py --tuna VARIANT`: a reference checkpoint (--src [--tokenizer]) or a stage-1 model from
  parts (--llm [--siglip] [--vae]); latent TUNA needs its VAE (in the checkpoint's vae.* or --vae)."""
  checkpoint.clean_partial(dst)  # first: a destination an interrupted run had moved aside comes back
  try:
    cfg = tuna.variant(variant)
  except ValueError as e:
    raise ConversionError(f"--tuna: {e}") from None
  vae_cfg = vae_wan.preset("wan2.2") if cfg.space == "latent" else None
  vae_params = None
  if src:
    cfg, params, vae_params = convert_reference(src, cfg, vae_cfg, place=jax.device_put)
  elif parts.get("llm"):
    cfg, params = init_from_parts(cfg, llm=parts["llm"], siglip=parts.get("siglip"))
  else:
    raise ConversionError("--tuna needs --src (reference weights) or --llm [--siglip] [--vae] (parts)")
  vae = parts.get("vae")
  if vae and vae_params is None:
    if os.path.isdir(vae):
      _, vae_cfg, vae_params = hf.convert_hf(vae)
    else:  # the original Wan2.2_VAE.pth
      vae_params = original.convert_wan_vae(vae, vae_cfg)
  if cfg.space == "latent" and vae_params is None:
    raise ConversionError(f"TUNA {variant} generates VAE latents: pass --vae (or weights that include vae.*)")
  save(dst, cfg, params, vae_cfg=vae_cfg, vae_params=vae_params, tokenizer=parts.get("tokenizer") or parts.get("llm"),
       overwrite=overwrite)
  return {"family": "tuna", "variant": variant, "vocab": cfg.llm.vocab, "vae": vae_params is not None}
