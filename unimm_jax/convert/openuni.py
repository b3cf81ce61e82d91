"""OpenUni releases -> a converted directory (family "openuni").

The released `.pth` (or `.safetensors`) is `OpenUniInternVL3SANAHF.state_dict()`, saved by DeepSpeed with
`exclude_frozen_parameters=True` (fixtures/openuni README): a pre-training checkpoint may hold only
`meta_queries`, `connector.*`, `projector.*`, a fine-tuning one also `transformer.*`. Every tensor it lacks is read
from the base repositories the original builds the model from (`--lmm` InternVL3, `--sana` SANA, `--vae` DC-AE),
under the prefix the model gives that part; a tensor in the release always wins. The sizes of those parts come
from their config.json when the directory has one (else from the variant).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping

from unimm_jax import checkpoint
from unimm_jax.convert import engine, hf, sources
from unimm_jax.convert.errors import ConversionError
from unimm_jax.convert.family import abstract_params
from unimm_jax.convert.maps import openuni as openuni_map
from unimm_jax.models import dc_ae, internvl, openuni, sana
from unimm_jax.models.openuni import OpenUniConfig

IMAGE_CONTEXT = "<IMG_CONTEXT>"
SUBFOLDERS = {"transformer": "transformer", "vae": "vae"}   # a diffusers pipeline root keeps them here


def component_dir(path: str, part: str) -> str:
  """A part's directory: the path itself, or its pipeline subfolder (SANA transformer/, DC-AE vae/)."""
  sub = SUBFOLDERS.get(part)
  if sub and os.path.isdir(os.path.join(path, sub)):
    return os.path.join(path, sub)
  return path


def image_token_id(tokenizer_dir: str) -> int | None:
  """The id of `<IMG_CONTEXT>` in a tokenizer.json's added tokens (None when the file or the token is absent)."""
  path = os.path.join(tokenizer_dir, "tokenizer.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    added = json.load(f).get("added_tokens", [])
  return next((t["id"] for t in added if t.get("content") == IMAGE_CONTEXT), None)


def with_parts(cfg: OpenUniConfig, parts: Mapping[str, str | None]) -> OpenUniConfig:
  """`cfg` with the sizes of the base directories that have a config.json (and the tokenizer's image token)."""
  kw = {}
  if parts.get("lmm") and os.path.isfile(os.path.join(parts["lmm"], "config.json")):
    lmm = internvl.config_from_hf(hf.read_hf_config(parts["lmm"]))
    token = image_token_id(parts["lmm"])
    kw["lmm"] = lmm if token is None else dataclasses.replace(lmm, image_token_id=token)
  for part, from_cfg in (("sana", sana.config_from_diffusers), ("vae", dc_ae.config_from_diffusers)):
    if parts.get(part):
      d = component_dir(parts[part], "transformer" if part == "sana" else "vae")
      if os.path.isfile(os.path.join(d, "config.json")):
        kw["transformer" if part == "sana" else "vae"] = from_cfg(hf.read_hf_config(d))
  return dataclasses.replace(cfg, **kw) if kw else cfg


def with_release_shapes(cfg: OpenUniConfig, shapes: Mapping[str, tuple[int, ...]], where: str) -> OpenUniConfig:
  """`cfg` with the query count and connector sizes the release's trained tensors have (the head count is not in
  the shapes: it stays the variant's)."""
  if "meta_queries" not in shapes:
    raise ConversionError(f"{where}: no 'meta_queries' tensor; is this an OpenUni checkpoint? "
                          f"(first keys: {list(shapes)[:5]})")
  layers = {int(k.split(".")[2]) for k in shapes if k.startswith("connector.layers.")}
  fc1 = shapes.get("connector.layers.0.mlp.fc1.weight")
  if not layers or fc1 is None:
    raise ConversionError(f"{where}: no 'connector.layers.0.mlp.fc1.weight'; the connector is missing")
  conn = dataclasses.replace(cfg.connector, embed=fc1[1], mlp=fc1[0], depth=max(layers) + 1)
  try:
    return dataclasses.replace(cfg, num_queries=shapes["meta_queries"][0], connector=conn)
  except ValueError as e:
    raise ConversionError(f"{where}: {e}") from None


def release_source(src: str, parts: Mapping[str, str | None]) -> tuple[sources.LazyTensors, dict[str, int]]:
  """The release's tensors, plus every tensor of the base directories it lacks (prefixed as the model names
  them) -> (one source, how many tensors each of release / lmm / sana / vae gave)."""
  release = sources.open_weights(src)
  loaders, shapes, origin = dict(release.items()), dict(release.shapes), dict(release.origin)
  counts = {"release": len(loaders)}
  for flag, part in (("lmm", "lmm"), ("sana", "transformer"), ("vae", "vae")):
    counts[flag] = 0
    if not parts.get(flag):
      continue
    base = sources.open_weights(component_dir(parts[flag], part))
    prefix = openuni_map.PREFIXES[part]
    for k in base:
      if prefix + k not in loaders:
        loaders[prefix + k], shapes[prefix + k], origin[prefix + k] = base[k], base.shapes[k], base.origin[k]
        counts[flag] += 1
  return sources.LazyTensors(loaders, shapes, origin), counts


def convert_release(src: str, cfg: OpenUniConfig, parts: Mapping[str, str | None] = {}, *, place=None
                    ) -> tuple[dict, dict[str, int]]:
  """Release file (+ base directories) -> (nested params of `cfg`, tensors per source). Every problem (a missing
  part, a shape that does not fit, naming the key and both shapes) is raised together."""
  source, counts = release_source(src, parts)
  fam = openuni_map.FAMILY
  try:
    flat = engine.convert(source, fam.rules(cfg), engine.flatten(abstract_params(fam, cfg)), ignore=fam.ignore(cfg),
                          where=src, place=place)
  except ConversionError as e:
    missing = [f"--{flag}" for flag, part in (("lmm", "lmm"), ("sana", "transformer"), ("vae", "vae"))
               if not parts.get(flag) and not any(k.startswith(openuni_map.PREFIXES[part]) for k in source)]
    hint = f"\n  (the release holds no {', '.join(missing)} tensors: pass those directories)" if missing else ""
    raise ConversionError(f"{e}{hint}") from None
  return engine.unflatten(flat), counts


def save(dst: str, cfg: OpenUniConfig, params: dict, *, tokenizer: str | None = None, overwrite: bool = False) -> None:
  extra = {}
  if tokenizer:
    extra = {n: os.path.join(tokenizer, n) for n in hf.TOKENIZER_FILES if os.path.isfile(os.path.join(tokenizer, n))}
  checkpoint.save(dst, params, {"family": "openuni", "config": cfg.to_dict()}, extra_files=extra, overwrite=overwrite)


def convert_cli(variant: str, src: str | None, dst: str, parts: Mapping[str, str | None], overwrite: bool) -> dict:
  """`scripts/convert.py --openuni b512|l512|l1024 --src RELEASE --lmm DIR --sana DIR --vae DIR --dst OUT`; the
  destination is written only once everything converted (checkpoint.save is atomic)."""
  checkpoint.clean_partial(dst)
  if not src:
    raise ConversionError("--openuni needs --src (the released .pth / .safetensors)")
  if os.path.exists(dst) and not overwrite:
    raise ConversionError(f"{dst}: destination exists (use --overwrite)")
  aliases = {"b": "b512"}
  try:
    cfg = openuni.variant(aliases.get(variant, variant))
  except ValueError as e:
    raise ConversionError(f"--openuni: {e}") from None
  cfg = with_release_shapes(with_parts(cfg, parts), sources.open_weights(src).shapes, src)
  params, counts = convert_release(src, cfg, parts)
  save(dst, cfg, params, tokenizer=parts.get("lmm"), overwrite=overwrite)
  return {"family": "openuni", "variant": variant, "tensors_from": counts}
