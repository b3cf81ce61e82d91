"""Original-release checkpoints that ship as a bare state dict (no config.json) -> our Orbax checkpoints.

Wan VAE: `Wan2.2_VAE.pth` (Wan-AI/Wan2.2-TI2V-5B; the file TUNA loads) in the naming of
Wan-Video/Wan2.2 wan/modules/vae2_2.py, and `Wan2.1_VAE.pth` (Wan-AI/Wan2.1-*) in that of
Wan-Video/Wan2.1 wan/modules/vae.py, read through `maps.vae_wan.original_part` (the one map of the original
naming, also used for TUNA's bundled `vae.model.*`). The architecture is not in the file, so it comes from a
`vae_wan` preset or config.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

from unimm_jax import checkpoint
from unimm_jax.convert import engine, sources
from unimm_jax.convert.errors import ConversionError
from unimm_jax.convert.maps import vae_wan as vae_wan_map
from unimm_jax.models import vae_wan


def convert_wan_vae(src: str, cfg: vae_wan.WanVAEConfig, place=None) -> dict:
  """Original Wan 2.1 / 2.2 VAE state dict (.pth / .safetensors) -> nested numpy params for `cfg`."""
  flat = engine.convert_bundle(sources.open_weights(src), {"": vae_wan_map.original_part(cfg)}, where=src,
                               place=place)[""]
  return engine.unflatten(flat)


def convert_wan_vae_to_orbax(src: str, dst: str, cfg: vae_wan.WanVAEConfig | None = None, *,
                             overwrite: bool = False) -> dict[str, Any]:
  """Original Wan VAE file -> converted directory that `unimm_jax.load` opens (default preset: wan2.2;
  pass `vae_wan.preset("wan2.1")` for `Wan2.1_VAE.pth`)."""
  checkpoint.clean_partial(dst)
  if os.path.exists(dst) and not overwrite:
    raise ConversionError(f"{dst}: destination exists (use --overwrite)")
  cfg = cfg or vae_wan.preset("wan2.2")
  t0 = time.perf_counter()
  params = convert_wan_vae(src, cfg)
  t1 = time.perf_counter()
  meta = {"family": "vae_wan", "config": cfg.to_dict(), "hf_config": vae_wan.diffusers_config(cfg),
          "source": os.path.abspath(src)}
  checkpoint.save(dst, params, meta, overwrite=overwrite)
  flat = engine.flatten(params)
  return {"family": "vae_wan", "tensors": len(flat), "bytes": sum(v.nbytes for v in flat.values()),
          "convert_s": t1 - t0, "save_s": time.perf_counter() - t1}


def convert_wan_vae_cli(variant: str, src: str, dst: str, parts: Mapping[str, str | None], overwrite: bool) -> dict:
  """`scripts/convert.py --wan_vae PRESET --src Wan2.x_VAE.pth --dst OUT`."""
  del parts
  if not src:
    raise ConversionError("--wan_vae needs --src (the Wan2.x_VAE.pth release file)")
  try:
    cfg = vae_wan.preset(variant)
  except ValueError as e:
    raise ConversionError(f"--wan_vae: {e}") from None
  return convert_wan_vae_to_orbax(src, dst, cfg, overwrite=overwrite)
