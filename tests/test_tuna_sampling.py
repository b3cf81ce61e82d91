"""TUNA samplers: exact Euler endpoints on analytic fields, guidance algebra, cached understanding decode."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tuna_tiny
from test_tuna import _randomize
from unimm_jax.data import packing
from unimm_jax.data import tuna_sequences as ts
from unimm_jax.models import tuna
from unimm_jax.sampling import flow
from unimm_jax.sampling import tuna as sampling
from unimm_jax.training import tuna_objective as obj


def test_time_grid_is_the_reference_warp_with_steps_points():
  g = sampling.time_grid(5, 3.0)
  s = np.linspace(0, 1, 5)
  np.testing.assert_allclose(g, s / (s + 3 - 3 * s), atol=1e-7)
  assert g[0] == 0.0 and g[-1] == 1.0


def test_euler_reaches_the_endpoint_of_straight_flows_exactly():
  target = jax.random.normal(jax.random.key(0), (2, 6, 3))
  x0 = jax.random.normal(jax.random.key(1), (2, 6, 3))
  grid = sampling.time_grid(7, 3.0)
  x1 = flow.euler(lambda x, t: (target - x) / (1.0 - t), x0, grid)   # the optimal flow to `target`
  np.testing.assert_allclose(x1, target, atol=1e-5)
  const = flow.euler(lambda x, t: jnp.full_like(x, 0.5), x0, grid)
  np.testing.assert_allclose(const, x0 + 0.5, atol=1e-6)


@pytest.fixture(scope="module")
def model():
  cfg = tuna_tiny.config()
  m = tuna.Tuna(cfg)
  b = jax.tree.map(jnp.asarray, tuna_tiny.batch(cfg, [tuna_tiny.samples(cfg)]))
  b = {**b, "span_t": jnp.ones((1, 4)), "x_t": b["x1"]}
  return m, _randomize(m.init(jax.random.key(0), b)["params"], seed=5)


def _manual_euler(m, params, sample, span, steps, seed):
  """Euler with the conditional prediction only, built by hand from one row the way training feeds the model
  (tuna_objective.noise_batch): clean spans hold their patches at t = 1, span `span` is generated."""
  o = m.cfg.token_features
  row = packing.pack_row([sample], 32)
  n_spans = int(row["span_ids"].max())
  b = {k: jnp.asarray(v) for k, v in ts.to_batch([row], n_spans, o).items()}
  slots = np.flatnonzero((sample["span_local"] == span) & ~sample["time_slot"])
  clean = (row["span_ids"] > 0) & ~row["time_slot"] & (row["span_ids"] != span)
  trained = obj.noise_batch(b, jax.random.key(0), obj.FlowConfig())["x_t"][0, clean]
  np.testing.assert_array_equal(trained, b["x1"][0, clean])  # what the loop below feeds the clean spans
  x = jax.random.normal(jax.random.key(seed), (1, len(slots), o))
  grid = sampling.time_grid(steps, 3.0)
  for i in range(steps - 1):
    x_t = b["x1"].at[0, slots].set(x[0])
    span_t = jnp.ones((1, n_spans)).at[0, span - 1].set(grid[i])
    v = m.apply({"params": params}, {**b, "x_t": x_t, "span_t": span_t}).prediction[0, slots]
    x = x + (grid[i + 1] - grid[i]) * v[None]
  return np.asarray(x)


def test_guidance_one_is_the_conditional_prediction(model):
  m, params = model
  sampler = sampling.TunaSampler(m, params, tuna_tiny.TOK)
  got = sampler.text_to_image([[10, 11]], (2, 3), sampling.FlowSamplerConfig(steps=4, guidance=1.0), seed=3)
  blank = np.zeros((2, 3, m.cfg.token_features), np.float32)
  want = _manual_euler(m, params, ts.t2i_sample([10, 11], blank, tuna_tiny.TOK), 1, 4, 3)
  np.testing.assert_allclose(got, want.reshape(got.shape), atol=1e-5)


def test_guidance_is_irrelevant_when_the_null_prompt_is_the_prompt(model):
  m, params = model
  sampler = sampling.TunaSampler(m, params, tuna_tiny.TOK)
  one = sampler.text_to_image([[10, 11], [12]], (2, 2), sampling.FlowSamplerConfig(steps=3, guidance=1.0), seed=1)
  both = sampler.text_to_image([[10, 11]], (2, 2), sampling.FlowSamplerConfig(steps=3, guidance=7.5),
                               negative=[10, 11], seed=1)
  np.testing.assert_allclose(both[0], one[0], atol=1e-4)
  differs = sampler.text_to_image([[10, 11]], (2, 2), sampling.FlowSamplerConfig(steps=3, guidance=7.5), seed=1)
  assert np.abs(differs[0] - one[0]).max() > 1e-3


def test_edit_keeps_the_source_clean_and_guidance_combines_branches(model):
  m, params = model
  sampler = sampling.TunaSampler(m, params, tuna_tiny.TOK)
  src = np.random.default_rng(0).normal(size=(2, 2, m.cfg.token_features)).astype(np.float32)
  cfg = sampling.FlowSamplerConfig(steps=3, guidance=1.0)
  plain = sampler.edit([src], [[18]], cfg, seed=2)
  assert plain.shape == (1, 2, 2, m.cfg.token_features) and np.all(np.isfinite(plain))
  # the model sees the source as in training: its patches at t = 1 (not zeros), so another source edits differently
  want = _manual_euler(m, params, ts.edit_sample(src, [18], np.zeros_like(src), tuna_tiny.TOK), 2, 3, 2)
  np.testing.assert_allclose(plain, want.reshape(plain.shape), atol=1e-5)
  assert np.abs(sampler.edit([src + 1.0], [[18]], cfg, seed=2) - plain).max() > 1e-2
  same = sampler.edit([src], [[18]], dataclasses.replace(cfg, guidance=4.0), negative=[18], seed=2)
  np.testing.assert_allclose(same, plain, atol=1e-4)  # null instruction == instruction
  three = sampler.edit([src], [[18]], dataclasses.replace(cfg, guidance=4.0, image_guidance=1.5), seed=2)
  assert np.all(np.isfinite(three)) and np.abs(three - plain).max() > 1e-3


def test_understanding_with_kv_cache_equals_full_recompute_greedy(model):
  m, params = model
  o = m.cfg.token_features
  rng = np.random.default_rng(4)
  images = [rng.normal(size=(2, 3, o)).astype(np.float32), rng.normal(size=(2, 2, o)).astype(np.float32)]
  prompts = [[13, 14], [13, 14, 15, 16]]
  sampler = sampling.TunaSampler(m, params, tuna_tiny.TOK)
  out = sampler.understand(images, prompts, max_new_tokens=6)
  for img, prompt, got in zip(images, prompts, out.tokens):
    s = ts.understanding_prompt(img, prompt, tuna_tiny.TOK)
    tokens = []
    for _ in range(6):
      full = {k: np.concatenate([v, v[-1:].repeat(len(tokens), 0) * 0]) if isinstance(v, np.ndarray) else v
              for k, v in s.items()}
      full["input_ids"] = np.concatenate([s["input_ids"], np.asarray(tokens, np.int32)])
      row = packing.pack_row([full], 32)
      b = {k: jnp.asarray(v) for k, v in ts.to_batch([row], 1, o).items()}
      logits = m.apply({"params": params}, {**b, "x_t": b["x1"], "span_t": jnp.ones((1, 1))}).logits
      tokens.append(int(jnp.argmax(logits[0, len(full["input_ids"]) - 1])))
    assert got.tolist() == tokens


def _hand_velocity(m, params, samples, span, weights):
  """The guided velocity built by hand: one model call per branch row, clean spans at t = 1 as in training."""
  o = m.cfg.token_features
  rows = [packing.pack_row([s], 32) for s in samples]
  n_spans = max(int(r["span_ids"].max()) for r in rows)
  bs = [{k: jnp.asarray(v) for k, v in ts.to_batch([r], n_spans, o).items()} for r in rows]
  slots = [np.flatnonzero((s["span_local"] == span) & ~s["time_slot"]) for s in samples]

  def velocity(x, t):
    preds = []
    for b, sl in zip(bs, slots):
      x_t = b["x1"].at[0, sl].set(x[0])
      span_t = jnp.ones((1, n_spans)).at[0, span - 1].set(t)
      preds.append(m.apply({"params": params}, {**b, "x_t": x_t, "span_t": span_t}).prediction[0, sl][None])
    return sum(w * p for w, p in zip(weights, preds))

  return velocity


def test_given_noise_and_init_at_a_strength_equal_the_hand_built_euler(model):
  m, params = model
  o = m.cfg.token_features
  sampler = sampling.TunaSampler(m, params, tuna_tiny.TOK)
  rng = np.random.default_rng(7)
  noise, init = (rng.normal(size=(1, 2, 3, o)).astype(np.float32) for _ in range(2))
  cfg = sampling.FlowSamplerConfig(steps=5, guidance=3.0, strength=0.6)
  got = sampler.text_to_image([[10, 11]], (2, 3), cfg, noise=noise, init=init)
  grid = sampling.time_grid(5, 3.0)[2:]            # int((1 - 0.6) * 5) = 2 points dropped, as the reference
  np.testing.assert_array_equal(sampling.start_grid(5, 3.0, 0.6), grid)
  blank = np.zeros((2, 3, o), np.float32)
  velocity = _hand_velocity(m, params, [ts.t2i_sample(p, blank, tuna_tiny.TOK) for p in ([10, 11], [])], 1,
                            flow.text_guidance(3.0))
  x = grid[0] * init.reshape(1, 6, o) + (1 - grid[0]) * noise.reshape(1, 6, o)
  want = flow.euler(velocity, jnp.asarray(x), grid)
  np.testing.assert_allclose(got, np.asarray(want).reshape(got.shape), atol=1e-5)
  # given noise == the noise the seed draws; strength 1 starts from it on the full grid
  drawn = np.asarray(jax.random.normal(jax.random.key(3), (1, 6, o))).reshape(1, 2, 3, o)
  full = dataclasses.replace(cfg, strength=1.0, guidance=1.0)
  np.testing.assert_array_equal(sampler.text_to_image([[10, 11]], (2, 3), full, noise=drawn),
                                sampler.text_to_image([[10, 11]], (2, 3), full, seed=3))


def test_strength_zero_returns_the_init_and_an_edit_starts_from_its_source(model):
  m, params = model
  o = m.cfg.token_features
  sampler = sampling.TunaSampler(m, params, tuna_tiny.TOK)
  src = np.random.default_rng(1).normal(size=(2, 2, o)).astype(np.float32)
  zero = sampling.FlowSamplerConfig(steps=3, guidance=1.0, strength=0.0)
  np.testing.assert_array_equal(sampler.text_to_image([[10]], (2, 2), zero, init=src[None]), src[None])
  np.testing.assert_array_equal(sampler.edit([src], [[18]], zero), src[None])
  other = src[::-1].copy()
  np.testing.assert_array_equal(sampler.edit([src], [[18]], zero, init=other[None]), other[None])
  with pytest.raises(ValueError, match="needs an init image"):
    sampler.text_to_image([[10]], (2, 2), dataclasses.replace(zero, strength=0.5))
  with pytest.raises(ValueError, match="no effect at strength 1"):
    sampler.text_to_image([[10]], (2, 2), dataclasses.replace(zero, strength=1.0), init=src[None])
  with pytest.raises(ValueError, match=r"noise of shape \(1, 2, 3"):
    sampler.text_to_image([[10]], (2, 2), dataclasses.replace(zero, strength=1.0), noise=np.zeros((1, 2, 3, o)))
  with pytest.raises(ValueError, match="strength must be in"):
    sampling.FlowSamplerConfig(strength=1.5)


def test_a_seed_per_request_does_not_depend_on_the_batch(model):
  m, params = model
  sampler = sampling.TunaSampler(m, params, tuna_tiny.TOK)
  cfg = sampling.FlowSamplerConfig(steps=3, guidance=1.0)
  both = sampler.text_to_image([[10, 11], [12]], (2, 2), cfg, seed=[4, 9])
  alone = sampler.text_to_image([[12]], (2, 2), cfg, seed=[9])
  np.testing.assert_allclose(both[1], alone[0], atol=1e-5)
  assert np.abs(sampler.text_to_image([[12]], (2, 2), cfg, seed=[8]) - alone).max() > 1e-3
  with pytest.raises(ValueError, match="2 seeds for 1 requests"):
    sampler.text_to_image([[12]], (2, 2), cfg, seed=[1, 2])
