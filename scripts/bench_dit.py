"""Diffusion transformer forward time on CPU, fp32: ours (JAX, jitted) vs diffusers (PyTorch) in the same run.

Full-width blocks at reduced depth, at the token counts of real image sizes; both sides hold the same random
weights (diffusers' model, converted with our converter). Reported: compile time (ours), the median of --iters
forwards per side (timed alternately), and ours / torch (< 1 is faster).

  python scripts/bench_dit.py                       # FLUX.1 width 3072, 1 double + 1 single block, 512^2
  python scripts/bench_dit.py --sizes 512 1024      # also 1024^2 (4096 image tokens: minutes on 2 cores)
  python scripts/bench_dit.py --tiny                # seconds; used by the smoke test
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import unimm_jax  # noqa: E402
from unimm_jax.models import flux  # noqa: E402


def _median_pair_s(ours, theirs, iters: int) -> tuple[float, float]:
  """Median seconds of each, timed alternately so a change of machine load hits both sides alike."""
  times: tuple[list[float], list[float]] = ([], [])
  for _ in range(iters):
    for fn, out in ((ours, times[0]), (theirs, times[1])):
      t0 = time.perf_counter()
      fn()
      out.append(time.perf_counter() - t0)
  return statistics.median(times[0]), statistics.median(times[1])


def _load(ref: torch.nn.Module):
  """The diffusers model as a user would load it: its directory through unimm_jax.load (our converter)."""
  with tempfile.TemporaryDirectory() as d:
    ref.save_pretrained(d)
    loaded = unimm_jax.load(d)
  return loaded.module, loaded.params


# --------------------------------------------------------------------------------------------------------------
# FLUX: FluxTransformer2DModel at FLUX.1 width (24 heads x 128), 512 T5 tokens, guidance embedding (dev).
# --------------------------------------------------------------------------------------------------------------

FLUX_FULL = dict(num_layers=1, num_single_layers=1)   # the other sizes are FLUX.1's (diffusers defaults)
FLUX_TINY = dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=4,
                 joint_attention_dim=32, pooled_projection_dim=24, axes_dims_rope=(4, 6, 6))


def flux_rows(sizes: list[int], iters: int, tiny: bool, text_tokens: int) -> list[dict]:
  """One row per image size: a forward of the transformer on size^2 / 256 image tokens + text_tokens."""
  torch.manual_seed(0)
  ref = diffusers.FluxTransformer2DModel(guidance_embeds=True, **(FLUX_TINY if tiny else FLUX_FULL)).eval()
  module, params = _load(ref)
  cfg = module.cfg
  forward = jax.jit(lambda p, *a: module.apply({"params": p}, *a))
  rng = np.random.default_rng(0)
  rows = []
  for size in sizes:
    h = w = size // 8                                    # FLUX VAE latent; tokens are its 2x2 patches
    x = rng.standard_normal((1, h * w // 4, cfg.in_channels)).astype(np.float32)
    ctx = rng.standard_normal((1, text_tokens, cfg.context_dim)).astype(np.float32)
    pooled = rng.standard_normal((1, cfg.pooled_dim)).astype(np.float32)
    t, g = np.array([0.5], np.float32), np.array([3.5], np.float32)
    iid, tid = flux.image_ids(h, w), flux.text_ids(text_tokens)
    args = [jnp.asarray(a) for a in (x, ctx, pooled, t, iid, tid, g)]
    t0 = time.perf_counter()
    jax.block_until_ready(forward(params, *args))
    compile_s = time.perf_counter() - t0
    targs = dict(hidden_states=torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(ctx),
                 pooled_projections=torch.from_numpy(pooled), timestep=torch.from_numpy(t),
                 img_ids=torch.from_numpy(iid), txt_ids=torch.from_numpy(tid), guidance=torch.from_numpy(g))
    with torch.no_grad():
      ref(**targs)   # warm-up
      ours_s, torch_s = _median_pair_s(lambda: jax.block_until_ready(forward(params, *args)), lambda: ref(**targs),
                                       iters)
    rows.append(dict(case=f"FLUX {size}^2 ({x.shape[1]}+{text_tokens} tok)", compile_s=compile_s, ours_s=ours_s,
                     torch_s=torch_s, ratio=ours_s / torch_s))
    _print(rows[-1])
  return rows


def _print(r: dict) -> None:
  print(f"{r['case']:32s} {r['compile_s']:10.2f} {r['ours_s']:9.3f} {r['torch_s']:9.3f} {r['ratio']:10.2f}", flush=True)


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tiny", action="store_true", help="tiny widths and sizes (smoke test)")
  parser.add_argument("--sizes", type=int, nargs="+", default=[512], help="image sides (pixels)")
  parser.add_argument("--text-tokens", type=int, default=512, help="FLUX text (T5) tokens")
  parser.add_argument("--iters", type=int, default=3)
  args = parser.parse_args(argv)
  if args.tiny:
    args.sizes, args.text_tokens, args.iters = [64], 8, 1
  print(f"{'case':32s} {'compile s':>10s} {'ours s':>9s} {'torch s':>9s} {'ours/torch':>10s}  "
        f"(torch threads {torch.get_num_threads()}, {jax.devices()[0].platform})")
  return {"rows": flux_rows(args.sizes, args.iters, args.tiny, args.text_tokens)}


if __name__ == "__main__":
  main()
