"""Ovis-U1 against the golden numbers of the original remote code (tests/fixtures/ovis_u1, README there): the
release-format directory (nested config.json, sharded safetensors, no lm_head) goes through OUR converter, then
every stored array of cases a (understanding), b (generation condition, refiner), c (one decoder forward),
d (sampling) and e (VAE) is matched at the README's tolerance, max|a - b| <= 1e-4 max|b| + 1e-6."""

from __future__ import annotations

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from unimm_jax import registry
from unimm_jax.convert import hf
from unimm_jax.convert.errors import ConversionError
from unimm_jax.data.qwen_vl import pack_vision
from unimm_jax.layers.modulation import timestep_features
from unimm_jax.layers.rope import rope_angles_axes
from unimm_jax.models import flux, ovis_u1, qwen
from unimm_jax.sampling import flow
from unimm_jax.sampling import ovis_u1 as ovis_sampling
from unimm_jax.models.qwen_vit import vision_rope_angles
from unimm_jax.sampling.text import generate_from_embeddings
from unimm_jax.sampling.vlm import expand_placeholders

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "ovis_u1")
SIDE_FILES = ("config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json")


def close(got, want, what: str) -> None:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
  err, bound = np.max(np.abs(got - want)), 1e-4 * np.max(np.abs(want)) + 1e-6
  assert err <= bound, f"{what}: max|diff| {err:.3g} > {bound:.3g}"


def case(name: str) -> dict[str, np.ndarray]:
  with np.load(os.path.join(FIXTURES, f"case_{name}.npz")) as z:
    return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> str:
  """The fixture weights laid out as a release: two safetensors shards behind an index."""
  root = str(tmp_path_factory.mktemp("ovis_release"))
  weights = load_file(os.path.join(FIXTURES, "weights.safetensors"))
  names = sorted(weights)
  shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
  for file, keys in shards.items():
    save_file({k: weights[k] for k in keys}, os.path.join(root, file))
  with open(os.path.join(root, "model.safetensors.index.json"), "w") as f:
    json.dump({"weight_map": {k: file for file, keys in shards.items() for k in keys}}, f)
  for n in SIDE_FILES:
    shutil.copy(os.path.join(FIXTURES, n), root)
  return root


@pytest.fixture(scope="module")
def converted(release):
  fam, cfg, params = hf.convert_hf(release)
  assert fam.name == "ovis_u1"
  return cfg, jax.tree.map(jnp.asarray, params)


def run_case_a(cfg, params):
  z = case("a_understanding")
  vision, counts = ovis_u1.prepare_vision(z["pixel_values"], z["grid_thws"], cfg)
  ids = np.asarray(expand_placeholders(z["input_ids"], ovis_u1.IMAGE_ATOM_ID, counts, "case a"))[None]
  model = ovis_u1.OvisU1(cfg)
  out, state = jax.jit(lambda i, v: model.apply({"params": params}, i, v, return_hidden_states=True,
                                                capture_intermediates=True, mutable=["intermediates"]))(
      jnp.asarray(ids), vision)
  return z, vision, ids, model, out, state["intermediates"]


def test_config_reads_the_release_format(converted):
  cfg, _ = converted
  assert cfg == ovis_u1.OvisU1Config.tiny()
  with open(os.path.join(FIXTURES, "config.json")) as f:
    d = json.load(f)
  d["visual_tokenizer_config"]["backbone_config"]["fullatt_block_indexes"] = None   # as the 3B release
  assert ovis_u1.config_from_hf(d).vision.window_size == 0                              # every block full
  d["visual_tokenizer_config"]["tokenize_function"] = "gumbel_argmax"
  with pytest.raises(NotImplementedError, match="tokenize_function"):
    ovis_u1.config_from_hf(d)


def test_case_a_understanding_every_array(converted):
  cfg, params = converted
  z, vision, ids, model, out, inter = run_case_a(cfg, params)
  grids = [tuple(g) for g in z["grid_thws"]]
  packing = pack_vision(grids, merge=cfg.vision.merge, window=cfg.vision.window)
  valid = packing.source >= 0
  n = int(valid.sum())

  def merge_order(rows):   # our packed rows (window order) -> the original's merge order [N ...]
    rows = np.asarray(rows)
    flat = np.zeros((n, *rows.shape[2:]), rows.dtype)
    flat[packing.source[valid]] = rows[valid]
    return flat

  def boundaries(segments):   # segment ids of the valid patches -> cu_seqlens
    seg = segments[valid]
    return np.concatenate([[0], np.flatnonzero(np.diff(seg)) + 1, [len(seg)]])

  # packing: window permutation, window and image segments of each block
  np.testing.assert_array_equal(packing.source[valid][::4] // 4, z["vit_window_index"])
  np.testing.assert_array_equal(boundaries(packing.window_ids), np.unique(z["vit_cu_window_seqlens_raw"]))
  for i in range(cfg.vision.depth):
    segments = packing.frame_ids if i in cfg.vision.fullatt_blocks else packing.window_ids
    np.testing.assert_array_equal(boundaries(segments), z[f"vit_block{i}_cu_seqlens"])
  # positions: RoPE angles (merge order, and the cos / sin tables in window order), resized learned table
  angles = np.asarray(vision_rope_angles(jnp.asarray(packing.positions), cfg.vision.head_dim, cfg.vision.rope_theta))
  close(merge_order(angles), z["vit_rot_pos_emb_merge_order"], "vit_rot_pos_emb_merge_order")
  emb = np.concatenate([angles, angles], -1)[valid]
  close(np.cos(emb), z["vit_rope_cos_window_order"], "vit_rope_cos_window_order")
  close(np.sin(emb), z["vit_rope_sin_window_order"], "vit_rope_sin_window_order")
  vt = params["visual_tokenizer"]
  backbone = ovis_u1.Aimv2VisionModel(cfg.vision)
  pos = backbone.apply({"params": vt["backbone"]}, vision.positions[..., 0], vision.positions[..., 1],
                       vision.frame_sizes, method=ovis_u1.Aimv2VisionModel._positions)
  close(merge_order(pos), z["vit_pos_embed_interp_merge_order"], "vit_pos_embed_interp_merge_order")
  # tower
  tower = inter["visual_tokenizer"]["backbone"]
  close(merge_order(tower["patch_embed"]["__call__"][0]), z["vit_conv_out"], "vit_conv_out")
  close(merge_order(tower["patch_norm"]["__call__"][0]), z["vit_patch_embed"], "vit_patch_embed")
  hidden = backbone.apply({"params": vt["backbone"]}, patches=vision.patches, positions=vision.positions,
                          frame_sizes=vision.frame_sizes, frame_ids=vision.frame_ids, window_ids=vision.window_ids,
                          return_hidden_states=True)
  close(merge_order(hidden.hidden_states[0]), z["vit_tokens_with_pe"], "vit_tokens_with_pe")
  close(np.asarray(hidden.hidden_states[1])[valid], z["vit_block0_out_window_order"], "vit_block0_out_window_order")
  close(np.stack([merge_order(h) for h in hidden.hidden_states[1:]]), z["vit_hidden_states"], "vit_hidden_states")
  close(merge_order(hidden.last_hidden_state), z["vit_last_hidden_state_post_norm_unused"], "post_trunk_norm")
  # head, probabilities, embeddings
  head = inter["visual_tokenizer"]
  close(head["head"]["__call__"][0], z["head_linear_out"], "head_linear_out")
  close(head["head_norm"]["__call__"][0], z["head_logits"], "head_logits")
  close(head["__call__"][0], z["visual_tokens"], "visual_tokens")
  close(model.apply({"params": params}, vision, method=ovis_u1.OvisU1.visual_embeds), z["visual_embeds"],
        "visual_embeds")
  v = cfg.visual_vocab
  indicators = model.apply({"params": params}, jnp.asarray([ovis_u1.IMAGE_INDICATOR_IDS]), method=ovis_u1.OvisU1.embed)
  close(indicators[0], z["visual_indicator_embeds"][:4], "visual_indicator_embeds (the ids -301..-304)")
  close(params["vte"][v - 5:], z["visual_indicator_embeds"], "visual_indicator_embeds (vte rows v-5..v-1)")
  close(model.apply({"params": params}, jnp.asarray(ids), vision, method=ovis_u1.OvisU1.embed), z["inputs_embeds"],
        "inputs_embeds")
  np.testing.assert_array_equal((ids == ovis_u1.IMAGE_ATOM_ID).astype(np.int64), z["merged_is_visual"])
  np.testing.assert_array_equal(np.ones(ids.shape, bool), z["merged_attention_mask"])
  # LLM
  close(out.logits, z["llm_logits"], "llm_logits")
  close(np.stack(out.hidden_states), z["llm_hidden_states"], "llm_hidden_states")
  embeds = model.apply({"params": params}, jnp.asarray(ids), vision, method=ovis_u1.OvisU1.embed)
  gen = generate_from_embeddings(qwen.Qwen(cfg.llm), params["llm"], embeds, np.ones(ids.shape, np.int32),
                                 max_new_tokens=z["greedy_new_ids"].shape[1], pad_id=170)
  np.testing.assert_array_equal(gen.tokens, z["greedy_new_ids"])


def test_case_b_generation_condition(converted):
  cfg, params = converted
  z = case("b_t2i_condition")
  model = ovis_u1.OvisU1(cfg)

  @jax.jit
  def run(ids, vision):
    return (model.apply({"params": params}, ids, vision, method=ovis_u1.OvisU1.embed),
            model.apply({"params": params}, ids, vision, method=ovis_u1.OvisU1.condition))

  for branch in ("cond", "uncond"):
    vision, counts = ovis_u1.prepare_vision(z[f"{branch}_pixel_values"], z[f"{branch}_grid_thws"], cfg)
    ids = jnp.asarray(expand_placeholders(z[f"{branch}_input_ids"][0], ovis_u1.IMAGE_ATOM_ID, counts, branch))[None]
    embeds, condition = run(ids, vision)
    close(embeds, z[f"{branch}_inputs_embeds"], f"{branch}_inputs_embeds")
    close(condition, z[f"{branch}_llm_txt_cond"], f"{branch}_llm_txt_cond")
    txt, cls = ovis_u1.yak.TokenRefiner(cfg.generator).apply({"params": params["visual_generator"]["txt_in"]},
                                                             jnp.asarray(z[f"{branch}_llm_txt_cond"]))
    close(txt, z[f"{branch}_refiner_txt"], f"{branch}_refiner_txt")
    close(cls, z[f"{branch}_refiner_cls"], f"{branch}_refiner_cls")


@pytest.mark.parametrize("name", ["t2i", "edit"])
def test_case_c_one_decoder_forward_every_array(converted, name):
  cfg, params = converted
  z = case(f"c_forward_{name}")
  edit = "cond_img" in z
  cond = (jnp.asarray(z["cond_img"]), jnp.asarray(z["cond_img_ids"][0])) if edit else (None, None)
  model = ovis_u1.OvisU1(cfg)
  velocity, state = jax.jit(lambda *a: model.apply(
      {"params": params}, *a, method=ovis_u1.OvisU1.velocity, capture_intermediates=True,
      mutable=["intermediates"]))(jnp.asarray(z["img"]), jnp.asarray(z["img_ids"][0]), jnp.asarray(z["txt"]),
                                  jnp.asarray(z["timesteps"]), *cond)
  got = state["intermediates"]["visual_generator"]
  call = lambda *path: functools.reduce(lambda d, k: d[k], path, got)["__call__"][0]  # noqa: E731
  close(velocity, z["velocity"], "velocity")
  close(timestep_features(jnp.asarray(z["timesteps"]) * 1000, 256), z["timestep_embedding_256"],
        "timestep_embedding_256")
  close(call("img_in"), z["img_in_out"], "img_in_out")
  close(call("time_in"), z["time_in_out"], "time_in_out")
  close(call("txt_in")[0], z["refiner_txt"], "refiner_txt")
  close(call("txt_in")[1], z["refiner_cls"], "refiner_cls")
  close(call("txt_in")[1], z["vector_in_in"], "vector_in_in")
  close(call("vector_in"), z["vector_in_out"], "vector_in_out")
  ids = np.concatenate([z["txt_ids"][0], z["img_ids"][0]] + ([z["cond_img_ids"][0]] if edit else []))
  angles = np.asarray(rope_angles_axes(jnp.asarray(ids), cfg.generator.axes_dims, cfg.generator.rope_theta))
  cos, sin = np.cos(angles), np.sin(angles)
  close(np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)[None, None], z["pe"], "pe")
  close(call("double_blocks_0", "norm1", "linear"), z["db0_img_mod_lin"], "db0_img_mod_lin")
  close(call("double_blocks_0", "norm1_context", "linear"), z["db0_txt_mod_lin"], "db0_txt_mod_lin")
  close(call("double_blocks_0", "attn", "img_o_proj"), z["db0_img_attn_proj"], "db0_img_attn_proj")
  close(call("double_blocks_0", "attn", "txt_o_proj"), z["db0_txt_attn_proj"], "db0_txt_attn_proj")
  close(call("double_blocks_0", "img_self_attn", "o_proj"), z["db0_img_self_attn_proj"], "db0_img_self_attn_proj")
  close(call("double_blocks_0", "ff"), z["db0_img_mlp"], "db0_img_mlp")
  close(call("double_blocks_0", "ff_context"), z["db0_txt_mlp"], "db0_txt_mlp")
  for i in range(cfg.generator.depth):
    close(call(f"double_blocks_{i}")[0][0], z[f"double{i}_img"], f"double{i}_img")
    close(call(f"double_blocks_{i}")[0][1], z[f"double{i}_txt"], f"double{i}_txt")
  close(call("single_blocks_0", "norm", "linear"), z["sb0_mod_lin"], "sb0_mod_lin")
  close(call("single_blocks_0", "proj_out"), z["sb0_linear2"], "sb0_linear2")
  for i in range(cfg.generator.single_depth):
    close(call(f"single_blocks_{i}")[0], z[f"single{i}_out"], f"single{i}_out")
  close(call("final_linear"), z["final_layer_out"], "final_layer_out")


def test_case_e_vae(converted):
  cfg, params = converted
  z = case("e_vae")
  vae = ovis_u1.vae_kl.AutoencoderKL(cfg.vae)
  pixels = np.asarray(z["image_uint8_hwc"], np.float32)[None] / 127.5 - 1
  close(np.transpose(pixels, (0, 3, 1, 2)), z["pixels_nchw"], "pixels_nchw")
  post = jax.jit(lambda x: vae.apply({"params": params["vae"]}, x, method=ovis_u1.vae_kl.AutoencoderKL.encode))(
      jnp.asarray(pixels))
  nchw = lambda x: np.transpose(np.asarray(x), (0, 3, 1, 2))  # noqa: E731
  close(nchw(post.mean), z["posterior_mean"], "posterior_mean")
  close(nchw(post.logvar), z["posterior_logvar"], "posterior_logvar")
  close(nchw(post.std), z["posterior_std"], "posterior_std")
  decoded = jax.jit(lambda x: vae.apply({"params": params["vae"]}, x, method=ovis_u1.vae_kl.AutoencoderKL.decode))(
      jnp.asarray(np.transpose(z["posterior_mean"], (0, 2, 3, 1))))
  close(nchw(decoded), z["decoded_from_mean_nchw"], "decoded_from_mean_nchw")


def test_export_writes_the_release_names_back(converted, release, tmp_path):
  cfg, params = converted
  fam = registry.family("ovis_u1")
  dst = str(tmp_path / "ckpt")
  hf.convert_to_orbax(release, dst)
  hf.export_to_hf(dst, str(tmp_path / "back"))
  back = load_file(str(tmp_path / "back" / fam.weights_file))
  src = load_file(os.path.join(FIXTURES, "weights.safetensors"))
  assert sorted(back) == sorted(src)
  for k, v in src.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_bad_inputs_are_named(converted, release, tmp_path):
  cfg, _ = converted
  with pytest.raises(ValueError, match=r"pixel_values \(16, 500\)"):
    ovis_u1.prepare_vision(np.zeros((16, 500)), [(1, 4, 4)], cfg)
  with pytest.raises(ValueError, match="2 image placeholder"):
    expand_placeholders([-301, -300, -302, -300], ovis_u1.IMAGE_ATOM_ID, [4], "prompt")
  broken = tmp_path / "broken"
  shutil.copytree(release, broken)
  index = json.loads((broken / "model.safetensors.index.json").read_text())
  drop = "visual_tokenizer.head.1.bias"
  shard = index["weight_map"].pop(drop)
  tensors = load_file(str(broken / shard))
  tensors.pop(drop)
  save_file(tensors, str(broken / shard))
  (broken / "model.safetensors.index.json").write_text(json.dumps(index))
  with pytest.raises(ConversionError, match="head_norm/bias"):
    hf.convert_hf(str(broken))


def nhwc(a: np.ndarray) -> jax.Array:
  return jnp.asarray(np.transpose(a, (0, 2, 3, 1)))


def nchw(a) -> np.ndarray:
  return np.transpose(np.asarray(a), (0, 3, 1, 2))


@pytest.mark.slow   # ~20 s for both: the default set of this file already takes ~60 s
@pytest.mark.parametrize("name", ["t2i", "edit"])
def test_case_d_every_sampling_step(converted, name):
  """The whole sampling loop from the injected noise: schedule, every step's latents and branch velocities, the
  final latents, the decoder input and output, the uint8 image (the README's sampling tolerances)."""
  cfg, params = converted
  z = case(f"d_{name}_sampling")
  sampler = ovis_sampling.OvisImageSampler(ovis_u1.OvisU1(cfg), params)
  noise = nhwc(z["noise_nchw"])
  steps, n = z["step_x"].shape[0], z["step_x"].shape[2]
  np.testing.assert_allclose(ovis_sampling.schedule(steps, n, cfg.generator), z["timesteps"], rtol=0, atol=1e-6)
  if name == "t2i":
    branches = [ovis_sampling.Branch(jnp.asarray(z["txt_cond"])), ovis_sampling.Branch(jnp.asarray(z["txt_uncond"]))]
    weights, names = flow.text_guidance(5.0), ("step_v_cond", "step_v_uncond")
  else:
    post = sampler._encode(params, nhwc(z["vae_pixel_values_source"]))
    close(nchw(post.mean), z["vae_cond_posterior_mean"], "vae_cond_posterior_mean")
    close(nchw(post.std), z["vae_cond_posterior_std"], "vae_cond_posterior_std")
    cond = sampler.vae_condition(nhwc(z["vae_pixel_values_source"]), nhwc(z["vae_cond_eps"]))
    close(cond, z["vae_cond_tokens"], "vae_cond_tokens")
    np.testing.assert_array_equal(flux.image_ids(*noise.shape[1:3], frame=1), z["vae_cond_img_ids"][0])
    branches = [ovis_sampling.Branch(jnp.asarray(z[f"{b}_llm_txt_cond"]), c)
                for b, c in (("cond", cond), ("no_txt", cond), ("no_both", None))]
    weights, names = flow.image_text_guidance(6.0, 1.5), ("step_v_full", "step_v_no_txt", "step_v_no_both")
  np.testing.assert_array_equal(flux.image_ids(*noise.shape[1:3]), z["img_ids"][0])
  # the stored schedule (float32 in the original), as the README advises, so the steps compare one to one
  out = sampler.sample(noise, branches, weights, z["timesteps"])
  np.testing.assert_allclose(out.times, z["step_t"], rtol=0, atol=0)
  rel = lambda got, want, what: np.testing.assert_allclose(  # noqa: E731
      got, want, rtol=0, atol=2e-4 * np.max(np.abs(want)), err_msg=what)
  rel(np.stack(out.x), z["step_x"], "step_x")
  for i, key in enumerate(names):
    close(np.stack([v[i] for v in out.velocities]), z[key], key)
  rel(out.final, z["final_latent_tokens"], "final_latent_tokens")
  latent = flux.unpack_latents(out.final, *noise.shape[1:3]) / cfg.vae.scaling_factor
  rel(nchw(latent), z["decoder_input_nchw"], "decoder_input_nchw")
  raw, image = sampler.decode(out.final, *noise.shape[1:3])
  np.testing.assert_allclose(nchw(raw), z["decoder_output_nchw"], rtol=0, atol=2e-4)
  diff = np.abs(image[0].astype(np.int32) - z["final_image_uint8_hwc"])
  assert diff.max() <= 1 and (diff > 0).mean() < 0.01, f"uint8 image: max {diff.max()}, {(diff > 0).sum()} pixels off"
