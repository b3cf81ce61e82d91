"""Smoke test of scripts/bench_ovis.py on tiny settings."""

import importlib.util
import os
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "bench_ovis.py")


@pytest.mark.slow  # ~20 s CPU (95 s wall on 2 shared cores): compiles a tiny Yak and FLUX forward
def test_bench_ovis_tiny_prints_the_three_sides_and_ratios(capsys, monkeypatch):
  spec = importlib.util.spec_from_file_location("bench_ovis", SCRIPT)
  bench = importlib.util.module_from_spec(spec)
  monkeypatch.setitem(sys.modules, spec.name, bench)
  spec.loader.exec_module(bench)
  result = bench.main(["--tiny"])
  out = capsys.readouterr().out
  assert [r["side"] for r in result["rows"]] == ["yak (ours, jax)", "flux (ours, jax)", "flux (diffusers, torch)"]
  assert all(r["wall_s"] > 0 and r["cpu_s"] >= 0 for r in result["rows"])
  assert result["flux_max_diff"] < 1e-4   # the anchor and our FLUX compute the same thing
  # the Yak does strictly more work than FLUX of its size: the image self-attention and the refiner
  assert result["ratios"]["flops"] > 1
  assert "ours / anchor" in out
