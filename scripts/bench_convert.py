"""Peak memory of HF -> Orbax conversion on a random Qwen2-shaped checkpoint of a given size.

Writes a random fp32 safetensors checkpoint (numpy only), runs `scripts/convert.py` in a child
process and reports the child's peak RSS against the checkpoint size, with and without the
interpreter's baseline (python + jax + transformers imported, measured the same way).

  python scripts/bench_convert.py --gb 1.0
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from unimm_jax.convert.safetensors_writer import save_safetensors  # noqa: E402


def write_random_qwen(path: str, gb: float) -> int:
  """A Qwen2 checkpoint of ~gb GB: width 1024, as many 12M-parameter layers as fit."""
  d, f, heads, kv, vocab = 1024, 2816, 16, 4, 32000
  e = d // heads
  per_layer = d * e * (2 * heads + 2 * kv) + e * (heads + 2 * kv) + 3 * d * f + 2 * d
  depth = max(1, int((gb * 1e9 / 4 - 2 * vocab * d) // per_layer))
  os.makedirs(path)
  rng = np.random.default_rng(0)
  rand = lambda *s: rng.standard_normal(s, dtype=np.float32) * 0.02
  tensors = {"model.embed_tokens.weight": rand(vocab, d), "model.norm.weight": np.ones(d, np.float32),
             "lm_head.weight": rand(vocab, d)}
  for i in range(depth):
    p = f"model.layers.{i}."
    tensors |= {p + "self_attn.q_proj.weight": rand(heads * e, d), p + "self_attn.q_proj.bias": rand(heads * e),
                p + "self_attn.k_proj.weight": rand(kv * e, d), p + "self_attn.k_proj.bias": rand(kv * e),
                p + "self_attn.v_proj.weight": rand(kv * e, d), p + "self_attn.v_proj.bias": rand(kv * e),
                p + "self_attn.o_proj.weight": rand(d, heads * e), p + "mlp.gate_proj.weight": rand(f, d),
                p + "mlp.up_proj.weight": rand(f, d), p + "mlp.down_proj.weight": rand(d, f),
                p + "input_layernorm.weight": np.ones(d, np.float32),
                p + "post_attention_layernorm.weight": np.ones(d, np.float32)}
  save_safetensors(os.path.join(path, "model.safetensors"), tensors)
  cfg = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=vocab, hidden_size=d,
             intermediate_size=f, num_hidden_layers=depth, num_attention_heads=heads, num_key_value_heads=kv,
             rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False, torch_dtype="float32")
  with open(os.path.join(path, "config.json"), "w") as fh:
    json.dump(cfg, fh)
  return os.path.getsize(os.path.join(path, "model.safetensors"))


def child_peak_rss(args: list[str]) -> tuple[int, float]:
  """Runs a child python; returns (its peak RSS in bytes, seconds)."""
  code = ("import resource, runpy, sys\nsys.argv = sys.argv[1:]\ntry:\n"
          "  runpy.run_path(sys.argv[0], run_name='__main__')\nexcept SystemExit as e:\n"
          "  if e.code not in (0, None): raise\n"
          "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)")
  t0 = time.perf_counter()
  r = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True)
  if r.returncode != 0:
    raise RuntimeError(r.stderr[-2000:])
  peak_kb = int(next(l for l in reversed(r.stderr.splitlines()) if l.startswith("PEAK ")).split()[1])
  return peak_kb * 1024, time.perf_counter() - t0


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--gb", type=float, default=1.0, help="checkpoint size in GB")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    src = os.path.join(tmp, "hf")
    size = write_random_qwen(src, args.gb)
    baseline_script = os.path.join(tmp, "baseline.py")
    with open(baseline_script, "w") as fh:
      fh.write("import absl.app, absl.flags\nimport unimm_jax.convert.hf\n")  # what convert.py imports
    base, _ = child_peak_rss([baseline_script])
    peak, secs = child_peak_rss(["scripts/convert.py", "--src", src, "--dst", os.path.join(tmp, "out")])
  print("| checkpoint | peak RSS | baseline (imports) | peak - baseline | (peak - baseline) / size | time |")
  print("|---|---|---|---|---|---|")
  print(f"| {size / 1e9:.2f} GB | {peak / 1e9:.2f} GB | {base / 1e9:.2f} GB | {(peak - base) / 1e9:.2f} GB | "
        f"{(peak - base) / size:.2f}x (peak / size {peak / size:.2f}x) | {secs:.1f} s |")


if __name__ == "__main__":
  main()
