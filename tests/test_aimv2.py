"""AIMv2 vision tower: parity with transformers' Aimv2VisionModel (fp32; learned and native sin-cos positions,
the attention-pooling head), conversion and export, and the NaViT options of Ovis-U1 (packed rows, per-image
position tables, 2D RoPE, windows) -- checked against torch's F.interpolate, transformers' Qwen2.5-VL vision
blocks (Ovis-U1's windows and RoPE are Qwen2.5-VL's) and the model's own fixed-resolution path; Ovis-U1's own
code is not a pip reference."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

import hf_tiny
from annotations import assert_every_param_annotated
import unimm_jax
from unimm_jax import checkpoint, registry
from unimm_jax.convert import engine, hf
from unimm_jax.convert.family import abstract_params
from unimm_jax.convert.maps import qwen_vl as qwen_vl_map
from unimm_jax.data import qwen_vl as data_vl
from unimm_jax.models import aimv2, qwen_vit

TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=16,
            patch_size=4)


def hf_aimv2(**kw) -> transformers.Aimv2VisionModel:
  torch.manual_seed(0)
  return hf_tiny._randomize(transformers.Aimv2VisionModel(transformers.Aimv2VisionConfig(**{**TINY, **kw})).eval())


def convert(ref, cfg=None):
  fam = registry.family("aimv2")
  cfg = cfg or aimv2.config_from_hf(ref.config)
  state = {k: (lambda v=v: v.detach().numpy()) for k, v in ref.state_dict().items()}
  abstract = engine.flatten(abstract_params(fam, cfg))
  return cfg, engine.unflatten(engine.convert(state, fam.rules(cfg), abstract, ignore=fam.ignore(cfg)))


def init(module, size):
  return nn.meta.unbox(jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, size, size, 3)))["params"])


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def close(ours, ref):
  np.testing.assert_allclose(np.asarray(ours), ref.detach().numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("native,bias,size", [(False, False, (16, 16)), (False, True, (16, 16)),
                                              (True, True, (20, 12))])
def test_outputs_hidden_states_and_head_match_transformers_fp32(native, bias, size):
  ref = hf_aimv2(is_native=native, qkv_bias=bias, mlp_bias=bias)
  cfg, params = convert(ref)
  assert cfg.posemb == ("sincos" if native else "learned") and cfg.qkv_bias == bias
  px = np.random.default_rng(0).normal(size=(2, *size, 3)).astype(np.float32)
  out = aimv2.Aimv2VisionModel(cfg).apply({"params": params}, jnp.asarray(px), return_hidden_states=True)
  with torch.no_grad():
    r = ref(nchw(px), output_hidden_states=True)
  close(out.last_hidden_state, r.last_hidden_state)
  close(out.pooler_output, r.pooler_output)
  assert len(out.hidden_states) == len(r.hidden_states) == cfg.depth + 1
  for ours_h, ref_h in zip(out.hidden_states, r.hidden_states):
    close(ours_h, ref_h)


def test_full_aimv2_checkpoint_loads_and_exports_bit_exact(tmp_path):
  text = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4)
  torch.manual_seed(0)
  full = hf_tiny._randomize(transformers.Aimv2Model(transformers.Aimv2Config(
      vision_config=dict(TINY), text_config=text)).eval())
  full.save_pretrained(tmp_path / "full")
  loaded = unimm_jax.load(str(tmp_path / "full"))
  assert loaded.family == "aimv2" and loaded.tokenizer is None
  px = np.random.default_rng(1).normal(size=(1, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    want = full.vision_model(nchw(px)).last_hidden_state
  close(loaded.module.apply({"params": loaded.params}, jnp.asarray(px)).last_hidden_state, want)
  ref = hf_aimv2(qkv_bias=True, mlp_bias=True)
  ref.save_pretrained(tmp_path / "vision")
  hf.convert_to_orbax(str(tmp_path / "vision"), str(tmp_path / "ours_v"))
  hf.export_to_hf(str(tmp_path / "ours_v"), str(tmp_path / "back"))
  hf_tiny.assert_same_weights(str(tmp_path / "vision"), str(tmp_path / "back"))
  again = transformers.Aimv2VisionModel.from_pretrained(tmp_path / "back").eval()
  with torch.no_grad():
    np.testing.assert_array_equal(again(nchw(px)).last_hidden_state.numpy(), ref(nchw(px)).last_hidden_state.numpy())


# ---------------------------------------------------------------------------------------------- NaViT options

def test_position_table_resizing_equals_torch_interpolate():
  cfg = aimv2.Aimv2VisionConfig.tiny(use_head=False)
  table = np.random.default_rng(0).normal(size=(16, cfg.embed)).astype(np.float32)   # a 4 x 4 grid
  params = {"position_embedding": table}
  for h, w in [(3, 7), (6, 5), (9, 2)]:
    rows, cols = np.divmod(np.arange(h * w), w)
    sizes = np.broadcast_to(np.array([h, w]), (h * w, 2))
    grid = torch.from_numpy(table.reshape(4, 4, -1).copy()).permute(2, 0, 1)[None]
    want = {"two_dim": F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)[0]
            .permute(1, 2, 0).reshape(h * w, -1),
            "one_dim": F.interpolate(torch.from_numpy(table.T)[None], size=h * w, mode="linear",
                                     align_corners=False)[0].T}
    for method, ref in want.items():
      m = aimv2.Aimv2VisionModel(dataclasses.replace(cfg, posemb_resize=method))
      got = m.apply({"params": params}, rows, cols, jnp.asarray(sizes), method=aimv2.Aimv2VisionModel._positions)
      np.testing.assert_allclose(got, ref.numpy(), atol=1e-5, rtol=0)


def test_packed_rows_equal_each_image_alone_at_fixed_resolution():
  cfg = aimv2.Aimv2VisionConfig.tiny(use_head=False, posemb_resize="two_dim", patch=14, image_size=56)
  module = aimv2.Aimv2VisionModel(cfg)
  params = init(module, 56)
  rng = np.random.default_rng(0)
  images = [rng.normal(size=(h * 14, w * 14, 3)).astype(np.float32) for h, w in [(4, 6), (6, 4)]]
  grids = [(1, im.shape[0] // 14, im.shape[1] // 14) for im in images]
  flat = np.concatenate([data_vl.patchify(im, 14, 2, 1) for im in images])  # Qwen2-VL order, temporal patch 1
  packing = data_vl.pack_vision(grids, merge=2, window=0)   # both images in one row
  out = jax.jit(lambda p, *a: module.apply({"params": p}, patches=a[0], positions=a[1], frame_sizes=a[2],
                                            frame_ids=a[3]).last_hidden_state)(
      params, packing.rows(flat), packing.positions, packing.frame_sizes, packing.frame_ids)
  alone_fn = jax.jit(lambda p, x: module.apply({"params": p}, x).last_hidden_state)
  packed = np.zeros((len(flat), cfg.embed), np.float32)
  packed[packing.source[packing.source >= 0]] = np.asarray(out)[packing.source >= 0]   # processor order
  start = 0
  for im, (_, h, w) in zip(images, grids):
    alone = np.asarray(alone_fn(params, im[None])[0])                                            # raster order
    raster = np.arange(h * w).reshape(h // 2, 2, w // 2, 2).transpose(0, 2, 1, 3).reshape(-1)        # merge order
    np.testing.assert_allclose(packed[start:start + h * w], alone[raster], atol=1e-4, rtol=0)
    start += h * w


def test_rope_and_windows_equal_transformers_qwen2_5_vl_blocks():
  """Ovis-U1's AIMv2 blocks with 2D RoPE and windows (block 1 full) against transformers' Qwen2.5-VL vision
  blocks on the same embeddings: the blocks are shared, this checks the positions and segments AIMv2 feeds."""
  torch.manual_seed(0)
  ref = hf_tiny._randomize(qwen_reference_tower(depth=3, fullatt_block_indexes=[1]))
  cfg = aimv2.Aimv2VisionConfig.tiny(depth=3, use_head=False, patch=14, image_size=56, rope=True, window_size=56,
                                     fullatt_blocks=(1,), qkv_bias=True, mlp_bias=True, norm_eps=1e-6)
  module = aimv2.Aimv2VisionModel(cfg)
  params = init(module, 56)
  state = {k: (lambda v=v: v.detach().numpy()) for k, v in ref.state_dict().items()}
  vcfg = qwen_vit.QwenVisionConfig.tiny(window_size=56, fullatt_blocks=(1,))
  qwen = engine.unflatten(engine.convert(state, qwen_vl_map.VISION_RULES,
                                         engine.flatten(abstract_params(registry.family("qwen_vit"), vcfg))))
  params.update({f"layers_{i}": qwen[f"blocks_{i}"] for i in range(3)})  # the same VisionBlock parameters
  grids = [(1, 12, 20), (1, 4, 6)]
  rng = np.random.default_rng(0)
  flat = rng.normal(size=(sum(h * w for _, h, w in grids), 3 * 14 * 14)).astype(np.float32)
  packing = data_vl.pack_vision(grids, merge=2, window=cfg.window)
  out = jax.jit(lambda p, *a: module.apply({"params": p}, patches=a[0], positions=a[1], frame_sizes=a[2],
                                            frame_ids=a[3], window_ids=a[4], return_hidden_states=True))(
      params, packing.rows(flat), packing.positions, packing.frame_sizes, packing.frame_ids, packing.window_ids)
  n = len(flat)
  g = torch.tensor(grids)
  window_index, cu_windows = get_vision_window_index(g, 2, 56, 14)
  x = torch.from_numpy(np.asarray(out.hidden_states[0])[0, :n])          # our embeddings, already in window order
  cos, sin = ref.rotary_pos_emb(x, get_vision_position_ids(g, 2))
  order = torch.from_numpy((window_index.numpy()[:, None] * 4 + np.arange(4)).reshape(-1))
  with torch.no_grad():
    for i, blk in enumerate(ref.blocks):
      x = blk(x, cu_seqlens=get_vision_cu_seqlens(g) if i == 1 else cu_windows,
              position_embeddings=(cos[order], sin[order]))
      np.testing.assert_allclose(np.asarray(out.hidden_states[i + 1])[0, :n], x.numpy(), atol=1e-4, rtol=0)


def qwen_reference_tower(**kw):
  cfg = transformers.Qwen2_5_VLVisionConfig(**{**hf_tiny.QWEN_VL_VISION_TINY, **kw})
  return transformers.Qwen2_5_VisionTransformerPretrainedModel(cfg).eval()


def test_every_param_is_annotated_and_scan_equals_loop():
  cfg = aimv2.Aimv2VisionConfig.tiny(window_size=8, merge=1, fullatt_blocks=(1,), rope=True)
  scan_cfg = dataclasses.replace(cfg, scan_layers=True)
  for c in (cfg, scan_cfg):
    boxed = jax.eval_shape(aimv2.Aimv2VisionModel(c).init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
    assert_every_param_annotated(boxed, scan=c.scan_layers)
  params = init(aimv2.Aimv2VisionModel(cfg), 16)
  packing = data_vl.pack_vision([(1, 4, 4), (1, 2, 4)], merge=1, window=cfg.window)
  flat = np.random.default_rng(0).normal(size=(24, 48)).astype(np.float32)
  args = dict(patches=jnp.asarray(packing.rows(flat)), positions=jnp.asarray(packing.positions),
              frame_sizes=jnp.asarray(packing.frame_sizes), frame_ids=jnp.asarray(packing.frame_ids), window_ids=jnp.asarray(packing.window_ids))
  def run(c, p):
    module = aimv2.Aimv2VisionModel(dataclasses.replace(c, use_head=False))
    return jax.jit(lambda p, a: module.apply({"params": p}, **a).last_hidden_state)(p, args)
  np.testing.assert_allclose(run(scan_cfg, checkpoint.stack_layers(params, cfg.depth)), run(cfg, params), atol=1e-5,
                             rtol=0)


def test_bad_inputs_are_named():
  cfg = aimv2.Aimv2VisionConfig.tiny()
  module = aimv2.Aimv2VisionModel(cfg)
  params = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"])
  with pytest.raises(ValueError, match=r"pixels \(1, 3, 16, 3\) are not a positive multiple of the patch \(4\)"):
    module.apply({"params": params}, jnp.zeros((1, 3, 16, 3)))
  with pytest.raises(ValueError, match="a 4x8 patch grid for a position table of 4x4"):
    module.apply({"params": params}, jnp.zeros((1, 16, 32, 3)))
  with pytest.raises(ValueError, match="packed patches need positions, frame_ids"):
    aimv2.Aimv2VisionModel(dataclasses.replace(cfg, use_head=False)).apply(
        {"params": params}, patches=jnp.zeros((1, 4, 48)), positions=jnp.zeros((1, 4, 2), jnp.int32))
  with pytest.raises(ValueError, match="packed rows need use_head=False"):
    module.apply({"params": params}, patches=jnp.zeros((1, 4, 48)), positions=jnp.zeros((1, 4, 2), jnp.int32),
                 frame_ids=jnp.ones((1, 4), jnp.int32))
  with pytest.raises(ValueError, match="unsupported model_type 'aimv3'"):
    aimv2.config_from_hf({"model_type": "aimv3"})
  with pytest.raises(ValueError, match="posemb_resize 'cubic' is not one of"):
    aimv2.Aimv2VisionConfig.tiny(posemb_resize="cubic")
