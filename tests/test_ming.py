"""Ming-Lite-Uni against the golden fixtures of the original code (tests/fixtures/ming_lite_uni/README.md): the
fixture directory converted with our converter, every stored array of cases a (T2I conditioning) and d
(understanding) at the README's tolerances."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm_jax.convert import ming as ming_convert
from unimm_jax.data.qwen_vl import QwenVLImageProcessor, pack_vision
from unimm_jax.layers.rope import rope_angles_mrope
from unimm_jax.models import ming, qwen_vit, qwen_vl

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "ming_lite_uni")
TOL = dict(rtol=1e-4, atol=1e-4)
with open(os.path.join(FIXTURES, "fixture_config.json")) as f:
  CASES = json.load(f)["cases"]


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
  np.testing.assert_array_equal(ming.prompt_ids(tokenizer, CASES["t2i_prompt"]),
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


@pytest.fixture(scope="module")
def edit_image(release):
  cfg, params, _ = release
  c = load("case_c_edit")
  pixels = int(np.prod(c["image_uint8"].shape[:2]))   # the fixture pins min = max pixels to the image's size
  patches, grid = QwenVLImageProcessor(min_pixels=pixels, max_pixels=pixels)(c["image_uint8"])
  return c, patches, grid


def test_edit_vision_tower(release, edit_image):
  cfg, params, _ = release
  c, patches, grid = edit_image
  np.testing.assert_allclose(patches, c["pixel_values"], atol=1e-5)
  assert tuple(grid) == tuple(c["vit_grid_thw"][0])
  packing = pack_vision([grid], merge=cfg.vision.merge, window=cfg.vision.window)
  n = len(patches)
  # our rows are in the reference's window order: window_index permutes merge groups the same way
  order = packing.source[0, :n]
  np.testing.assert_array_equal(order.reshape(-1, 4)[:, 0] // 4, c["vit_window_index"])
  vision = qwen_vl.VisionInputs.from_packing(packing, patches, 1)
  tower = lambda m, v: m.visual(v.patches, v.positions, v.frame_ids, v.window_ids, return_hidden_states=True)
  out = ming.Ming(cfg).apply({"params": params}, vision, method=tower)
  angles = qwen_vit.vision_rope_angles(vision.positions, cfg.vision.head_dim, cfg.vision.rope_theta)[0, :n]
  inverse = np.argsort(order)
  np.testing.assert_allclose(np.asarray(angles)[inverse], c["vit_rot_pos_emb"], atol=5e-5)
  np.testing.assert_allclose(out.hidden_states[0][0, :n][inverse], c["vit_patch_embed"], **TOL)
  for i in range(cfg.vision.depth):
    np.testing.assert_allclose(out.hidden_states[i + 1][0, :n], c[f"vit_block{i}_out"], **TOL)
  np.testing.assert_allclose(out.pooler_output[0, :n // 4], c["vit_merger_out_window_order"], **TOL)
  np.testing.assert_allclose(packing.unpack(np.asarray(out.pooler_output)), c["vit_out"], **TOL)
  feats = ming.Ming(cfg).apply({"params": params}, vision, method="image_features")
  np.testing.assert_allclose(feats, c["linear_proj_out"], **TOL)
  np.testing.assert_allclose(ming.l2_normalize(feats), c["image_embeds_l2"], **TOL)


def test_edit_conditioning(release, edit_image):
  cfg, params, tokenizer = release
  c, patches, grid = edit_image
  slots = ming.image_slots(grid, cfg.vision.merge)
  ids = ming.prompt_ids(tokenizer, CASES["edit_prompt"], image_slots=slots)
  np.testing.assert_array_equal(ids, c["prompt_input_ids"])
  ids = ming.expand_generation(ids, cfg)
  np.testing.assert_array_equal(ids, c["expanded_input_ids"])
  inputs = ming.prepare(np.asarray([ids]), cfg, pixel_values=patches, image_grid_thw=[grid])
  np.testing.assert_array_equal(np.asarray(inputs["positions"])[0].T, c["position_ids"][:, 0])
  np.testing.assert_array_equal(np.asarray(inputs["query_index"])[0], c["query_slot_index"])
  np.testing.assert_array_equal(np.flatnonzero(np.asarray(ids) == cfg.image_token_id)[:slots], c["image_slot_index"])
  out = jax.jit(lambda p, i, kw: ming.Ming(cfg).apply({"params": p}, i, **kw))(params, jnp.asarray([ids]), inputs)
  np.testing.assert_allclose(out["hidden"][0], c["llm_last_hidden_at_queries"], **TOL)
  for s in cfg.scales:
    k = f"{s}x{s}"
    np.testing.assert_allclose(out[k]["connector"][0], c[f"connector_out_{k}"], **TOL)
    np.testing.assert_allclose(np.linalg.norm(out[k]["proj_out"][0], axis=-1), c[f"proj_out_l2norm_{k}"], **TOL)
    np.testing.assert_allclose(out[k]["cond"][0], c[f"cond_{k}"], **TOL)
    np.testing.assert_allclose(out[k]["caption"][0], c[f"sampling_mlp_out_cond_{k}"], **TOL)
  np.testing.assert_allclose(out["4x4"]["proj_out"][0], c["proj_out_4x4"], **TOL)
