"""Smoke test of scripts/bench_attention.py on tiny CPU settings."""

import importlib.util
import os

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "bench_attention.py")


@pytest.fixture(scope="module")
def bench():
  spec = importlib.util.spec_from_file_location("bench_attention", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow  # ~10 s: interpret-mode compiles of three Pallas kernels
def test_bench_attention_tiny_prints_pallas_xla_rows_and_packed_tile_counts(bench, capsys):
  rows = bench.main(["--tiny", "--seqs", "64", "--passes", "fwd", "--causal", "1", "--packed-len", "128",
                     "--packed-docs", "3", "--iters", "1"])
  out = capsys.readouterr().out
  timed = {(r["case"], r["impl"]) for r in rows if not isinstance(r["result"], str)}
  assert ("d64 b4 t64 causal", "pallas") in timed and ("d64 b4 t64 causal", "xla") in timed
  assert ("packed d64 3 docs/128 causal", "pallas") in timed
  assert "packed tiles" in out and "vs xla" in out
