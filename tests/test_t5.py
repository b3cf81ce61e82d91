"""T5 encoder: parity with transformers (fp32, padded batches, per block), buckets, conversion, layouts, errors."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.t5.modeling_t5 import T5Attention

import hf_tiny
import unimm_jax
from unimm_jax import registry, sharding
from unimm_jax.convert import engine, hf
from unimm_jax.convert.errors import ConversionError
from unimm_jax.convert.family import abstract_params
from unimm_jax.models import t5

# 8 buckets up to distance 16, so 21 tokens reach the capped bucket; d_kv 24 * 4 heads != d_model 64.
TINY = dict(vocab_size=128, d_model=64, d_kv=24, d_ff=96, num_layers=2, num_heads=4, dropout_rate=0.0,
            relative_attention_num_buckets=8, relative_attention_max_distance=16)
# FLUX.1 text_encoder_2/config.json (T5EncoderModel), as stored in edkamesh/FluX-optimized@2557da9 (a copy of
# black-forest-labs/FLUX.1-schnell, whose text encoders are FLUX.1-dev's); shape fields only.
FLUX_T5 = {"architectures": ["T5EncoderModel"], "d_ff": 10240, "d_kv": 64, "d_model": 4096, "dense_act_fn": "gelu_new",
           "feed_forward_proj": "gated-gelu", "is_gated_act": True, "layer_norm_epsilon": 1e-06, "model_type": "t5",
           "num_heads": 64, "num_layers": 24, "relative_attention_max_distance": 128,
           "relative_attention_num_buckets": 32, "vocab_size": 32128}
RNG = np.random.default_rng(0)
IDS = RNG.integers(0, 128, (2, 21))
MASK = np.ones((2, 21), np.int64)
MASK[1, 13:] = 0  # right padding: padded positions still get outputs, as in transformers


def hf_t5(cls=transformers.T5EncoderModel, **kw):
  torch.manual_seed(0)
  return hf_tiny._randomize(cls(transformers.T5Config(**{**TINY, "feed_forward_proj": "gated-gelu", **kw})).eval())


def convert(ref):
  fam = registry.family("t5")
  cfg = t5.config_from_hf(ref.config)
  state = {k: (lambda v=v: v.detach().numpy()) for k, v in ref.state_dict().items()}
  abstract = engine.flatten(abstract_params(fam, cfg))
  return cfg, engine.unflatten(engine.convert(state, fam.rules(cfg), abstract, ignore=fam.ignore(cfg)))


def close(ours, ref):
  np.testing.assert_allclose(np.asarray(ours), ref.detach().numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("proj", ["gated-gelu", "relu"])  # T5 v1.1 (FLUX's T5-XXL) and v1.0
def test_t5_encoder_matches_transformers_per_block_with_padding_fp32(proj):
  ref = hf_t5(feed_forward_proj=proj)
  cfg, params = convert(ref)
  assert (cfg.gated, cfg.act) == ((True, "gelu_new") if proj == "gated-gelu" else (False, "relu"))
  model = t5.T5EncoderModel(cfg)
  for mask in (MASK, None):  # FLUX's pipeline passes no mask
    out = model.apply({"params": params}, jnp.asarray(IDS), attention_mask=None if mask is None else jnp.asarray(mask),
                      return_hidden_states=True)
    with torch.no_grad():
      want = ref(torch.from_numpy(IDS), attention_mask=None if mask is None else torch.from_numpy(mask),
                 output_hidden_states=True)
    close(out.last_hidden_state, want.last_hidden_state)
    assert len(out.hidden_states) == len(want.hidden_states) == cfg.depth + 1
    for i, (ours, theirs) in enumerate(zip(out.hidden_states, want.hidden_states)):  # embeddings, block 0, final
      np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=1e-4, rtol=0, err_msg=f"hidden_states[{i}]")
  bias = model.apply({"params": params}, 21, 21, method=t5.T5EncoderModel.position_bias)
  close(bias, ref.encoder.block[0].layer[0].SelfAttention.compute_bias(21, 21))


def test_relative_position_buckets_equal_transformers_at_every_distance():
  for buckets, distance in [(32, 128), (8, 16), (16, 20)]:
    ours = t5.relative_position_buckets(600, 600, buckets, distance)
    rel = torch.arange(600)[None, :] - torch.arange(600)[:, None]
    np.testing.assert_array_equal(ours, T5Attention._relative_position_bucket(rel, True, buckets, distance).numpy())


def test_t5_for_conditional_generation_directory_loads_the_encoder_only(tmp_path):
  full = hf_t5(transformers.T5ForConditionalGeneration, tie_word_embeddings=False)  # v1.1: its own lm_head
  full.save_pretrained(tmp_path / "hf")
  loaded = unimm_jax.load(str(tmp_path / "hf"))
  assert loaded.family == "t5" and not any(k.startswith("decoder") for k in engine.flatten(loaded.params))
  out = loaded.module.apply({"params": loaded.params}, jnp.asarray(IDS), attention_mask=jnp.asarray(MASK))
  with torch.no_grad():
    close(out.last_hidden_state, full.encoder(torch.from_numpy(IDS), attention_mask=torch.from_numpy(MASK))[0])


def test_convert_load_export_round_trip_through_transformers(tmp_path):
  ref = hf_t5()
  ref.save_pretrained(tmp_path / "hf")
  hf.convert_to_orbax(str(tmp_path / "hf"), str(tmp_path / "ours"))
  loaded = unimm_jax.load(str(tmp_path / "ours"), scan_layers=True, remat="full")
  out = loaded.module.apply({"params": loaded.params}, jnp.asarray(IDS), attention_mask=jnp.asarray(MASK))
  with torch.no_grad():
    close(out.last_hidden_state, ref(torch.from_numpy(IDS), attention_mask=torch.from_numpy(MASK)).last_hidden_state)
  hf.export_to_hf(str(tmp_path / "ours"), str(tmp_path / "back"))
  back = transformers.T5EncoderModel.from_pretrained(tmp_path / "back").eval()
  want = ref.state_dict()
  for k, v in back.state_dict().items():  # torch -> ours -> torch is bit-exact
    np.testing.assert_array_equal(v.numpy(), want[k].numpy(), err_msg=k)
  # hf_config (what export writes when no source config.json was kept) reads back as the same config.
  again = t5.config_from_hf(registry.family("t5").hf_config(loaded.config))
  assert again == dataclasses.replace(loaded.config, scan_layers=False, remat="none")


def test_config_constructors_and_bad_configs():
  assert t5.config_from_hf(FLUX_T5) == t5.T5Config.t5_v1_1_xxl()
  assert t5.T5Config.t5_v1_1_xxl().num_layers == 24
  with pytest.raises(ValueError, match="unsupported model_type 'umt5'"):
    t5.config_from_hf({**FLUX_T5, "model_type": "umt5"})
  with pytest.raises(ValueError, match="feed_forward_proj 'gelu-gated'"):
    t5.config_from_hf({**FLUX_T5, "feed_forward_proj": "gelu-gated"})
  with pytest.raises(ValueError, match="unknown activation 'swish9'"):
    t5.T5Config.tiny(act="swish9")
  with pytest.raises(ConversionError, match="gated-gelu' means gelu_new"):
    registry.family("t5").hf_config(t5.T5Config.tiny(act="gelu"))


def test_unknown_model_type_and_a_foreign_bias_table_are_named(tmp_path):
  (tmp_path / "umt5").mkdir()
  (tmp_path / "umt5" / "config.json").write_text(json.dumps({**FLUX_T5, "model_type": "umt5"}))
  with pytest.raises(ConversionError, match=r"config\.json: unsupported model_type 'umt5'; supported: .*'t5'"):
    unimm_jax.load(str(tmp_path / "umt5"))
  ref = hf_t5()
  cfg = t5.config_from_hf(ref.config)
  state = {k: (lambda v=v: v.detach().numpy()) for k, v in ref.state_dict().items()}
  state["encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"] = state[
      "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]  # umT5: a table per layer
  fam = registry.family("t5")
  with pytest.raises(ConversionError, match=r"unexpected key 'encoder\.block\.1\.layer\.0\.SelfAttention\."
                                            r"relative_attention_bias\.weight'"):
    engine.convert(state, fam.rules(cfg), engine.flatten(abstract_params(fam, cfg)), ignore=fam.ignore(cfg))


def test_bf16_compute_and_pallas_refusing_the_position_bias():
  """(The scan + remat layout is checked against transformers in the round-trip test.)"""
  cfg = t5.T5Config.tiny()
  ids = jnp.asarray(IDS)
  params = nn.meta.unbox(t5.T5EncoderModel(cfg).init(jax.random.key(0), ids)["params"])
  want = t5.T5EncoderModel(cfg).apply({"params": params}, ids).last_hidden_state
  bf16 = t5.T5EncoderModel(dataclasses.replace(cfg, dtype="bfloat16")).apply({"params": params}, ids)
  assert bf16.last_hidden_state.dtype == jnp.bfloat16
  assert float(jnp.max(jnp.abs(bf16.last_hidden_state.astype(jnp.float32) - want))) < 0.1
  with pytest.raises(NotImplementedError, match="impl='pallas_gpu': bias"):
    t5.T5EncoderModel(dataclasses.replace(cfg, attention_impl="pallas_gpu")).apply({"params": params}, ids)


@pytest.mark.parametrize("scan", [False, True])
def test_every_param_is_annotated_and_fsdp_replicates_under_2_percent(scan):
  cfg = t5.T5Config.t5_v1_1_xxl(scan_layers=scan)
  boxed = jax.eval_shape(t5.T5EncoderModel(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  for path, leaf in leaves:
    assert isinstance(leaf, nn.Partitioned), f"{jax.tree_util.keystr(path)} has no logical names"
    sharding.check_logical_names(leaf.names, jax.tree_util.keystr(path))
  n = sum(int(np.prod(leaf.value.shape)) for _, leaf in leaves)
  assert 4.7e9 < n < 4.8e9  # T5-XXL's encoder: 4.76B parameters
  mesh = jax.make_mesh((1, 8, 1), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  assert sharding.replicated_fraction(nn.meta.unbox(boxed), sharding.logical_shardings(boxed, mesh)) <= 0.02
