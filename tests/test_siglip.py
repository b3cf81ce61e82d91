"""SigLIP / SigLIP2 vision towers: parity with transformers (fp32), NaFlex, packing, conversion, layouts."""

import dataclasses
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import hf_tiny
from annotations import assert_every_param_annotated
from unimm_jax import registry
from unimm_jax.convert.family import abstract_params
import unimm_jax
from unimm_jax import checkpoint, sharding
from unimm_jax.convert import engine, hf
from unimm_jax.convert import transforms as T
from unimm_jax.convert.errors import ConversionError
from unimm_jax.convert.maps import siglip as siglip_map
from unimm_jax.data import vision
from unimm_jax.models import siglip

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)


def hf_siglip(patch=4, image=16, **kw) -> transformers.SiglipVisionModel:
  torch.manual_seed(0)
  cfg = transformers.SiglipVisionConfig(**{**TINY, **kw}, patch_size=patch, image_size=image)
  return hf_tiny._randomize(transformers.SiglipVisionModel(cfg).eval())


def hf_siglip2(patch=4, num_patches=16, **kw) -> transformers.Siglip2VisionModel:
  torch.manual_seed(0)
  cfg = transformers.Siglip2VisionConfig(**{**TINY, **kw}, patch_size=patch, num_patches=num_patches)
  return hf_tiny._randomize(transformers.Siglip2VisionModel(cfg).eval())


def convert(ref, cfg=None):
  """Our config and params for a transformers model, through our converter."""
  fam = hf.family_for_model_type(ref.config.model_type, "test")
  cfg = cfg or siglip.config_from_hf(ref.config)
  state = {k: (lambda v=v: v.detach().numpy()) for k, v in ref.state_dict().items()}
  abstract = engine.flatten(abstract_params(fam, cfg))
  return cfg, engine.unflatten(engine.convert(state, fam.rules(cfg), abstract, ignore=fam.ignore(cfg)))


def nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def close(ours, ref, **kw):
  np.testing.assert_allclose(np.asarray(ours), ref.detach().numpy() if hasattr(ref, "detach") else ref,
                             atol=1e-4, rtol=0, **kw)


@pytest.mark.parametrize("patch,image", [(4, 16), (7, 30)])  # 30 = 4 patches of 7 + 2 dropped px
def test_siglip_hidden_states_and_pooled_output_match_transformers_fp32(patch, image):
  ref = hf_siglip(patch, image)
  cfg, params = convert(ref)
  pixels = np.random.default_rng(0).normal(size=(2, image, image, 3)).astype(np.float32)
  out = siglip.VisionTransformer(cfg).apply({"params": params}, jnp.asarray(pixels), return_hidden_states=True)
  with torch.no_grad():
    r = ref(nchw(pixels), output_hidden_states=True)
  close(out.last_hidden_state, r.last_hidden_state)
  close(out.pooler_output, r.pooler_output)
  assert len(out.hidden_states) == len(r.hidden_states) == 3
  for ours_h, ref_h in zip(out.hidden_states, r.hidden_states):
    close(ours_h, ref_h)


def test_siglip_other_resolutions_match_interpolate_pos_encoding():
  ref = hf_siglip(4, 16)
  cfg, params = convert(ref)
  rng = np.random.default_rng(1)
  for height, width in [(20, 12), (8, 28)]:  # the 4x4 table resized to 5x3 and 2x7
    pixels = rng.normal(size=(1, height, width, 3)).astype(np.float32)
    out = siglip.VisionTransformer(cfg).apply({"params": params}, jnp.asarray(pixels))
    with torch.no_grad():
      r = ref(nchw(pixels), interpolate_pos_encoding=True)
    close(out.last_hidden_state, r.last_hidden_state, err_msg=f"{height}x{width}")
    close(out.pooler_output, r.pooler_output)


def test_feature_layer_minus_2_without_post_norm_and_head_equals_hf_hidden_states():
  ref = hf_siglip(4, 16, num_hidden_layers=3)
  cfg = dataclasses.replace(siglip.config_from_hf(ref.config), feature_layer=-2, post_layernorm=False,
                            use_head=False)
  cfg, params = convert(ref, cfg)  # layer 2, post_layernorm and head are IGNOREd, not built
  assert cfg.num_layers == 2 and sorted(params) == ["layers_0", "layers_1", "patch_embedding", "position_embedding"]
  pixels = np.random.default_rng(2).normal(size=(2, 16, 16, 3)).astype(np.float32)
  out = siglip.VisionTransformer(cfg).apply({"params": params}, jnp.asarray(pixels))
  with torch.no_grad():
    r = ref(nchw(pixels), output_hidden_states=True)
  close(out.last_hidden_state, r.hidden_states[-2])
  assert out.pooler_output is None


def test_tuna_shaped_1x1_stem_over_latents_with_bicubic_table_matches_transformers():
  """TUNA: 1x1 conv over 48-channel latents, table bicubically resized to the latent grid, hidden_states[-2]."""
  ref = hf_siglip(1, 4, num_channels=48, num_hidden_layers=3)
  cfg = dataclasses.replace(siglip.config_from_hf(ref.config), feature_layer=-2, post_layernorm=False,
                            use_head=False)
  cfg, params = convert(ref, cfg)
  assert params["patch_embedding"]["kernel"].shape == (1, 1, 48, 64)
  latents = np.random.default_rng(8).normal(size=(2, 6, 5, 48)).astype(np.float32)
  out = siglip.VisionTransformer(cfg).apply({"params": params}, jnp.asarray(latents))
  with torch.no_grad():
    r = ref(nchw(latents), interpolate_pos_encoding=True, output_hidden_states=True)
  close(out.last_hidden_state, r.hidden_states[-2])


def test_injected_stem_replaces_the_patch_embedding():
  class FlatStem(nn.Module):  # e.g. a stem with its own layout: one Dense over flattened patches
    @nn.compact
    def __call__(self, x):
      return nn.Dense(64, name="proj")(x.reshape(*x.shape[:2], -1))

  model = siglip.VisionTransformer(siglip.SiglipVisionConfig.tiny(), stem=FlatStem)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  assert variables["params"]["patch_embedding"]["proj"]["kernel"].shape == (48, 64)
  assert model.apply(variables, jnp.ones((2, 12, 8, 3))).last_hidden_state.shape == (2, 6, 64)


def naflex_batch(shapes, max_patches, dim, seed=0):
  rng = np.random.default_rng(seed)
  patches = np.zeros((len(shapes), max_patches, dim), np.float32)
  mask = np.zeros((len(shapes), max_patches), np.int32)
  for i, (h, w) in enumerate(shapes):
    patches[i, : h * w] = rng.normal(size=(h * w, dim))
    mask[i, : h * w] = 1
  return patches, mask, np.asarray(shapes, np.int32)


@pytest.mark.parametrize("patch", [4, 6])
def test_siglip2_naflex_mixed_aspect_ratios_with_padding_match_transformers_fp32(patch):
  ref = hf_siglip2(patch, num_patches=16)
  cfg, params = convert(ref)
  assert cfg.posemb_resize == "bilinear_antialias" and cfg.posemb_grid == 4
  shapes = [(3, 5), (2, 7), (6, 3), (4, 4)]  # 15, 14, 18, 16 real patches of 20
  patches, mask, spatial = naflex_batch(shapes, 20, patch * patch * 3)
  out = siglip.VisionTransformer(cfg).apply(
      {"params": params}, patches=jnp.asarray(patches), spatial_shapes=jnp.asarray(spatial[:, None]),
      segment_ids=jnp.asarray(mask), return_hidden_states=True)
  with torch.no_grad():
    r = ref(torch.from_numpy(patches), torch.from_numpy(mask), torch.from_numpy(spatial), output_hidden_states=True)
  valid = mask.astype(bool)
  close(np.asarray(out.last_hidden_state)[valid], r.last_hidden_state.numpy()[valid])
  assert not np.asarray(out.last_hidden_state)[~valid].any()
  close(out.pooler_output[:, 0], r.pooler_output)
  for ours_h, ref_h in zip(out.hidden_states, r.hidden_states, strict=True):
    close(np.asarray(ours_h)[valid], ref_h.numpy()[valid])


@pytest.mark.parametrize("family", ["siglip", "siglip2"])
def test_packed_row_of_5_images_equals_each_image_encoded_alone(family):
  ref = hf_siglip(4, 16) if family == "siglip" else hf_siglip2(4, 16)
  cfg, params = convert(ref)
  shapes = [(3, 5), (2, 7), (4, 4), (1, 6), (5, 2)]  # 61 patches in a row of 64
  rng = np.random.default_rng(3)
  images = [rng.normal(size=(h * 4, w * 4, 3)).astype(np.float32) for h, w in shapes]
  rows, skipped = vision.pack_patches([(vision.to_patches(im, 4), hw) for im, hw in zip(images, shapes)], 64, 5)
  assert skipped == 0 and len(rows) == 1
  row = {k: jnp.asarray(v[None]) for k, v in rows[0].items()}
  out = siglip.VisionTransformer(cfg).apply(
      {"params": params}, patches=row["patches"], spatial_shapes=row["spatial_shapes"],
      segment_ids=row["segment_ids"], positions=row["positions"])
  seg = rows[0]["segment_ids"]
  for i, (image, (h, w)) in enumerate(zip(images, shapes)):
    with torch.no_grad():
      if family == "siglip":
        r = ref(nchw(image[None]), interpolate_pos_encoding=True)
      else:
        r = ref(torch.from_numpy(vision.to_patches(image, 4)[None]), torch.ones(1, h * w, dtype=torch.int32),
                torch.tensor([[h, w]]))
    close(np.asarray(out.last_hidden_state)[0, seg == i + 1], r.last_hidden_state[0], err_msg=f"image {i}")
    close(out.pooler_output[0, i], r.pooler_output[0], err_msg=f"image {i}")
  assert not np.asarray(out.last_hidden_state)[0, seg == 0].any()


@pytest.mark.parametrize("method", ["bicubic", "bilinear_antialias"])
def test_position_table_resize_equals_torch_interpolate(method):
  table = np.random.default_rng(4).normal(size=(5, 5, 8)).astype(np.float32)
  src = torch.from_numpy(table).permute(2, 0, 1)[None]
  for h, w in [(7, 3), (2, 9), (1, 1)]:  # up, down and mixed per axis, degenerate
    kw = dict(mode="bicubic") if method == "bicubic" else dict(mode="bilinear", antialias=True)
    want = torch.nn.functional.interpolate(src, size=(h, w), align_corners=False, **kw)[0].permute(1, 2, 0)
    close(siglip.resize_position_embeddings(jnp.asarray(table), (h, w), method), want, err_msg=f"{h}x{w}")
    yx = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1)
    per_token = siglip.position_embeddings_at(jnp.asarray(table), jnp.asarray(yx), jnp.full((h, w, 2), jnp.array([h, w])), method)
    close(per_token, want)


@pytest.mark.parametrize("model_type", ["siglip", "siglip2"])
def test_full_image_text_checkpoint_loads_vision_tower_only(tmp_path, model_type):
  vision_cfg = dict(TINY, patch_size=4, **({"image_size": 16} if model_type == "siglip" else {"num_patches": 16}))
  text_cfg = dict(TINY, vocab_size=64, max_position_embeddings=16, bos_token_id=1, eos_token_id=2)
  cls = {"siglip": (transformers.SiglipConfig, transformers.SiglipModel),
         "siglip2": (transformers.Siglip2Config, transformers.Siglip2Model)}[model_type]
  torch.manual_seed(0)
  full = hf_tiny._randomize(cls[1](cls[0](vision_config=vision_cfg, text_config=text_cfg)).eval())
  full.save_pretrained(tmp_path / "hf")
  # Hub SigLIP directories carry the text tower's sentencepiece tokenizer; the vision tower must not need it.
  (tmp_path / "hf" / "tokenizer_config.json").write_text('{"tokenizer_class": "SiglipTokenizer"}')
  (tmp_path / "hf" / "spiece.model").write_bytes(b"")
  loaded = unimm_jax.load(str(tmp_path / "hf"))
  assert loaded.family == model_type and loaded.tokenizer is None
  assert not any(k.startswith("text") for k in engine.flatten(loaded.params))
  pixels = np.random.default_rng(5).normal(size=(2, 16, 16, 3)).astype(np.float32)
  if model_type == "siglip":
    out = loaded.module.apply({"params": loaded.params}, jnp.asarray(pixels))
    with torch.no_grad():
      r = full.vision_model(nchw(pixels))
  else:
    patches = np.stack([vision.to_patches(p, 4) for p in pixels])
    out = loaded.module.apply({"params": loaded.params}, patches=jnp.asarray(patches),
                              spatial_shapes=jnp.full((2, 1, 2), 4))
    with torch.no_grad():
      r = full.vision_model(torch.from_numpy(patches), torch.ones(2, 16, dtype=torch.int32), torch.full((2, 2), 4))
  close(out.last_hidden_state, r.last_hidden_state)
  close(out.pooler_output.reshape(2, -1), r.pooler_output)


def test_convert_load_export_round_trip_through_transformers(tmp_path):
  ref = hf_siglip(4, 16)
  ref.save_pretrained(tmp_path / "hf")
  hf.convert_to_orbax(str(tmp_path / "hf"), str(tmp_path / "ours"))
  loaded = unimm_jax.load(str(tmp_path / "ours"), scan_layers=True, remat="full")
  pixels = np.random.default_rng(6).normal(size=(1, 16, 16, 3)).astype(np.float32)
  out = loaded.module.apply({"params": loaded.params}, jnp.asarray(pixels))
  with torch.no_grad():
    close(out.pooler_output, ref(nchw(pixels)).pooler_output)
  hf.export_to_hf(str(tmp_path / "ours"), str(tmp_path / "back"))
  back = transformers.SiglipVisionModel.from_pretrained(tmp_path / "back").eval()
  want = ref.state_dict()
  for k, v in back.state_dict().items():
    np.testing.assert_array_equal(v.numpy(), want[k].numpy(), err_msg=k)


def test_fused_in_proj_split_must_read_every_slice():
  ref = hf_siglip(4, 16)
  cfg = siglip.config_from_hf(ref.config)
  state = {k: (lambda v=v: v.detach().numpy()) for k, v in ref.state_dict().items()}
  abstract = engine.flatten(abstract_params(registry.family("siglip"), cfg))
  no_v = tuple(r for r in siglip_map.RULES_SIGLIP if not r[1].startswith("head/attention/v_proj"))
  with pytest.raises(ConversionError, match=r"in_proj_weight'.*slices \[0, 1\] of 3"):
    engine.convert(state, no_v, abstract, ignore=siglip_map.ignore(cfg))
  params = engine.convert(state, siglip_map.RULES_SIGLIP, abstract, ignore=siglip_map.ignore(cfg))
  back = engine.export(params, siglip_map.RULES_SIGLIP)
  np.testing.assert_array_equal(back["head.attention.in_proj_weight"], state["head.attention.in_proj_weight"]())
  del params["head/attention/k_proj/bias"]
  with pytest.raises(ConversionError, match=r"in_proj_bias': slices \[0, 2\] of 3 present"):
    engine.export(params, siglip_map.RULES_SIGLIP)
  with pytest.raises(ConversionError, match="does not split into 3 equal parts"):
    engine.convert({**state, "head.attention.in_proj_bias": lambda: np.zeros(7, np.float32)},
                   siglip_map.RULES_SIGLIP, abstract, ignore=siglip_map.ignore(cfg))
  assert T.part(2, 3).part == (0, 2, 3)


def test_scan_remat_and_bf16_layouts_agree():
  cfg = siglip.SiglipVisionConfig.tiny()
  pixels = jnp.asarray(np.random.default_rng(7).normal(size=(2, 16, 16, 3)), jnp.float32)
  params = nn.meta.unbox(siglip.VisionTransformer(cfg).init(jax.random.key(0), pixels)["params"])
  want = siglip.VisionTransformer(cfg).apply({"params": params}, pixels, return_hidden_states=True)
  scanned = checkpoint.stack_layers(params, cfg.depth)
  scan_cfg = dataclasses.replace(cfg, scan_layers=True, remat="full")
  got = siglip.VisionTransformer(scan_cfg).apply({"params": scanned}, pixels, return_hidden_states=True)
  np.testing.assert_allclose(got.last_hidden_state, want.last_hidden_state, atol=1e-5)
  np.testing.assert_allclose(got.hidden_states[1], want.hidden_states[1], atol=1e-5)
  bf16 = siglip.VisionTransformer(dataclasses.replace(cfg, dtype="bfloat16")).apply({"params": params}, pixels)
  assert bf16.last_hidden_state.dtype == jnp.bfloat16
  assert float(jnp.max(jnp.abs(bf16.pooler_output.astype(jnp.float32) - want.pooler_output))) < 0.1


@pytest.mark.parametrize("scan", [False, True])
def test_every_param_is_annotated_and_fsdp_replicates_under_2_percent(scan):
  cfg = siglip.SiglipVisionConfig.so400m(scan_layers=scan)
  boxed = jax.eval_shape(siglip.VisionTransformer(cfg).init, jax.random.key(0), jnp.zeros((1, 14, 14, 3)))["params"]
  assert_every_param_annotated(boxed, scan)
  mesh = jax.make_mesh((1, 8, 1), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  shardings = sharding.logical_shardings(boxed, mesh)
  assert sharding.replicated_fraction(nn.meta.unbox(boxed), shardings) <= 0.02


def test_config_from_hf_reads_every_layout_and_rejects_bad_ones():
  so400m = {"model_type": "siglip", "vision_config": dict(
      hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, image_size=384,
      patch_size=14), "text_config": {}}
  assert siglip.config_from_hf(so400m) == siglip.SiglipVisionConfig.so400m()
  naflex = siglip.config_from_hf({"model_type": "siglip2_vision_model", "num_patches": 256})
  assert (naflex.posemb_grid, naflex.posemb_resize) == (16, "bilinear_antialias")
  with pytest.raises(ValueError, match="unsupported model_type 'clip'"):
    siglip.config_from_hf({"model_type": "clip"})
  with pytest.raises(ValueError, match="num_patches 200 is not a square"):
    siglip.config_from_hf({"model_type": "siglip2_vision_model", "num_patches": 200})
  with pytest.raises(ValueError, match="selects 0 of 2 layers"):
    siglip.SiglipVisionConfig.tiny(feature_layer=-3)
  with pytest.raises(ValueError, match="unknown fields"):
    siglip.SiglipVisionConfig.from_dict({"bogus": 1})
  with pytest.raises(ValueError, match="exactly one of pixels and patches"):
    siglip.VisionTransformer(siglip.SiglipVisionConfig.tiny()).init(jax.random.key(0))


@pytest.mark.slow   # ~25 s: a benchmark's smoke run
def test_bench_vision_script_runs_on_tiny_settings():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  r = subprocess.run([sys.executable, "scripts/bench_vision.py", "--tiny", "--models", "siglip,internvl"], cwd=root,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "SigLIP fixed resolution: unimm-jax fp32 / transformers fp32" in r.stdout and "packed / padded" in r.stdout
  # the InternVL cases of the same script (tests/test_internvl.py has the model)
  assert "InternViT tiles: unimm-jax fp32 / transformers fp32" in r.stdout
  assert "greedy tokens identical: True" in r.stdout
