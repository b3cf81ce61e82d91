"""Smoke test of scripts/bench_vae.py on tiny settings."""

import importlib.util
import os

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "bench_vae.py")


@pytest.mark.slow  # ~20 s: compiles encode / decode / tiled decode of two tiny VAEs
def test_bench_vae_tiny_prints_timing_ratios_and_tiled_memory(capsys):
  spec = importlib.util.spec_from_file_location("bench_vae", SCRIPT)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  result = bench.main(["--tiny"])
  out = capsys.readouterr().out
  assert {(r["case"].split()[0], r["op"]) for r in result["rows"]} == {
      ("KL", "encode"), ("KL", "decode"), ("Wan2.2", "encode"), ("Wan2.2", "decode")}
  assert all(r["ours_s"] > 0 and r["torch_s"] > 0 for r in result["rows"])
  kl_mem = next(v for k, v in result["memory"].items() if k.startswith("KL"))
  assert kl_mem["tiled_decode"]["temp"] < kl_mem["decode"]["temp"]      # 128^2 in 32-px tiles: far smaller attention
  assert any(k.startswith("Wan") for k in result["memory"])
  assert "ours/torch" in out and "temp tiled" in out
