"""Vision-encoder speed: ours vs transformers in the same run, and packed vs padded NaFlex batches.

1. Fixed resolution: SigLIP so400m-shaped tower (width 1152, 16 heads, MLP 4304) at reduced depth,
   384px / patch 14 (729 tokens): images/s of our jitted forward vs transformers' SiglipVisionModel
   (eager, no_grad, SDPA). Both fp32 on the same weights (converted with our converter): a
   like-for-like comparison; bf16 on CPU mostly measures emulation, so it is opt-in (--bf16).
2. Mixed resolution: the SigLIP2 NaFlex tower (patch 16, 16x16 table) on images of random aspect
   ratios and patch budgets. Padded = one image per row of max_num_patches tokens (transformers'
   layout; transformers itself is timed on it too); packed = NaViT rows of the same length holding
   several images (segment ids). Packing should win by about the padding fraction.

  python scripts/bench_vision.py             # so400m-shaped, depth 2 (minutes on 2 CPU cores)
  python scripts/bench_vision.py --tiny      # seconds; used by the smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import timeit

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from unimm_jax.convert.family import abstract_params
from unimm_jax.convert import engine, hf
from unimm_jax.data import vision
from unimm_jax.models import siglip

SIZES = {
    "so400m": dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16),
    "tiny": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4),
}


def race(fns: dict, repeats: int) -> dict[str, float]:
  """Best-of-`repeats` seconds per callable, the callables taking turns so load drift hits all alike."""
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      times[name].append(timeit.timeit(fn, number=1))
  return {name: min(t) for name, t in times.items()}


def ours_from(ref: torch.nn.Module, dtype: str = "float32"):
  """Our module and params for a transformers vision tower, through our converter."""
  fam = hf.family_for_model_type(ref.config.model_type, "bench")
  cfg = dataclasses.replace(siglip.config_from_hf(ref.config), dtype=dtype)
  state = {k: (lambda v=v: v.detach().numpy()) for k, v in ref.state_dict().items()}
  params = engine.convert(state, fam.rules(cfg), engine.flatten(abstract_params(fam, cfg)), ignore=fam.ignore(cfg))
  return siglip.VisionTransformer(cfg), jax.tree.map(jnp.asarray, engine.unflatten(params))


def mixed_batch(n: int, patch: int, max_patches: int, seed: int = 0) -> list[tuple[np.ndarray, tuple[int, int]]]:
  """n images of random aspect ratio (1:3 .. 3:1) and patch budget (1/8 .. 1 of max_patches), as patches."""
  rng = np.random.default_rng(seed)
  items = []
  for _ in range(n):
    aspect = float(np.exp(rng.uniform(-np.log(3), np.log(3))))
    budget = int(max_patches * rng.uniform(0.125, 1.0))
    h, w = vision.naflex_size(int(1000 * aspect), 1000, patch, budget)
    items.append((rng.normal(size=((h // patch) * (w // patch), patch * patch * 3)).astype(np.float32),
                  (h // patch, w // patch)))
  return items


def padded(items, length: int) -> dict[str, np.ndarray]:
  dim = items[0][0].shape[1]
  out = {"patches": np.zeros((len(items), length, dim), np.float32), "mask": np.zeros((len(items), length), np.int32),
         "spatial_shapes": np.asarray([hw for _, hw in items], np.int32)}
  for i, (p, _) in enumerate(items):
    out["patches"][i, : len(p)], out["mask"][i, : len(p)] = p, 1
  return out


def row(name: str, impl: str, shape: str, seconds: float, images: int) -> None:
  print(f"| {name:<24} | {impl:<28} | {shape:>12} | {seconds * 1e3:>9.1f} | {images / seconds:>8.2f} |")


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tiny", action="store_true", help="tiny widths and images (smoke test)")
  parser.add_argument("--depth", type=int, default=2, help="encoder layers (so400m has 27)")
  parser.add_argument("--batch", type=int, default=4, help="images per fixed-resolution batch")
  parser.add_argument("--mixed", type=int, default=8, help="images in the mixed-resolution batch")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--bf16", action="store_true", help="also time our forward with bf16 compute")
  args = parser.parse_args()
  size = "tiny" if args.tiny else "so400m"
  image, patch, naflex_patch, max_patches = (32, 8, 8, 16) if args.tiny else (384, 14, 16, 576)
  if args.tiny:
    args.batch, args.mixed, args.repeats = 2, 5, 1
  torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(0)

  print(f"device {jax.devices()[0].platform} ({os.cpu_count()} cores); {size}-shaped, depth {args.depth}; "
        f"best of {args.repeats}; torch {torch.__version__} ({torch.get_num_threads()} threads), jax {jax.__version__}")
  print(f"| {'case':<24} | {'implementation':<28} | {'b x tokens':>12} | {'ms/batch':>9} | {'images/s':>8} |")
  print(f"|{'-' * 26}|{'-' * 30}|{'-' * 14}|{'-' * 11}|{'-' * 10}|")

  # 1. Fixed resolution.
  ref = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
      **SIZES[size], num_hidden_layers=args.depth, image_size=image, patch_size=patch)).eval()
  pixels = np.random.default_rng(0).normal(size=(args.batch, image, image, 3)).astype(np.float32)
  pixels_t = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
  fns = {"transformers fp32 (eager)": lambda: ref(pixels_t)}
  for dtype in ("float32", "bfloat16") if args.bf16 else ("float32",):
    module, params = ours_from(ref, dtype)
    forward = jax.jit(lambda p, x, module=module: module.apply({"params": p}, x).last_hidden_state)
    x = jnp.asarray(pixels)
    got = forward(params, x).block_until_ready()  # compile
    name = f"unimm-jax {'fp32' if dtype == 'float32' else 'bf16'} (jit)"
    fns[name] = lambda forward=forward, params=params, x=x: forward(params, x).block_until_ready()
    if dtype == "float32":
      ours_fp32 = np.asarray(got)
  with torch.no_grad():
    diff = float(np.max(np.abs(ours_fp32 - ref(pixels_t).last_hidden_state.numpy())))  # also torch's warm-up
    fixed = race(fns, args.repeats)
  tokens = (image // patch) ** 2
  for name, t in fixed.items():
    row(f"fixed {image}px/p{patch}", name, f"{args.batch}x{tokens}", t, args.batch)

  # 2. Mixed resolution, NaFlex.
  ref2 = transformers.Siglip2VisionModel(transformers.Siglip2VisionConfig(
      **SIZES[size], num_hidden_layers=args.depth, patch_size=naflex_patch, num_patches=16 if args.tiny else 256)).eval()
  module2, params2 = ours_from(ref2)
  items = mixed_batch(args.mixed, naflex_patch, max_patches)
  real = sum(len(p) for p, _ in items)
  pad = padded(items, max_patches)
  rows, skipped = vision.pack_patches(items, max_patches, images_per_row=len(items))
  assert skipped == 0
  packed = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  fwd = jax.jit(lambda p, x, s, seg, pos: module2.apply(
      {"params": p}, patches=x, spatial_shapes=s, segment_ids=seg, positions=pos).last_hidden_state)
  pad_args = (jnp.asarray(pad["patches"]), jnp.asarray(pad["spatial_shapes"][:, None]), jnp.asarray(pad["mask"]), None)
  pack_args = tuple(jnp.asarray(packed[k]) for k in ("patches", "spatial_shapes", "segment_ids", "positions"))
  pt = {k: torch.from_numpy(v) for k, v in pad.items()}
  fns = {"transformers fp32 padded": lambda: ref2(pt["patches"], pt["mask"], pt["spatial_shapes"])}
  for name, a in (("padded", pad_args), ("packed", pack_args)):
    fwd(params2, *a).block_until_ready()  # compile
    fns[f"unimm-jax fp32 {name}"] = lambda a=a: fwd(params2, *a).block_until_ready()
  with torch.no_grad():
    fns["transformers fp32 padded"]()  # warm-up
    mixed = race(fns, args.repeats)
  shapes = {"transformers fp32 padded": pad_args[0].shape, "unimm-jax fp32 padded": pad_args[0].shape,
            "unimm-jax fp32 packed": pack_args[0].shape}
  for name, t in mixed.items():
    row(f"mixed {args.mixed} img NaFlex p{naflex_patch}", name, f"{shapes[name][0]}x{shapes[name][1]}", t,
        len(items))

  t_ref = fixed["transformers fp32 (eager)"]
  print(f"fixed resolution: unimm-jax fp32 / transformers fp32 images/s = {t_ref / fixed['unimm-jax fp32 (jit)']:.2f}x "
        f"(max |diff| of last_hidden_state {diff:.1e})")
  if args.bf16:
    print(f"fixed resolution: unimm-jax bf16 / transformers fp32 images/s = {t_ref / fixed['unimm-jax bf16 (jit)']:.2f}x")
  print(f"mixed resolution: packed / padded images/s = "
        f"{mixed['unimm-jax fp32 padded'] / mixed['unimm-jax fp32 packed']:.2f}x; padding fraction of the padded "
        f"batch {1 - real / (len(items) * max_patches):.0%}, of the packed rows {1 - real / packed['segment_ids'].size:.0%}; "
        f"unimm-jax padded / transformers padded = "
        f"{mixed['transformers fp32 padded'] / mixed['unimm-jax fp32 padded']:.2f}x")

if __name__ == "__main__":
  main()
