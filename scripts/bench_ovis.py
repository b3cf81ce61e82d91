"""Ovis-U1 decoder speed: one text-to-image step of the Yak MMDiT-X (models/yak.py) against diffusers'
FluxTransformer2DModel of the same width, depth and token count, measured in the same run.

The original is not pip-installable, so the cost anchor is FLUX: the Yak double block is FLUX's plus a third
modulation and an image-only self-attention, and the Yak adds the 2-block token refiner on the condition. Both
sides run at the release's width (1536 = 12 heads x 128, RoPE axes 16 / 56 / 56, condition width 4096) and a
reduced depth with the release's 1 : 2 ratio of double to single blocks (6 + 12), at the token count of a 512^2
image (64x64 SDXL latent -> 1024 tokens after 2x2 packing) plus the text condition (the release's t2i prompt: the
256 visual tokens of its 448^2 white image, 2 indicators and ~40 text tokens; --text-tokens). Rows: the Yak (ours),
our JAX FLUX converted from the anchor's weights (the same stack without the extra branch: what the branch costs in
one framework), diffusers' FLUX (PyTorch, the anchor). Each: the median of --iters warm calls (wall and process CPU
time: on a shared machine wall time mostly measures the neighbours), and the matmul + attention FLOPs of one
forward (YakConfig.forward_flops), so that the measured ratio can be read against the work ratio.

  python scripts/bench_ovis.py                      # 512^2, 1 double + 2 single blocks, fp32, 5 iterations
  python scripts/bench_ovis.py --double 2 --single 4 --image 1024
  python scripts/bench_ovis.py --tiny               # seconds (tiny widths); the smoke test
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import diffusers
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_vae import _convert  # noqa: E402  (diffusers weights through our converter)

from unimm_jax import benchmark
from unimm_jax.models import flux, yak  # noqa: E402

TINY = dict(hidden=64, heads=2, context_dim=128, vec_in_dim=64, axes_dims=(8, 12, 12))


def yak_config(args: argparse.Namespace) -> yak.YakConfig:
  kw = TINY if args.tiny else {}
  return yak.YakConfig(**{**kw, "depth": args.double, "single_depth": args.single})


def _random_params(boxed, seed: int = 0):
  """Host-drawn values for every leaf (jitted init of a 1536-wide model compiles longer than it runs; the
  released zero-init modulations would make the blocks trivial)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray((rng.standard_normal(x.shape) * (0.5 / np.sqrt(x.shape[0])
                                             if x.ndim > 1 else 0.1)).astype(x.dtype)), nn.meta.unbox(boxed))


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tiny", action="store_true", help="tiny widths, 64^2 image, 1 iteration (smoke test)")
  parser.add_argument("--image", type=int, default=512, help="image side in pixels (8x VAE, 2x2 packing)")
  parser.add_argument("--double", type=int, default=1, help="double blocks (the release: 6)")
  parser.add_argument("--single", type=int, default=2, help="single blocks (the release: 12)")
  parser.add_argument("--text-tokens", type=int, default=300, help="condition tokens")
  parser.add_argument("--iters", type=int, default=5)
  args = parser.parse_args(argv)
  if args.tiny:
    args.image, args.text_tokens, args.iters = 64, 8, 1
  if args.image % 16:
    raise SystemExit(f"--image {args.image} must be a multiple of 16 (8x VAE, 2x2 packing)")
  cfg = yak_config(args)
  latent = args.image // 8
  n, t = (latent // 2) ** 2, args.text_tokens
  print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), fp32, width {cfg.hidden} ({cfg.heads} x {cfg.head_dim}), "
        f"{cfg.depth} double + {cfg.single_depth} single blocks, {n} image + {t} text tokens", flush=True)
  rng = np.random.default_rng(0)
  img = rng.standard_normal((1, n, cfg.in_channels)).astype(np.float32)
  txt = rng.standard_normal((1, t, cfg.context_dim)).astype(np.float32)
  ts = np.full((1,), 0.7, np.float32)
  ids = flux.image_ids(latent, latent)   # latent rows / columns -> ids of the 2x2-packed tokens

  model = yak.YakTransformer(cfg)
  ex = (jnp.zeros((1, 1, cfg.in_channels)), jnp.zeros((1, 3)), jnp.zeros((1, 1, cfg.context_dim)), jnp.zeros((1,)))
  params = _random_params(jax.eval_shape(model.init, jax.random.key(0), *ex)["params"])
  yak_fwd = jax.jit(lambda p, *a: model.apply({"params": p}, *a))

  torch.manual_seed(0)
  ref = diffusers.FluxTransformer2DModel(
      in_channels=cfg.in_channels, num_layers=cfg.depth, num_single_layers=cfg.single_depth,
      attention_head_dim=cfg.head_dim, num_attention_heads=cfg.heads, joint_attention_dim=cfg.context_dim,
      pooled_projection_dim=cfg.hidden, axes_dims_rope=tuple(cfg.axes_dims), guidance_embeds=False).eval()
  fmodule, fparams = _convert(ref, "flux")
  pooled = rng.standard_normal((1, cfg.hidden)).astype(np.float32)   # FLUX's CLIP input, where the Yak has its CLS
  tid = flux.text_ids(t)
  flux_fwd = jax.jit(lambda p, *a: fmodule.apply({"params": p}, *a))
  targs = {k: torch.from_numpy(v) for k, v in dict(hidden_states=img, encoder_hidden_states=txt,
                                                   pooled_projections=pooled, timestep=ts, img_ids=ids,
                                                   txt_ids=tid).items()}

  def run_torch():
    with torch.no_grad():
      return ref(**targs).sample

  sides = {
      "yak (ours, jax)": (lambda: jax.block_until_ready(yak_fwd(params, img, ids, txt, ts)), True),
      "flux (ours, jax)": (lambda: jax.block_until_ready(flux_fwd(fparams, img, txt, pooled, ts, ids, tid)), False),
      "flux (diffusers, torch)": (run_torch, False),
  }
  rows = []
  for name, (fn, extra) in sides.items():
    t0 = time.perf_counter()
    fn()                                    # compile (jax) / warm-up (torch allocator, oneDNN primitives)
    first = time.perf_counter() - t0
    wall, cpu = benchmark.median_seconds(fn, args.iters)
    rows.append(dict(side=name, first_s=first, wall_s=wall, cpu_s=cpu,
                     gflop=cfg.forward_flops(n, t, refiner=extra, image_attention=extra) / 1e9))
  anchor, ours_flux, ours = rows[2], rows[1], rows[0]
  # the anchor and our FLUX are one computation (same weights through our converter): a wrong conversion would
  # time something else
  got, want = np.asarray(flux_fwd(fparams, img, txt, pooled, ts, ids, tid)), run_torch().numpy()
  flux_diff = float(np.max(np.abs(got - want)))
  print(f"our FLUX vs diffusers' FLUX: max|diff| {flux_diff:.2e} (max|out| {float(np.max(np.abs(want))):.2f})")
  print(f"{'side':26s} {'1st call s':>10s} {'wall s':>8s} {'cpu s':>8s} {'GFLOP':>8s} {'GFLOP/s':>8s}")
  for r in rows:
    print(f"{r['side']:26s} {r['first_s']:10.2f} {r['wall_s']:8.3f} {r['cpu_s']:8.3f} {r['gflop']:8.1f} "
          f"{r['gflop'] / r['wall_s']:8.1f}")
  ratios = dict(wall=ours["wall_s"] / anchor["wall_s"], cpu=ours["cpu_s"] / anchor["cpu_s"],
                flops=ours["gflop"] / anchor["gflop"], same_framework=ours["wall_s"] / ours_flux["wall_s"])
  print(f"ours / anchor: wall {ratios['wall']:.2f}, cpu {ratios['cpu']:.2f} (work ratio {ratios['flops']:.2f}); "
        f"yak / flux in jax: {ratios['same_framework']:.2f}")
  return {"rows": rows, "ratios": ratios, "flux_max_diff": flux_diff}


if __name__ == "__main__":
  main()
