"""Text-encoder speed: ours vs transformers in the same run, on FLUX's prompt shapes.

1. T5 v1.1 XXL-shaped encoder (width 4096, 64 heads, d_ff 10240; FLUX.1's text_encoder_2) at reduced depth, on
   FLUX's 512-token prompts (the pipeline pads to max_sequence_length and passes no mask).
2. CLIP-L/14 text tower (FLUX.1's text_encoder), all 12 layers, 77-token prompts; the pooled output is timed.
Both fp32 on the same random weights (converted with our converter), transformers eager under no_grad (SDPA),
ours jitted; the implementations take turns (best of --repeats) so load drift hits both alike.

  python scripts/bench_text_encoders.py            # XXL width at depth 1 + full CLIP-L (a few minutes on 2 cores)
  python scripts/bench_text_encoders.py --tiny     # seconds; used by the smoke test
"""

from __future__ import annotations

import argparse
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from bench_vision import race  # the same turn-taking best-of timer (scripts/ is on sys.path)
from unimm_jax import registry
from unimm_jax.convert import engine
from unimm_jax.convert.family import abstract_params
from unimm_jax.models import clip_text, t5

T5_SIZES = {"xxl": dict(d_model=4096, d_kv=64, d_ff=10240, num_heads=64, vocab_size=32128),
            "tiny": dict(d_model=64, d_kv=16, d_ff=96, num_heads=4, vocab_size=128)}
CLIP_SIZES = {"l14": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                          vocab_size=49408, max_position_embeddings=77),
              "tiny": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_hidden_layers=2,
                           vocab_size=99, max_position_embeddings=16)}


def ours_from(ref: torch.nn.Module, family: str, cfg):
  """Params of `cfg` for a transformers model, through our converter (the family's legacy renames applied)."""
  fam = registry.family(family)
  state = {}
  for key, value in ref.state_dict().items():
    for pattern, repl in fam.legacy_keys:
      key = re.sub(pattern, repl, key)
    state[key] = lambda v=value: v.detach().numpy()
  flat = engine.convert(state, fam.rules(cfg), engine.flatten(abstract_params(fam, cfg)), ignore=fam.ignore(cfg))
  return jax.tree.map(jnp.asarray, engine.unflatten(flat))


def bench(name: str, ref, module, params, ids: np.ndarray, output: str, repeats: int) -> tuple[float, float, float]:
  forward = jax.jit(lambda p, x: getattr(module.apply({"params": p}, x), output))
  x, xt = jnp.asarray(ids), torch.from_numpy(ids)
  ours = np.asarray(forward(params, x).block_until_ready())  # compile
  with torch.no_grad():
    diff = float(np.max(np.abs(ours - getattr(ref(xt), output).numpy())))  # also torch's warm-up
    times = race({"transformers": lambda: ref(xt), "unimm-jax": lambda: forward(params, x).block_until_ready()},
                 repeats)
  for impl, t in times.items():
    print(f"| {name:<30} | {impl + ' fp32':<18} | {ids.shape[0]}x{ids.shape[1]:<6} | {t * 1e3:>10.1f} | "
          f"{ids.shape[0] / t:>9.2f} |")
  return times["transformers"], times["unimm-jax"], diff


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tiny", action="store_true", help="tiny widths (smoke test)")
  parser.add_argument("--t5_depth", type=int, default=1, help="T5 layers (XXL has 24)")
  parser.add_argument("--t5_tokens", type=int, default=512, help="FLUX.1-dev: max_sequence_length 512")
  parser.add_argument("--batch", type=int, default=1, help="prompts per batch")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  t5_size, clip_size = ("tiny", "tiny") if args.tiny else ("xxl", "l14")
  if args.tiny:
    args.t5_tokens, args.repeats = 32, 1
  clip_tokens = CLIP_SIZES[clip_size]["max_position_embeddings"]
  torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(0)
  print(f"device {jax.devices()[0].platform} ({os.cpu_count()} cores); best of {args.repeats}; "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), jax {jax.__version__}")
  print(f"| {'model':<30} | {'implementation':<18} | {'b x t':<8} | {'ms/batch':>10} | {'prompts/s':>9} |")
  print(f"|{'-' * 32}|{'-' * 20}|{'-' * 10}|{'-' * 12}|{'-' * 11}|")
  rng = np.random.default_rng(0)

  ref = transformers.T5EncoderModel(transformers.T5Config(
      **T5_SIZES[t5_size], num_layers=args.t5_depth, feed_forward_proj="gated-gelu", dropout_rate=0.0)).eval()
  cfg = t5.config_from_hf(ref.config)
  ids = rng.integers(0, cfg.vocab, (args.batch, args.t5_tokens))
  t5_times = bench(f"T5 {t5_size}-width, depth {args.t5_depth}", ref, t5.T5EncoderModel(cfg),
                   ours_from(ref, "t5", cfg), ids, "last_hidden_state", args.repeats)
  del ref

  ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      **CLIP_SIZES[clip_size], eos_token_id=2, bos_token_id=0, pad_token_id=1)).eval()
  cfg = clip_text.config_from_hf(ref.config)
  ids = rng.integers(3, cfg.vocab, (args.batch, clip_tokens))
  clip_times = bench(f"CLIP {clip_size} text, depth {cfg.depth}", ref, clip_text.CLIPTextModel(cfg),
                     ours_from(ref, "clip_text", cfg), ids, "pooler_output", args.repeats)

  for name, (t_ref, t_ours, diff) in (("T5", t5_times), ("CLIP", clip_times)):
    print(f"{name}: unimm-jax fp32 / transformers fp32 prompts/s = {t_ref / t_ours:.2f}x (max |diff| {diff:.1e})")


if __name__ == "__main__":
  main()
