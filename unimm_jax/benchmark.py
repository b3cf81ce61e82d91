"""Timing for the scripts/bench_*.py tables: wall and process-CPU seconds of a call (CPU over wall shows how many
cores a side used, which matters on shared CI machines), and their medians over repeats."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
  """fn() -> (its result, wall seconds, process CPU seconds). The caller blocks on JAX results inside fn."""
  t0, c0 = time.perf_counter(), time.process_time()
  out = fn()
  return out, time.perf_counter() - t0, time.process_time() - c0


def median_seconds(fn: Callable[[], Any], iters: int) -> tuple[float, float]:
  """Median (wall, process CPU) seconds of `iters` calls of fn."""
  runs = [timed(fn)[1:] for _ in range(iters)]
  return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
