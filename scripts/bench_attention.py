"""Attention throughput: Pallas flash attention vs the XLA reference vs cuDNN, forward and forward+backward.

Prints one table row per (case, pass, impl) with ms and TFLOP/s, then the speed ratios against xla and cudnn
measured in the same run, and for the packed case the key/value tiles computed / minimum / total.

FLOPs count useful work only: 4*b*h*t*s*e for the forward (halved by a causal mask; for packed rows the sum
over documents), x3.5 for forward+backward (the backward does 2.5x the forward's matmuls).

  python scripts/bench_attention.py                      # GPU/TPU: seq 1k-16k, head dims 64 and 128, bf16
  python scripts/bench_attention.py --tiny               # CPU smoke run (Pallas in interpret mode: not a speed)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from unimm_jax import kernels  # noqa: E402
from unimm_jax.kernels import blocks, pallas, segments  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tiny", action="store_true", help="small CPU sizes: seq 256, d 64, 2 heads, packed 4 x 1k")
  p.add_argument("--seqs", default="1024,2048,4096,8192,16384")
  p.add_argument("--head-dims", default="64,128")
  p.add_argument("--tokens", type=int, default=16384, help="batch = max(1, tokens // seq)")
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--kv-heads", type=int, default=16)
  p.add_argument("--causal", default="0,1", help="comma list of 0/1")
  p.add_argument("--passes", default="fwd,fwd+bwd")
  p.add_argument("--impls", default="pallas,xla,cudnn")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--packed-docs", type=int, default=8)
  p.add_argument("--packed-len", type=int, default=8192, help="0 skips the packed case")
  p.add_argument("--packed-head-dim", type=int, default=128)
  p.add_argument("--block-q", type=int, default=None)
  p.add_argument("--block-k", type=int, default=None)
  p.add_argument("--iters", type=int, default=10)
  args = p.parse_args(argv)
  if args.tiny:
    defaults = dict(seqs="256", head_dims="64", tokens=256, heads=2, kv_heads=1, packed_docs=4, packed_len=1024,
                    packed_head_dim=64, iters=2, dtype="float32")
    for name, value in defaults.items():
      if getattr(args, name) == p.get_default(name):
        setattr(args, name, value)
  return args


def time_ms(fn, *args, iters: int) -> float:
  """Median wall time of a compiled call, after one warm-up call that compiles."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def make_fn(impl: str, pass_: str, **kw):
  attend = lambda q, k, v: kernels.attention(q, k, v, impl=impl, **kw)
  if pass_ == "fwd":
    return jax.jit(attend)
  loss = lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32))
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def measure(impl, pass_, args, q, k, v, flops, **kw) -> tuple[float, float] | str:
  """-> (ms, TFLOP/s), or the reason it could not run."""
  if impl == "cudnn" and jax.default_backend() != "gpu":
    return "n/a (cuDNN needs an NVIDIA GPU)"
  try:
    ms = time_ms(make_fn(impl, pass_, **kw), q, k, v, iters=args.iters)
  except (NotImplementedError, ValueError, RuntimeError, jax.errors.JaxRuntimeError) as err:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:60]}"
  return ms, flops * (3.5 if pass_ != "fwd" else 1.0) / (ms * 1e-3) / 1e12


def random_qkv(b, t, h, kh, e, dtype):
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (b, t, h, e), dtype)
  k, v = (jax.random.normal(key, (b, t, kh, e), dtype) for key in keys[1:])
  return q, k, v


def packed_lengths(docs: int, length: int) -> list[int]:
  """`docs` random lengths summing to `length` (seeded)."""
  cuts = np.sort(np.random.default_rng(0).choice(np.arange(1, length), docs - 1, replace=False))
  return np.diff(np.concatenate([[0], cuts, [length]])).tolist()


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  dtype = jnp.dtype(args.dtype)
  impls = args.impls.split(",")
  passes = args.passes.split(",")
  pallas_kw = {k: v for k, v in (("block_q", args.block_q), ("block_k", args.block_k)) if v is not None}
  rows = []

  def run(case, impl, pass_, q, k, v, flops, **kw):
    result = measure(impl, pass_, args, q, k, v, flops, **(kw | (pallas_kw if impl == "pallas" else {})))
    rows.append(dict(case=case, impl=impl, pass_=pass_, result=result))
    shown = result if isinstance(result, str) else f"{result[0]:10.3f} ms {result[1]:8.2f} TFLOP/s"
    print(f"{case:<40} {pass_:<8} {impl:<7} {shown}", flush=True)

  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), dtype {dtype.name}, "
        f"heads {args.heads}/{args.kv_heads}" + (" -- Pallas runs in interpret mode on CPU: not a speed"
                                                  if jax.default_backend() == "cpu" else ""))
  for e in map(int, args.head_dims.split(",")):
    for t in map(int, args.seqs.split(",")):
      b = max(1, args.tokens // t)
      q, k, v = random_qkv(b, t, args.heads, args.kv_heads, e, dtype)
      for causal in (c == "1" for c in args.causal.split(",")):
        flops = 4 * b * args.heads * t * t * e / (2 if causal else 1)
        case = f"d{e} b{b} t{t} {'causal' if causal else 'full'}"
        for pass_ in passes:
          for impl in impls:
            run(case, impl, pass_, q, k, v, flops, causal=causal)

  if args.packed_len:
    lengths = packed_lengths(args.packed_docs, args.packed_len)
    e, t = args.packed_head_dim, args.packed_len
    seg = jnp.asarray(segments.segment_ids_from_lengths(lengths, t))[None]
    q, k, v = random_qkv(1, t, args.heads, args.kv_heads, e, dtype)
    flops = sum(4 * args.heads * n * n * e / 2 for n in lengths)
    case = f"packed d{e} {args.packed_docs} docs/{t} causal"
    # cuDNN cannot mask segments: it gets the same documents as a batch padded to the longest one.
    padded = random_qkv(len(lengths), max(lengths), args.heads, args.kv_heads, e, dtype)
    for pass_ in passes:
      for impl in impls:
        if impl == "cudnn":
          run(case + " (padded)", impl, pass_, *padded, flops, causal=True)
        else:
          run(case, impl, pass_, q, k, v, flops, segment_ids=seg, causal=True)
    target = "tpu" if jax.default_backend() == "tpu" else "gpu"
    cfg = pallas.tile_config(target, t, t, e, block_q=args.block_q, block_k=args.block_k, causal=True,
                             sm_scale=1.0, interpret=jax.default_backend() == "cpu")
    counts = blocks.tile_counts(np.asarray(seg), causal=True, block_q=cfg.block_q, block_k=cfg.block_k)
    print(f"packed tiles ({target} tiles {cfg.block_q}x{cfg.block_k}): computed {counts['computed']}, minimum "
          f"{counts['minimum']}, unmasked {counts['full']}, total {counts['total']}, skipped "
          f"{1 - counts['computed'] / counts['total']:.1%}; lengths {lengths}")

  print("\nratios (time of other / time of pallas; > 1 means pallas is faster)")
  for row in rows:
    if row["impl"] != "pallas" or isinstance(row["result"], str):
      continue
    for other in rows:
      same = other["pass_"] == row["pass_"] and other["case"].split(" (")[0] == row["case"]
      if same and other["impl"] != "pallas" and not isinstance(other["result"], str):
        print(f"  {row['case']:<40} {row['pass_']:<8} vs {other['impl']:<6} "
              f"{other['result'][0] / row['result'][0]:6.2f}x")
  return rows


if __name__ == "__main__":
  main()
