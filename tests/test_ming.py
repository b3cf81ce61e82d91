"""Ming-Lite-Uni against the golden fixtures of the original code (tests/fixtures/ming_lite_uni/README.md): the
fixture directory converted with our converter, every stored array of cases a (T2I conditioning) and d
(understanding) at the README's tolerances."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm_jax.convert import ming as ming_convert
from unimm_jax.layers.rope import rope_angles_mrope
from unimm_jax.models import ming

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "ming_lite_uni")
TOL = dict(rtol=1e-4, atol=1e-4)


def load(case: str) -> dict:
  with np.load(os.path.join(FIXTURES, f"{case}.npz")) as z:
    return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def release():
  cfg, params = ming_convert.convert_release(FIXTURES)
  tokenizer = ming_convert.with_ming_tokens(
      __import__("transformers").AutoTokenizer.from_pretrained(os.path.join(FIXTURES, "qwen2_5_llm")))
  return cfg, jax.tree.map(jnp.asarray, params), tokenizer


@pytest.fixture(scope="module")
def conditioning(release):
  cfg, params, tokenizer = release
  a = load("case_a_t2i_conditioning")
  ids = ming.expand_generation(a["prompt_input_ids"].tolist(), cfg)
  inputs = ming.prepare(np.asarray([ids]), cfg)
  out = jax.jit(lambda p, i, kw: ming.Ming(cfg).apply({"params": p}, i, **kw))(params, jnp.asarray([ids]), inputs)
  return a, ids, inputs, out


def test_config_from_release(release):
  cfg, _, tokenizer = release
  assert (cfg.image_token_id, cfg.image_start_token_id, cfg.image_end_token_id, cfg.eos_token_id) == (194, 195, 196, 178)
  assert cfg.scales == (4, 8, 16) and cfg.text.mrope_sections == (16, 24, 24)
  assert (cfg.mlp_hidden, cfg.caption_channels, cfg.connector.embed) == (96, 48, 64)
  assert len(tokenizer) == 213


def test_t2i_layout_and_positions(release, conditioning):
  cfg, _, tokenizer = release
  a, ids, inputs, _ = conditioning
  np.testing.assert_array_equal(ids, a["expanded_input_ids"])
  np.testing.assert_array_equal(np.asarray(inputs["positions"])[0].T, a["position_ids"][:, 0])
  np.testing.assert_array_equal(np.asarray(inputs["query_index"])[0], a["query_slot_index"])
  grids = [(1, 2, 2 * s * s) for s in cfg.scales]
  np.testing.assert_array_equal(grids, a["image_grid_thw"])
  np.testing.assert_array_equal(ming.prompt_ids(tokenizer, str(a["prompt_text"]).split("user\n")[1].split("<|im_end|>")[0]),
                                a["prompt_input_ids"])
  pieces = np.concatenate([a[f"piece_{n}_ids"] for n in ("system_prefix", "user_prefix", "question", "assistant_prefix",
                                                          "generate_prefix")])
  np.testing.assert_array_equal(pieces, a["prompt_input_ids"])


def test_t2i_rope_tables(release, conditioning):
  cfg, _, _ = release
  a, _, inputs, _ = conditioning
  sel = a["sel_index"]
  angles = rope_angles_mrope(inputs["positions"][:, sel], cfg.text.head_dim, cfg.text.rope_theta,
                             cfg.text.mrope_sections)[0]
  emb = np.concatenate([np.asarray(angles)] * 2, axis=-1)
  np.testing.assert_allclose(np.cos(emb), a["llm_rope_cos_at_sel"], atol=5e-5)
  np.testing.assert_allclose(np.sin(emb), a["llm_rope_sin_at_sel"], atol=5e-5)


def test_t2i_conditioning(release, conditioning):
  a, _, _, out = conditioning
  np.testing.assert_allclose(out["hidden"][0], a["llm_last_hidden_at_queries"], **TOL)
  for s in (4, 8, 16):
    k = f"{s}x{s}"
    np.testing.assert_allclose(out[k]["connector"][0], a[f"connector_out_{k}"], **TOL)
    np.testing.assert_allclose(np.linalg.norm(out[k]["proj_out"][0], axis=-1), a[f"proj_out_l2norm_{k}"], **TOL)
    np.testing.assert_allclose(out[k]["cond"][0], a[f"cond_{k}"], **TOL)
  np.testing.assert_allclose(out["4x4"]["proj_out"][0], a["proj_out_4x4"], **TOL)
