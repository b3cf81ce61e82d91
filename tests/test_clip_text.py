"""CLIP text tower: parity with transformers (fp32, padding, pooled EOS, projection), layouts, conversion, errors."""

import json
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

import hf_tiny
import unimm_jax
from unimm_jax import registry, sharding
from unimm_jax.convert import engine, hf
from unimm_jax.convert.errors import ConversionError
from unimm_jax.convert.family import abstract_params
from unimm_jax.models import clip_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vocab_size=99, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=16, projection_dim=48, bos_token_id=0, pad_token_id=1)
# FLUX.1 text_encoder/config.json (CLIPTextModel), as stored in edkamesh/FluX-optimized@2557da9 (FLUX.1-schnell's,
# the same CLIP-L as FLUX.1-dev's); shape fields only.
FLUX_CLIP = {"architectures": ["CLIPTextModel"], "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768,
             "intermediate_size": 3072, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
             "model_type": "clip_text_model", "num_attention_heads": 12, "num_hidden_layers": 12, "projection_dim": 768,
             "vocab_size": 49408}


def rows(eos: int) -> tuple[np.ndarray, np.ndarray]:
  """Two right-padded rows (as CLIP's tokenizer pads) whose first eos is not their largest id, and whose padding
  repeats the eos (CLIP's pad token is its eos)."""
  ids = np.random.default_rng(0).integers(4, 99, (2, 12))
  ids[0, 7:], ids[1, 10], ids[1, 11] = eos, eos, eos
  mask = np.ones((2, 12), np.int64)
  mask[0, 8:] = 0
  return ids, mask


def hf_clip(cls=transformers.CLIPTextModel, **kw):
  torch.manual_seed(0)
  return hf_tiny._randomize(cls(transformers.CLIPTextConfig(**{**TINY, **kw})).eval())


def convert(ref):
  """Our config and params for a transformers model, through our converter (with convert_hf's legacy renames)."""
  fam = registry.family("clip_text")
  cfg = clip_text.config_from_hf({**ref.config.to_dict(), "architectures": [type(ref).__name__]})
  state = {}
  for key, value in ref.state_dict().items():
    for pattern, repl in fam.legacy_keys:
      key = re.sub(pattern, repl, key)
    state[key] = lambda v=value: v.detach().numpy()
  abstract = engine.flatten(abstract_params(fam, cfg))
  return cfg, engine.unflatten(engine.convert(state, fam.rules(cfg), abstract, ignore=fam.ignore(cfg)))


def close(ours, ref, **kw):
  np.testing.assert_allclose(np.asarray(ours), ref.detach().numpy(), atol=1e-4, rtol=0, **kw)


@pytest.mark.parametrize("cls,eos,act", [
    (transformers.CLIPTextModel, 3, "quick_gelu"),               # eos_token_id read as itself (first position)
    (transformers.CLIPTextModelWithProjection, 2, "gelu"),       # legacy eos_token_id 2: pooled at the argmax id
])
def test_clip_text_matches_transformers_per_block_pooled_and_projected_fp32(cls, eos, act):
  ref = hf_clip(cls, eos_token_id=eos, hidden_act=act)
  cfg, params = convert(ref)
  assert (cfg.with_projection, cfg.eos_token_id) == (cls is transformers.CLIPTextModelWithProjection, eos)
  ids, mask = rows(eos)
  pool_at = clip_text.eos_index(jnp.asarray(ids), eos)
  assert list(pool_at) == ([7, 10] if eos != 2 else list(ids.argmax(-1)))
  out = clip_text.CLIPTextModel(cfg).apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                                           return_hidden_states=True)
  with torch.no_grad():
    want = ref(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), output_hidden_states=True)
    tower = ref.text_model if hasattr(ref, "text_model") else ref
    pooled = tower(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).pooler_output
  close(out.last_hidden_state, want.last_hidden_state)  # every position, the padded ones too
  close(out.pooler_output, pooled)
  for i, (ours, theirs) in enumerate(zip(out.hidden_states, want.hidden_states, strict=True)):
    close(ours, theirs, err_msg=f"hidden_states[{i}]")
  if cfg.with_projection:
    close(out.text_embeds, want.text_embeds)
  else:
    assert out.text_embeds is None


def test_prompt_longer_than_the_position_table_is_refused_like_transformers():
  ref = hf_clip(eos_token_id=3)
  cfg, params = convert(ref)
  ids = np.full((1, 17), 5)
  with pytest.raises(ValueError, match=r"\(1, 17\) have 17 tokens, more than the 16 positions"):
    clip_text.CLIPTextModel(cfg).apply({"params": params}, jnp.asarray(ids))
  with pytest.raises(ValueError, match="max_position_embeddings"):
    ref(torch.from_numpy(ids))


def test_every_checkpoint_layout_converts_and_unknown_keys_are_named():
  """transformers >= 5 CLIPTextModel keys (no text_model. prefix), < 4.31 (a persistent position_ids buffer),
  WithProjection; a projection the config does not announce is an unexpected key."""
  ref = hf_clip(eos_token_id=3)
  assert not any(k.startswith("text_model.") for k in ref.state_dict())
  old = {"text_model." + k: v for k, v in ref.state_dict().items()}
  old["text_model.embeddings.position_ids"] = torch.arange(16)[None]
  _, a = convert(ref)
  fam = registry.family("clip_text")
  cfg = clip_text.config_from_hf(ref.config)
  abstract = engine.flatten(abstract_params(fam, cfg))
  b = engine.convert({k: (lambda v=v: v.numpy()) for k, v in old.items()}, fam.rules(cfg), abstract,
                     ignore=fam.ignore(cfg))
  for k, v in engine.flatten(a).items():
    np.testing.assert_array_equal(v, b[k], err_msg=k)
  with pytest.raises(ConversionError, match=r"unexpected key 'text_projection\.weight'"):
    engine.convert({**{k: (lambda v=v: v.numpy()) for k, v in old.items()},
                    "text_projection.weight": lambda: np.zeros((48, 64), np.float32)},
                   fam.rules(cfg), abstract, ignore=fam.ignore(cfg))


def test_convert_and_export_scripts_round_trip_through_transformers(tmp_path):
  ref = hf_clip(transformers.CLIPTextModelWithProjection, eos_token_id=3)
  ref.save_pretrained(tmp_path / "hf")
  run = lambda *a: subprocess.run([sys.executable, "scripts/convert.py", *a], cwd=ROOT, capture_output=True,
                                  text=True, timeout=600)
  r = run("--src", str(tmp_path / "hf"), "--dst", str(tmp_path / "ours"))
  assert r.returncode == 0, r.stderr[-3000:]
  assert json.loads(r.stdout)["family"] == "clip_text"
  loaded = unimm_jax.load(str(tmp_path / "ours"), scan_layers=True)
  ids, mask = rows(3)
  out = loaded.module.apply({"params": loaded.params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
  with torch.no_grad():
    close(out.text_embeds, ref(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).text_embeds)
  r = run("--export", "--src", str(tmp_path / "ours"), "--dst", str(tmp_path / "back"))
  assert r.returncode == 0, r.stderr[-3000:]
  back = transformers.CLIPTextModelWithProjection.from_pretrained(tmp_path / "back").eval()
  want = ref.state_dict()
  for k, v in back.state_dict().items():  # torch -> ours -> torch is bit-exact
    np.testing.assert_array_equal(v.numpy(), want[k].numpy(), err_msg=k)
  # A transformers >= 5 CLIPTextModel directory (keys without text_model.) loads on the fly.
  plain = hf_clip(eos_token_id=3)
  plain.save_pretrained(tmp_path / "plain")
  assert "embeddings.token_embedding.weight" in safetensors.numpy.load_file(tmp_path / "plain" / "model.safetensors")
  loaded = unimm_jax.load(str(tmp_path / "plain"))
  with torch.no_grad():
    close(loaded.module.apply({"params": loaded.params}, jnp.asarray(ids)).pooler_output,
          plain(torch.from_numpy(ids)).pooler_output)
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "config.json").write_text(json.dumps({**FLUX_CLIP, "model_type": "clip_vision_model"}))
  with pytest.raises(ConversionError, match="unsupported model_type 'clip_vision_model'"):
    hf.convert_to_orbax(str(tmp_path / "bad"), str(tmp_path / "nowhere"))
  assert not (tmp_path / "nowhere").exists()


def test_config_constructors_and_bad_configs():
  assert clip_text.config_from_hf(FLUX_CLIP) == clip_text.CLIPTextConfig.clip_l14()
  sdxl_g = {**FLUX_CLIP, "architectures": ["CLIPTextModelWithProjection"], "hidden_act": "gelu", "hidden_size": 1280,
            "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32, "projection_dim": 1280}
  g = clip_text.config_from_hf(sdxl_g)
  assert (g.with_projection, g.act, g.embed, g.depth) == (True, "gelu", 1280, 32)
  with pytest.raises(ValueError, match="unsupported model_type 'clip'"):
    clip_text.config_from_hf({**FLUX_CLIP, "model_type": "clip"})
  with pytest.raises(NotImplementedError, match=r"eos_token_id \[2, 3\]"):
    clip_text.config_from_hf({**FLUX_CLIP, "eos_token_id": [2, 3]})
  with pytest.raises(ValueError, match="embed 100 is not a multiple of heads 8"):
    clip_text.CLIPTextConfig(embed=100)


def test_every_param_is_annotated_and_fsdp_replicates_under_2_percent():
  cfg = clip_text.CLIPTextConfig.clip_l14(with_projection=True)
  boxed = jax.eval_shape(clip_text.CLIPTextModel(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  for path, leaf in leaves:
    assert isinstance(leaf, nn.Partitioned), f"{jax.tree_util.keystr(path)} has no logical names"
    sharding.check_logical_names(leaf.names, jax.tree_util.keystr(path))
  assert 123e6 < sum(int(np.prod(leaf.value.shape)) for _, leaf in leaves) < 124e6  # CLIP-L text: 123.65M + proj
  mesh = jax.make_mesh((1, 8, 1), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  assert sharding.replicated_fraction(nn.meta.unbox(boxed), sharding.logical_shardings(boxed, mesh)) <= 0.02


@pytest.mark.slow  # a subprocess importing jax, torch and transformers: ~20 s of CPU
def test_bench_text_encoders_script_runs_on_tiny_settings():
  r = subprocess.run([sys.executable, "scripts/bench_text_encoders.py", "--tiny"], cwd=ROOT, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "T5: unimm-jax fp32 / transformers fp32" in r.stdout and "CLIP: unimm-jax fp32" in r.stdout
