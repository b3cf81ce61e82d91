"""Diffusion-transformer and autoencoder speed on CPU (fp32), ours (JAX, jitted) vs diffusers (PyTorch) in one run.

Each case of CASES builds both sides with the same random weights (diffusers' init, converted by our converter)
and reports: compile time (ours), the median of --iters timed calls per side, and ours / torch (< 1: ours is
faster), both in wall time and in process CPU time (all threads): on a shared machine wall time mostly measures
the neighbours, CPU time the work each side does. Transformers run at full block width and reduced depth (SANA:
--depth blocks; FLUX: 1 double + 1 single block, --text-tokens T5 tokens) at the token counts of 512^2 and 1024^2
images; memory: XLA's compiled memory analysis of the DC-AE decode of one --mem-size image, untiled vs
tiled (temporaries = activations, what tiling bounds; total adds params and output).

  python scripts/bench_dit.py                      # SANA-1.6B and FLUX.1 blocks at 512^2 / 1024^2, DC-AE 512^2, memory
  python scripts/bench_dit.py --only sana          # cases whose name starts with "sana" (or flux, dc_ae, memory)
  python scripts/bench_dit.py --tiny               # seconds (tiny widths, 64^2 decode); the smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Callable

import diffusers
import jax
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_vae import _convert, decode_memory  # noqa: E402  (the same conversion and XLA memory analysis)

from unimm_jax import benchmark
from unimm_jax.models import flux  # noqa: E402

# SANA-1600M blocks (diffusers defaults: 2240 wide, 70 x 32 linear heads, 20 x 112 cross heads, Mix-FFN 2.5x);
# tiny: a few channels. Autoencoder: dc-ae-f32c32-sana (tiny: tests/vae_tiny.py's layout).
SANA_FULL = dict()
SANA_TINY = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                 num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=12)
# FLUX.1 width (24 heads x 128, diffusers defaults), 1 double + 1 single block, guidance embedding (dev).
FLUX_FULL = dict(num_layers=1, num_single_layers=1)
FLUX_TINY = dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=4,
                 joint_attention_dim=32, pooled_projection_dim=24, axes_dims_rope=(4, 6, 6))
_VIT = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
DC_FULL = dict(encoder_block_types=_VIT, decoder_block_types=_VIT, downsample_block_type="Conv",
               upsample_block_type="interpolate", scaling_factor=0.41407)
DC_TINY = dict(latent_channels=4, attention_head_dim=8, encoder_block_types=_VIT[2:5], decoder_block_types=_VIT[2:5],
               encoder_block_out_channels=(8, 16, 32), decoder_block_out_channels=(8, 16, 32),
               encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
               encoder_qkv_multiscales=((), (5,), (5,)), decoder_qkv_multiscales=((), (5,), (5,)),
               downsample_block_type="Conv", upsample_block_type="interpolate")


@dataclasses.dataclass
class Pair:
  """One benchmark: `ours()` / `torch()` run the same computation once (blocking until done)."""

  ours: Callable[[], object]
  torch: Callable[[], object]


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  build: Callable[[argparse.Namespace], Pair]


def _nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


def sana_case(image: int) -> Callable[[argparse.Namespace], Pair]:
  """A SANA forward at the latent size of an image x image picture (32x autoencoder, patch 1)."""

  def build(args: argparse.Namespace) -> Pair:
    torch.manual_seed(0)
    kw = SANA_TINY if args.tiny else SANA_FULL
    ref = diffusers.SanaTransformer2DModel(**kw, num_layers=args.depth).eval()
    module, params = _convert(ref, "sana")
    cfg = module.cfg
    side = image // 32
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, side, side, cfg.in_channels)).astype(np.float32)
    caption = rng.standard_normal((args.batch, args.caption, cfg.caption_channels)).astype(np.float32)
    mask = np.ones((args.batch, args.caption), np.int32)
    mask[:, args.caption * 3 // 4:] = 0                     # a padded caption, as a real prompt
    t = np.full((args.batch,), 700.0, np.float32)
    fwd = jax.jit(lambda p, x, c, t, m: module.apply({"params": p}, x, c, t, m))
    xt, ct, tt, mt = _nchw(x), torch.from_numpy(caption), torch.from_numpy(t), torch.from_numpy(mask)

    def run_torch():
      with torch.no_grad():
        return ref(xt, ct, tt, encoder_attention_mask=mt).sample

    return Pair(lambda: jax.block_until_ready(fwd(params, x, caption, t, mask)), run_torch)

  return build


def flux_case(image: int) -> Callable[[argparse.Namespace], Pair]:
  """A FLUX forward on the 2x2-packed latents of an image x image picture (8x VAE) plus the text tokens."""

  def build(args: argparse.Namespace) -> Pair:
    torch.manual_seed(0)
    ref = diffusers.FluxTransformer2DModel(guidance_embeds=True, **(FLUX_TINY if args.tiny else FLUX_FULL)).eval()
    module, params = _convert(ref, "flux")
    cfg = module.cfg
    h = w = (64 if args.tiny else image) // 8
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, h * w // 4, cfg.in_channels)).astype(np.float32)
    ctx = rng.standard_normal((args.batch, args.text_tokens, cfg.context_dim)).astype(np.float32)
    pooled = rng.standard_normal((args.batch, cfg.pooled_dim)).astype(np.float32)
    t, g = np.full((args.batch,), 0.5, np.float32), np.full((args.batch,), 3.5, np.float32)
    iid, tid = flux.image_ids(h, w), flux.text_ids(args.text_tokens)
    fwd = jax.jit(lambda p, *a: module.apply({"params": p}, *a))
    inputs = (x, ctx, pooled, t, iid, tid, g)
    targs = dict(hidden_states=torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(ctx),
                 pooled_projections=torch.from_numpy(pooled), timestep=torch.from_numpy(t),
                 img_ids=torch.from_numpy(iid), txt_ids=torch.from_numpy(tid), guidance=torch.from_numpy(g))

    def run_torch():
      with torch.no_grad():
        return ref(**targs).sample

    return Pair(lambda: jax.block_until_ready(fwd(params, *inputs)), run_torch)

  return build


def dc_ae_decode_case(image: int) -> Callable[[argparse.Namespace], Pair]:
  def build(args: argparse.Namespace) -> Pair:
    torch.manual_seed(0)
    ref = diffusers.AutoencoderDC(**(DC_TINY if args.tiny else DC_FULL)).eval()
    module, params = _convert(ref, "dc_ae")
    f, side = module.cfg.spatial_downscale, 64 if args.tiny else image
    z = np.random.default_rng(0).standard_normal((1, side // f, side // f, module.cfg.latent_channels))
    z = z.astype(np.float32)
    dec = jax.jit(lambda p, z: module.apply({"params": p}, z, method="decode"))
    zt = _nchw(z)

    def run_torch():
      with torch.no_grad():
        return ref.decode(zt).sample

    return Pair(lambda: jax.block_until_ready(dec(params, z)), run_torch)

  return build


CASES = (
    Case("sana 512^2 (16x16 tokens)", sana_case(512)),
    Case("sana 1024^2 (32x32 tokens)", sana_case(1024)),
    Case("flux 512^2 (1024 + text tokens)", flux_case(512)),
    Case("flux 1024^2 (4096 + text tokens)", flux_case(1024)),
    Case("dc_ae decode 512^2", dc_ae_decode_case(512)),
)


def run_case(case: Case, args: argparse.Namespace) -> dict:
  pair = case.build(args)
  t0 = time.perf_counter()
  pair.ours()
  compile_s = time.perf_counter() - t0
  pair.torch()                                   # warm-up (allocator, oneDNN primitives)
  (ours, ours_cpu), (ref, ref_cpu) = (benchmark.median_seconds(fn, args.iters) for fn in (pair.ours, pair.torch))
  return dict(case=case.name, compile_s=compile_s, ours_s=ours, torch_s=ref, ratio=ours / ref, ours_cpu_s=ours_cpu,
              torch_cpu_s=ref_cpu, cpu_ratio=ours_cpu / ref_cpu)


def dc_ae_memory(args: argparse.Namespace) -> dict:
  """Compiled bytes of AutoencoderDC decode vs tiled_decode of one args.mem_size^2 image (nothing is run)."""
  torch.manual_seed(0)
  module, params = _convert(diffusers.AutoencoderDC(**(DC_TINY if args.tiny else DC_FULL)).eval(), "dc_ae")
  if args.tiny:   # 32-px tiles every 24 px so the tiny image is tiled
    module = module.clone(cfg=dataclasses.replace(module.cfg, tile_sample_size=32, tile_sample_stride=24))
  f = module.cfg.spatial_downscale
  return decode_memory(module, params, (args.mem_size // f,) * 2, module.cfg.latent_channels, video=False)


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tiny", action="store_true", help="tiny widths (smoke test)")
  parser.add_argument("--depth", type=int, default=2, help="transformer blocks (full width)")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--caption", type=int, default=300, help="SANA caption tokens (the last quarter padded)")
  parser.add_argument("--text-tokens", type=int, default=512, help="FLUX text (T5) tokens")
  parser.add_argument("--mem-size", type=int, default=1024, help="image side for the tiled-decode memory case")
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--only", default="", help="run only the cases (and 'memory') whose name starts with this")
  args = parser.parse_args(argv)
  if args.tiny:
    args.depth, args.caption, args.text_tokens, args.mem_size, args.iters = 1, 8, 8, 64, 1
  print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), fp32, depth {args.depth}, batch {args.batch}", flush=True)
  rows = [run_case(c, args) for c in CASES if c.name.startswith(args.only)]
  if rows:
    print(f"{'case':32s} {'compile s':>9s} {'ours s':>8s} {'torch s':>8s} {'ours/torch':>10s} "
          f"{'ours cpu s':>10s} {'torch cpu s':>11s} {'cpu ratio':>9s}")
    for r in rows:
      print(f"{r['case']:32s} {r['compile_s']:9.2f} {r['ours_s']:8.3f} {r['torch_s']:8.3f} {r['ratio']:10.2f} "
            f"{r['ours_cpu_s']:10.3f} {r['torch_cpu_s']:11.3f} {r['cpu_ratio']:9.2f}", flush=True)
  mem = {}
  if "memory".startswith(args.only):
    mem = dc_ae_memory(args)
    u, t = mem["decode"], mem["tiled_decode"]
    print(f"\n{'dc_ae decode memory (XLA, MiB)':32s} {'temp untiled':>12s} {'temp tiled':>10s} {'ratio':>6s} "
          f"{'total untiled':>13s} {'total tiled':>11s}")
    print(f"{f'{args.mem_size}^2':32s} {u['temp'] / 2**20:12.1f} {t['temp'] / 2**20:10.1f} "
          f"{t['temp'] / u['temp']:6.2f} {u['total'] / 2**20:13.1f} {t['total'] / 2**20:11.1f}")
  return {"rows": rows, "memory": mem}


if __name__ == "__main__":
  main()
