"""LLM speed, ours vs transformers, same config, same machine, one run.

Prefill: one jitted forward over [batch, prompt_len] tokens vs torch eager `model(ids)` (no_grad).
Decode: tokens/s of our jitted prefill + while_loop decode vs `transformers.generate` (greedy, KV cache).
Both in fp32 on CPU; both see the same random weights (converted with our converter).

  python scripts/bench_llm.py            # ~100M-parameter Qwen2-shaped config
  python scripts/bench_llm.py --tiny     # seconds; used by the smoke test
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

import unimm_jax
from unimm_jax.sampling import generate

SIZES = {
    # ~101M parameters: 32k vocab (untied) dominates, as in small Qwen models
    "100m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                 num_attention_heads=12, num_key_value_heads=4),
    # ~100M too, but deep and narrow like the small Qwen2.5 models (0.5B: 24 layers of 896)
    "100m_deep": dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=24,
                      num_attention_heads=8, num_key_value_heads=2),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
}


def best_of(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tiny", action="store_true", help="tiny config and lengths (smoke test)")
  parser.add_argument("--size", choices=[s for s in SIZES if s != "tiny"], default="100m")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--prompt_len", type=int, default=512)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  size = "tiny" if args.tiny else args.size
  if args.tiny:
    args.prompt_len, args.new_tokens, args.repeats = 32, 8, 1
  torch.set_num_threads(os.cpu_count() or 1)

  cfg = transformers.Qwen2Config(**SIZES[size], max_position_embeddings=4096, tie_word_embeddings=False)
  torch.manual_seed(0)
  ref = transformers.Qwen2ForCausalLM(cfg).eval()
  n_params = sum(p.numel() for p in ref.parameters())
  with tempfile.TemporaryDirectory() as d:
    ref.save_pretrained(d)
    ours = unimm_jax.load(d)
  ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.prompt_len))
  ids_t, ids_j = torch.from_numpy(ids), jnp.asarray(ids, jnp.int32)

  forward = jax.jit(lambda p, x: ours.module.apply({"params": p}, x).logits)
  forward(ours.params, ids_j).block_until_ready()
  t_ours = best_of(lambda: forward(ours.params, ids_j).block_until_ready(), args.repeats)
  with torch.no_grad():
    ref(ids_t)
    t_ref = best_of(lambda: ref(ids_t), args.repeats)

  prompts = ids.tolist()
  run = lambda: generate(ours.module, ours.params, prompts, max_new_tokens=args.new_tokens)
  run()  # compile
  g_ours = best_of(run, args.repeats)
  with torch.no_grad():
    gen = lambda: ref.generate(ids_t, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                               do_sample=False, pad_token_id=0)
    gen()
    g_ref = best_of(gen, args.repeats)

  # Decode rate: new tokens over (generate time - prefill time), so prompt processing is not counted.
  dec = lambda g, t: args.batch * args.new_tokens / max(g - t, 1e-9)
  tok_ours, tok_ref = dec(g_ours, t_ours), dec(g_ref, t_ref)
  print(f"device {jax.devices()[0].platform} ({os.cpu_count()} cores), fp32, Qwen2 {n_params / 1e6:.1f}M params, "
        f"batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens; best of {args.repeats}")
  print(f"| {'metric':<22} | {'unimm-jax':>10} | {'transformers':>12} | {'ratio':>6} |")
  print(f"|{'-' * 24}|{'-' * 12}|{'-' * 14}|{'-' * 8}|")
  print(f"| {'prefill ms':<22} | {t_ours * 1e3:>10.1f} | {t_ref * 1e3:>12.1f} | {t_ref / t_ours:>5.2f}x |")
  print(f"| {'generate ms (total)':<22} | {g_ours * 1e3:>10.1f} | {g_ref * 1e3:>12.1f} | {g_ref / g_ours:>5.2f}x |")
  print(f"| {'decode tokens/s':<22} | {tok_ours:>10.1f} | {tok_ref:>12.1f} | {tok_ours / tok_ref:>5.2f}x |")
  print("ratio > 1 means unimm-jax is faster")


if __name__ == "__main__":
  main()
