"""VAE encode / decode time on CPU, ours (JAX, jitted) vs diffusers (PyTorch) in the same run, and
compiled peak memory of tiled vs untiled decode.

Both sides get the same random weights (diffusers' init, converted with our converter). Reported:
compile time (ours), then the median of --iters timed calls per side, and ours / torch (< 1 is faster).
Memory: XLA's compiled memory analysis of decode vs tiled_decode of one image of --mem-size pixels:
temporaries (activations; what tiling shrinks) and the total with arguments (params) and outputs.

  python scripts/bench_vae.py                 # SD/SDXL-layout KL on 256^2, Wan 2.2 on a 5 x 256^2 clip
  python scripts/bench_vae.py --tiny          # seconds; used by the smoke test
  python scripts/bench_vae.py --only memory   # just the compiled memory comparison
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from unimm_jax import benchmark, registry
from unimm_jax.convert.family import abstract_params
from unimm_jax.convert import engine  # noqa: E402

TINY_KL = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
               up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, layers_per_block=1, sample_size=32)
FULL_KL = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, sample_size=512)
TINY_WAN = dict(base_dim=8, decoder_base_dim=12, z_dim=6, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
                patch_size=2, scale_factor_spatial=16, latents_mean=[0.0] * 6, latents_std=[1.0] * 6)
FULL_WAN = dict(base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, in_channels=12, out_channels=12,
                patch_size=2, scale_factor_spatial=16, latents_mean=[0.0] * 48, latents_std=[1.0] * 48)


def _convert(ref: torch.nn.Module, family: str):
  fam = registry.family(family)
  cfg = fam.config_from_hf(dict(ref.config))
  abstract = engine.flatten(abstract_params(fam, cfg))
  src = {k: (lambda v=v: v.detach().numpy()) for k, v in ref.state_dict().items()}
  params = jax.tree.map(jnp.asarray, engine.unflatten(engine.convert(src, fam.rules(cfg), abstract)))
  return fam.module(cfg), params


def bench_pair(name: str, ref, module, params, x: np.ndarray, iters: int) -> list[dict]:
  """Encode x and decode its posterior mean on both sides; x is channels-last."""
  xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))
  enc = jax.jit(lambda p, x: module.apply({"params": p}, x, method="encode").mean)
  dec = jax.jit(lambda p, z: module.apply({"params": p}, z, method="decode"))
  t0 = time.perf_counter()
  z = jax.block_until_ready(enc(params, x))
  enc_compile = time.perf_counter() - t0
  t0 = time.perf_counter()
  jax.block_until_ready(dec(params, z))
  dec_compile = time.perf_counter() - t0
  with torch.no_grad():
    zt = ref.encode(xt).latent_dist.mean     # warm-up
    ref.decode(zt)
    rows = [
        dict(case=name, op="encode", compile_s=enc_compile,
             ours_s=benchmark.median_seconds(lambda: jax.block_until_ready(enc(params, x)), iters)[0],
             torch_s=benchmark.median_seconds(lambda: ref.encode(xt), iters)[0]),
        dict(case=name, op="decode", compile_s=dec_compile,
             ours_s=benchmark.median_seconds(lambda: jax.block_until_ready(dec(params, z)), iters)[0],
             torch_s=benchmark.median_seconds(lambda: ref.decode(zt), iters)[0]),
    ]
  for r in rows:
    r["ratio"] = r["ours_s"] / r["torch_s"]
  return rows


def decode_memory(module, params, latent_hw: tuple[int, int], latent_c: int, video: bool) -> dict:
  """XLA-compiled bytes of decode vs tiled_decode: temporaries (activations) and the total with
  arguments (the params, the same for both) and outputs."""
  shape = (1, 1, *latent_hw, latent_c) if video else (1, *latent_hw, latent_c)
  z = jax.ShapeDtypeStruct(shape, jnp.float32)
  out = {}
  for method in ("decode", "tiled_decode"):
    fn = jax.jit(lambda p, z, m=method: module.apply({"params": p}, z, method=m))
    mem = fn.lower(params, z).compile().memory_analysis()
    out[method] = {"temp": mem.temp_size_in_bytes,
                   "total": mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes}
  return out


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tiny", action="store_true", help="tiny widths and sizes (smoke test)")
  parser.add_argument("--size", type=int, default=256, help="image side (pixels)")
  parser.add_argument("--clip-size", type=int, default=256, help="video side (pixels)")
  parser.add_argument("--frames", type=int, default=5, help="video frames (1 + 4k)")
  parser.add_argument("--mem-size", type=int, default=1024, help="image side for the memory comparison")
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--only", choices=("all", "timing", "memory"), default="all")
  args = parser.parse_args(argv)
  if args.tiny:
    args.size, args.clip_size, args.frames, args.mem_size, args.iters = 32, 32, 5, 128, 1
  torch.manual_seed(0)
  kl_ref = diffusers.AutoencoderKL(**(TINY_KL if args.tiny else FULL_KL)).eval()
  wan_ref = diffusers.AutoencoderKLWan(**(TINY_WAN if args.tiny else FULL_WAN)).eval()
  kl, kl_params = _convert(kl_ref, "vae_kl")
  wan, wan_params = _convert(wan_ref, "vae_wan")
  if args.tiny:  # tiles of 64 px (32 patchified) every 48, so the 128-px memory case is tiled
    wan = wan.clone(cfg=dataclasses.replace(wan.cfg, tile_sample_min_size=32, tile_sample_stride=24))
  rng = np.random.default_rng(0)
  image = rng.uniform(-1, 1, (1, args.size, args.size, 3)).astype(np.float32)
  clip = rng.uniform(-1, 1, (1, args.frames, args.clip_size, args.clip_size, 3)).astype(np.float32)
  rows, mem = [], {}
  if args.only != "memory":
    rows = bench_pair(f"KL {args.size}^2 image", kl_ref, kl, kl_params, image, args.iters)
    rows += bench_pair(f"Wan2.2 {args.frames}x{args.clip_size}^2 clip", wan_ref, wan, wan_params, clip, args.iters)
    print(f"{'case':28s} {'op':7s} {'compile s':>10s} {'ours s':>9s} {'torch s':>9s} {'ours/torch':>10s}")
    for r in rows:
      print(f"{r['case']:28s} {r['op']:7s} {r['compile_s']:10.2f} {r['ours_s']:9.3f} {r['torch_s']:9.3f} "
            f"{r['ratio']:10.2f}", flush=True)
  if args.only == "timing":
    return {"rows": rows, "memory": mem}
  m = args.mem_size
  mem = {f"KL {m}^2 (tile {kl.cfg.sample_size})": decode_memory(
             kl, kl_params, (m // kl.cfg.spatial_downscale,) * 2, kl.cfg.latent_channels, video=False),
         f"Wan2.2 {m}^2 frame (tile {wan.cfg.tile_sample_min_size * wan.cfg.patch})": decode_memory(
             wan, wan_params, (m // wan.cfg.spatial_downscale,) * 2, wan.cfg.latent_channels, video=True)}
  print(f"\n{'decode memory (XLA, MiB)':34s} {'temp untiled':>12s} {'temp tiled':>10s} {'ratio':>6s} "
        f"{'total untiled':>13s} {'total tiled':>11s}")
  for case, d in mem.items():
    u, t = d["decode"], d["tiled_decode"]
    print(f"{case:34s} {u['temp'] / 2**20:12.1f} {t['temp'] / 2**20:10.1f} {t['temp'] / u['temp']:6.2f} "
          f"{u['total'] / 2**20:13.1f} {t['total'] / 2**20:11.1f}")
  return {"rows": rows, "memory": mem}


if __name__ == "__main__":
  main()
