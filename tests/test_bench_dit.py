"""Smoke test of scripts/bench_dit.py on tiny settings."""

import importlib.util
import os
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "bench_dit.py")


@pytest.mark.slow  # ~45 s: compiles tiny SANA and FLUX forwards, a DC-AE decode and its tiled / untiled memory analysis
def test_bench_dit_tiny_prints_ratios_and_tiled_memory(capsys, monkeypatch):
  spec = importlib.util.spec_from_file_location("bench_dit", SCRIPT)
  bench = importlib.util.module_from_spec(spec)
  monkeypatch.setitem(sys.modules, spec.name, bench)   # dataclasses look their module up there
  spec.loader.exec_module(bench)
  result = bench.main(["--tiny"])
  out = capsys.readouterr().out
  assert [r["case"] for r in result["rows"]] == [c.name for c in bench.CASES]
  assert all(r["ours_s"] > 0 and r["torch_s"] > 0 and r["cpu_ratio"] > 0 for r in result["rows"])
  assert result["memory"]["tiled_decode"]["temp"] < result["memory"]["decode"]["temp"]
  assert "ours/torch" in out and "temp tiled" in out
