"""KV-cache generation: greedy parity with transformers.generate, stop tokens, samplers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_tiny
from test_qwen import convert_state_dict
from unimm_jax import checkpoint
from unimm_jax.models import qwen
from unimm_jax.sampling import SamplerConfig, generate, sample_logits


@pytest.fixture(scope="module")
def tiny():
  ref = hf_tiny.qwen2()
  cfg = qwen.config_from_hf(ref.config)
  return ref, cfg, convert_state_dict(ref, cfg)


PROMPTS = [np.random.default_rng(i).integers(1, 211, n).tolist() for i, n in enumerate((5, 11, 3))]


def test_greedy_32_tokens_identical_to_transformers_generate(tiny):
  ref, cfg, params = tiny
  out = generate(qwen.Qwen(cfg), params, PROMPTS, max_new_tokens=32)
  assert out.tokens.shape == (3, 32)
  for prompt, ours in zip(PROMPTS, out.as_lists()):
    with torch.no_grad():
      r = ref.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours == r[0, len(prompt):].tolist()


def test_batched_left_padded_generation_matches_transformers_batch(tiny):
  ref, cfg, params = tiny
  p = max(map(len, PROMPTS))
  ids = torch.tensor([[0] * (p - len(x)) + x for x in PROMPTS])
  mask = torch.tensor([[0] * (p - len(x)) + [1] * len(x) for x in PROMPTS])
  with torch.no_grad():
    r = ref.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
  out = generate(qwen.Qwen(cfg), params, PROMPTS, max_new_tokens=16)
  np.testing.assert_array_equal(out.tokens, r[:, p:].numpy())


def test_scan_layout_generates_the_same_tokens(tiny):
  _, cfg, params = tiny
  want = generate(qwen.Qwen(cfg), params, PROMPTS, max_new_tokens=8).tokens
  scan_cfg = dataclasses.replace(cfg, scan_layers=True)
  got = generate(qwen.Qwen(scan_cfg), checkpoint.stack_layers(params, cfg.depth), PROMPTS, max_new_tokens=8).tokens
  np.testing.assert_array_equal(got, want)


def test_rows_stop_at_their_stop_token_and_pad_after(tiny):
  _, cfg, params = tiny
  free = generate(qwen.Qwen(cfg), params, PROMPTS, max_new_tokens=12)
  stop = int(free.tokens[1, 3])  # row 1 emits this at step 3 (maybe earlier too)
  out = generate(qwen.Qwen(cfg), params, PROMPTS, max_new_tokens=12, stop_tokens=[stop], pad_id=-1 % 211)
  for row_free, row, n in zip(free.tokens, out.tokens, out.lengths):
    hits = np.flatnonzero(row_free == stop)
    want_n = hits[0] + 1 if hits.size else 12
    assert n == want_n
    np.testing.assert_array_equal(row[:n], row_free[:n])
    assert np.all(row[n:] == 210)


def test_top_k_one_and_tiny_top_p_reduce_to_greedy():
  logits = jax.random.normal(jax.random.key(0), (16, 50))
  greedy = jnp.argmax(logits, -1)
  for cfg in (SamplerConfig(temperature=1.0, top_k=1), SamplerConfig(temperature=1.0, top_p=1e-6)):
    for seed in range(3):
      np.testing.assert_array_equal(sample_logits(logits, jax.random.key(seed), cfg), greedy)


def test_top_k_and_top_p_restrict_the_support():
  logits = jnp.log(jnp.array([[0.5, 0.25, 0.15, 0.06, 0.04]] * 512))
  keys = jax.random.split(jax.random.key(0), 4)
  k3 = sample_logits(logits, keys[0], SamplerConfig(temperature=1.0, top_k=3))
  assert set(np.unique(k3)) == {0, 1, 2}
  p7 = sample_logits(logits, keys[1], SamplerConfig(temperature=1.0, top_p=0.7))  # nucleus {0, 1}
  assert set(np.unique(p7)) == {0, 1}
  hot = sample_logits(logits, keys[2], SamplerConfig(temperature=1.0))
  assert set(np.unique(hot)) == {0, 1, 2, 3, 4}
  frac0 = float(np.mean(np.asarray(hot) == 0))
  assert 0.42 < frac0 < 0.58  # ~0.5 with 512 draws


def test_bad_sampler_and_prompt_arguments_raise():
  with pytest.raises(ValueError, match="top_p"):
    SamplerConfig(top_p=0.0)
  with pytest.raises(ValueError, match="at least one token"):
    generate(None, None, [[1], []], max_new_tokens=2)
