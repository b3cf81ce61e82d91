"""Qwen decoder parity with transformers (fp32), layouts, packing and annotations."""

import dataclasses

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
from unimm_jax.convert import engine
from unimm_jax.convert.maps import qwen as qwen_map
from unimm_jax.models import qwen


def convert_state_dict(ref, cfg: qwen.QwenConfig, prefixes=None) -> dict:
  state = {k: (lambda v=v: v.detach().numpy()) for k, v in ref.state_dict().items()}
  if prefixes:
    state = {next((new + k[len(old):] for old, new in prefixes.items() if k.startswith(old)), k): v
             for k, v in state.items()}
  abstract = engine.flatten(abstract_params(registry.family("qwen"), cfg))
  return engine.unflatten(engine.convert(state, qwen_map.RULES, abstract, ignore=qwen_map.ignore(cfg)))


def ours_and_ref(ref, ids, **kw):
  cfg = qwen.config_from_hf(ref.config)
  params = convert_state_dict(ref, cfg)
  out = qwen.Qwen(cfg).apply({"params": params}, jnp.asarray(ids), return_hidden_states=True, **kw)
  with torch.no_grad():
    r = ref(torch.from_numpy(np.asarray(ids)), output_hidden_states=True)
  return cfg, params, out, r


IDS = np.random.default_rng(0).integers(0, 211, (2, 13))


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4), (4, 1)])
@pytest.mark.parametrize("tied", [False, True])
def test_qwen2_logits_and_hidden_states_match_transformers_fp32(heads, kv_heads, tied):
  ref = hf_tiny.qwen2(num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tied)
  _, _, out, r = ours_and_ref(ref, IDS)
  np.testing.assert_allclose(out.logits, r.logits.numpy(), atol=1e-4, rtol=0)
  assert len(out.hidden_states) == len(r.hidden_states)
  for ours_h, ref_h in zip(out.hidden_states, r.hidden_states):
    np.testing.assert_allclose(ours_h, ref_h.numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_qwen3_qk_norm_logits_match_transformers_fp32(tied):
  ref = hf_tiny.qwen3(tie_word_embeddings=tied)
  cfg, _, out, r = ours_and_ref(ref, IDS)
  assert cfg.qk_norm and not cfg.qkv_bias and cfg.head_dim == 24
  np.testing.assert_allclose(out.logits, r.logits.numpy(), atol=1e-4, rtol=0)


def test_qwen3_attention_bias_biases_q_k_v_and_o_like_transformers_fp32():
  ref = hf_tiny.qwen3(attention_bias=True)
  assert ref.model.layers[0].self_attn.o_proj.bias is not None
  cfg, params, out, r = ours_and_ref(ref, IDS)
  assert cfg.qkv_bias and cfg.o_bias and cfg.qk_norm
  assert params["layers_0"]["self_attn"]["o_proj"]["bias"].shape == (64,)
  np.testing.assert_allclose(out.logits, r.logits.numpy(), atol=1e-4, rtol=0)
  for ours_h, ref_h in zip(out.hidden_states, r.hidden_states):
    np.testing.assert_allclose(ours_h, ref_h.numpy(), atol=1e-4, rtol=0)


def test_qwen2_5_vl_text_mrope_positions_match_transformers_fp32():
  text_cfg = transformers.Qwen2_5_VLTextConfig(
      **hf_tiny.QWEN_TINY, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
  torch.manual_seed(0)
  ref = hf_tiny._randomize(transformers.Qwen2_5_VLTextModel(text_cfg).eval())
  cfg = qwen.config_from_hf(text_cfg)
  assert cfg.mrope_sections == (2, 3, 3)
  params = convert_state_dict(ref, dataclasses.replace(cfg, tie_embeddings=True), prefixes={"": "model."})
  rng = np.random.default_rng(1)
  pos = np.cumsum(rng.integers(0, 3, (3, 2, 13)), axis=-1)  # distinct t/h/w positions, as for image tokens
  embeds = rng.normal(size=(2, 13, 64)).astype(np.float32)
  out = qwen.Qwen(dataclasses.replace(cfg, tie_embeddings=True)).apply(
      {"params": params}, inputs_embeds=jnp.asarray(embeds), positions=jnp.asarray(pos.transpose(1, 2, 0)))
  with torch.no_grad():
    r = ref(inputs_embeds=torch.from_numpy(embeds), position_ids=torch.from_numpy(pos))
  np.testing.assert_allclose(out.last_hidden_state, r.last_hidden_state.numpy(), atol=1e-4, rtol=0)


def test_packed_row_equals_separate_sequences():
  ref = hf_tiny.qwen2()
  cfg = qwen.config_from_hf(ref.config)
  params = convert_state_dict(ref, cfg)
  model = qwen.Qwen(cfg)
  a, b = IDS[0, :5], IDS[1, :7]
  row = np.concatenate([a, b, [0, 0]])[None]
  seg = np.array([[1] * 5 + [2] * 7 + [0, 0]])
  packed = model.apply({"params": params}, jnp.asarray(row), segment_ids=jnp.asarray(seg)).logits[0]
  alone_a = model.apply({"params": params}, jnp.asarray(a[None])).logits[0]
  alone_b = model.apply({"params": params}, jnp.asarray(b[None])).logits[0]
  np.testing.assert_allclose(packed[:5], alone_a, atol=1e-5, rtol=0)
  np.testing.assert_allclose(packed[5:12], alone_b, atol=1e-5, rtol=0)
  assert np.all(np.isfinite(packed))


def test_inputs_embeds_equal_input_ids():
  cfg = qwen.config_from_hf(hf_tiny.qwen2().config)
  model = qwen.Qwen(cfg)
  params = model.init(jax.random.key(0), jnp.asarray(IDS))["params"]
  by_ids = model.apply({"params": params}, jnp.asarray(IDS)).logits
  embeds = model.apply({"params": params}, jnp.asarray(IDS), method=qwen.Qwen.embed)
  by_embeds = model.apply({"params": params}, inputs_embeds=embeds).logits
  np.testing.assert_array_equal(by_ids, by_embeds)


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scan_and_loop_layouts_give_equal_logits(remat):
  from unimm_jax import checkpoint
  cfg = qwen.config_from_hf(hf_tiny.qwen2().config)
  loop = qwen.Qwen(cfg)
  params = nn.meta.unbox(loop.init(jax.random.key(0), jnp.asarray(IDS))["params"])
  scan_cfg = dataclasses.replace(cfg, scan_layers=True, remat=remat)
  scanned = checkpoint.stack_layers(params, cfg.depth)
  want = loop.apply({"params": params}, jnp.asarray(IDS)).logits
  got = qwen.Qwen(scan_cfg).apply({"params": scanned}, jnp.asarray(IDS)).logits
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  grads = jax.grad(lambda p: qwen.Qwen(scan_cfg).apply({"params": p}, jnp.asarray(IDS)).logits.sum())(scanned)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  back = checkpoint.unstack_layers(scanned)
  jax.tree.map(np.testing.assert_array_equal, back, params)


def test_bf16_compute_with_fp32_params_stays_close():
  ref = hf_tiny.qwen2()
  cfg = qwen.config_from_hf(ref.config)
  params = convert_state_dict(ref, cfg)
  want = qwen.Qwen(cfg).apply({"params": params}, jnp.asarray(IDS)).logits
  out = qwen.Qwen(dataclasses.replace(cfg, dtype="bfloat16")).apply({"params": params}, jnp.asarray(IDS))
  assert out.logits.dtype == jnp.float32 and out.last_hidden_state.dtype == jnp.bfloat16
  assert float(jnp.max(jnp.abs(out.logits - want))) < 0.1


@pytest.mark.parametrize("scan", [False, True])
def test_every_param_and_name_is_annotated_in_the_vocabulary(scan):
  cfg = dataclasses.replace(qwen.config_from_hf(hf_tiny.qwen3().config), scan_layers=scan)
  boxed = jax.eval_shape(qwen.Qwen(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  assert_every_param_annotated(boxed, scan)


def test_config_rejects_unknown_fields_and_types():
  with pytest.raises(ValueError, match="unsupported model_type 'llama'.*qwen2"):
    qwen.config_from_hf({"model_type": "llama"})
  with pytest.raises(ValueError, match="unknown fields"):
    qwen.QwenConfig.from_dict({**dataclasses.asdict(qwen.config_from_hf(hf_tiny.qwen2().config)), "bogus": 1})
  with pytest.raises(NotImplementedError, match="rope type 'yarn'"):
    qwen.config_from_hf({**hf_tiny.qwen2().config.to_dict(), "rope_scaling": {"rope_type": "yarn", "factor": 4.0},
                         "rope_parameters": None})
