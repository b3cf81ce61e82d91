"""Input pipeline throughput and packing efficiency on the mixed shapes streams, one run.

Streams t2i / edit / mmu / text mixed 0.5 / 0.2 / 0.2 / 0.1 (TUNA's mix), `SimpleBuilder` sequences
(each image = `--tokens-per-image` tokens), rows of `--seq-len`. Rows of the table: our best-fit and
first-fit packers, no packing (window 1: one sample per row), and the reference measured in the same run:
grain's own `BestFitPackIterDataset` (same samples, `--window` open bins; it packs token arrays only, no
attachments or span ids, and has no skip counters).
`wait %`: share of time a consumer spends in `next()` when each batch is followed by a `--step-ms` step.

  python scripts/bench_data.py            # 200 batches of 8 x 512
  python scripts/bench_data.py --tiny     # seconds; used by the smoke test
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from typing import Any

import grain

from unimm_jax.data import pipeline, shapes
from unimm_jax.data.tokenizer import shapes_tokenizer

KEYS = ("input_ids", "span_local", "loss_mask")


def _prepare(args: argparse.Namespace, tokenizer: Any) -> pipeline.Prepare:
  return pipeline.Prepare(tokenizer, pipeline.SimpleBuilder(tokenizer, args.tokens_per_image),
                          ((args.size, args.size),))


def _measure(it: Iterator[Any], args: argparse.Namespace, used: Callable[[Any], tuple[int, int]]) -> dict[str, float]:
  """Times `args.batches` batches after a warm-up; `used(batch)` -> (samples, non-padding tokens)."""
  for _ in range(args.warmup):
    next(it)
  samples = tokens = 0
  t0 = time.perf_counter()
  for _ in range(args.batches):
    s, t = used(next(it))
    samples, tokens = samples + s, tokens + t
  dt = time.perf_counter() - t0
  # Input wait as a trainer sees it: a step of --step-ms (sleep releases the GIL, as XLA compute does)
  # after each batch, while prefetching threads prepare the next ones.
  wait = 0.0
  for _ in range(args.wait_batches):
    t1 = time.perf_counter()
    next(it)
    wait += time.perf_counter() - t1
    time.sleep(args.step_ms / 1e3)
  rows = args.batches * args.batch_size
  return {"samples/s": samples / dt, "ms/batch": 1e3 * dt / args.batches, "samples/row": samples / rows,
          "efficiency": tokens / (rows * args.seq_len),
          "wait %": 100 * wait / max(1e-9, wait + args.wait_batches * args.step_ms / 1e3)}


def _ours(method: str, window: int, args: argparse.Namespace, tokenizer: Any) -> dict[str, float]:
  pipe = pipeline.Pipeline(pipeline.shapes_streams(size=args.size, num_records=args.records), _prepare(args, tokenizer),
                           seq_len=args.seq_len, batch_size=args.batch_size, method=method, window=window,
                           num_threads=args.num_threads)

  def used(batch: dict[str, Any]) -> tuple[int, int]:
    seg = batch["segment_ids"]
    return int(seg.max(axis=1).sum()), int((seg > 0).sum())

  return _measure(iter(pipe), args, used)


def _grain_best_fit(args: argparse.Namespace, tokenizer: Any) -> dict[str, float]:
  records = pipeline.mixed_records(pipeline.shapes_streams(size=args.size, num_records=args.records), seed=0)
  samples = (records.map(_prepare(args, tokenizer)).filter(lambda s: "skipped" not in s)
             .map(lambda s: {k: s[k] for k in KEYS})
             .to_iter_dataset(grain.ReadOptions(num_threads=args.num_threads, prefetch_buffer_size=64)))
  packed = grain.experimental.BestFitPackIterDataset(
      samples, length_struct={k: args.seq_len for k in KEYS}, num_packing_bins=args.window, shuffle_bins=False)
  batches = grain.experimental.ThreadPrefetchIterDataset(packed.batch(args.batch_size), prefetch_buffer_size=2)

  def used(batch: dict[str, Any]) -> tuple[int, int]:
    seg = batch["input_ids_segment_ids"]
    return int(seg.max(axis=1).sum()), int((seg > 0).sum())

  return _measure(iter(batches), args, used)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tiny", action="store_true", help="a few small batches (smoke test)")
  p.add_argument("--size", type=int, default=32, choices=shapes.SIZES)
  p.add_argument("--tokens-per-image", type=int, default=64)
  p.add_argument("--seq-len", type=int, default=512)
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--batches", type=int, default=200)
  p.add_argument("--warmup", type=int, default=10)
  p.add_argument("--window", type=int, default=64, help="samples per packing window (grain: open bins)")
  p.add_argument("--records", type=int, default=10_000)
  p.add_argument("--num-threads", type=int, default=2)
  p.add_argument("--step-ms", type=float, default=200.0, help="simulated train step for the input-wait column")
  p.add_argument("--wait-batches", type=int, default=20)
  args = p.parse_args(argv)
  if args.tiny:
    args.batches, args.warmup, args.records, args.seq_len, args.tokens_per_image = 5, 1, 200, 256, 16
    args.wait_batches, args.step_ms = 2, 10.0
  tokenizer = shapes_tokenizer()
  results = {
      "best_fit": _ours("best_fit", args.window, args, tokenizer),
      "first_fit": _ours("first_fit", args.window, args, tokenizer),
      "unpacked": _ours("first_fit", 1, args, tokenizer),
      "grain best-fit (ref)": _grain_best_fit(args, tokenizer),
  }
  ref = results["grain best-fit (ref)"]
  cols = ["samples/s", "ms/batch", "samples/row", "efficiency", "wait %"]
  print(f"shapes {args.size}px, {args.tokens_per_image} tokens/image, batches {args.batch_size} x {args.seq_len}, "
        f"window {args.window}, {args.num_threads} threads, {args.batches} batches; wait % with a "
        f"{args.step_ms:g} ms step")
  print(f"| {'packing':<20} | " + " | ".join(f"{c:>11}" for c in cols) + " | samples/s vs ref | efficiency vs ref |")
  print("|" + "---|" * (len(cols) + 3))
  for name, r in results.items():
    print(f"| {name:<20} | " + " | ".join(f"{r[c]:11.3f}" for c in cols)
          + f" | {r['samples/s'] / ref['samples/s']:15.2f}x | {r['efficiency'] / ref['efficiency']:16.3f}x |")
  return results


if __name__ == "__main__":
  main()
