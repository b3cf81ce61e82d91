"""TUNA conversion: a reference-format checkpoint (tuna.*, vision_model.*, heads, vae.model.*) converts
through our key map, and each component then equals its original (transformers Qwen2, transformers
SigLIP on latents, diffusers Wan 2.2 VAE)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import hf_tiny
import unimm_jax
import vae_tiny
from unimm_jax import schema
from unimm_jax.convert import engine
from unimm_jax.convert import tuna as tuna_convert
from unimm_jax.convert.maps import tuna as tuna_map
from unimm_jax.convert.maps import vae_wan as vae_wan_map
from unimm_jax.convert.safetensors_writer import save_safetensors
from unimm_jax.models import qwen, siglip, tuna, vae_wan
from unimm_jax.models.tuna_head import TunaHeadConfig


def _reference_checkpoint(tmp_path):
  """Builds a tuna-2-format state dict from original modules and our random head, saved as safetensors."""
  llm_ref = hf_tiny.qwen2(tie_word_embeddings=True)
  sig_cfg = transformers.SiglipVisionConfig(hidden_size=24, intermediate_size=40, num_hidden_layers=3,
                                            num_attention_heads=2, patch_size=1, image_size=4, num_channels=8)
  torch.manual_seed(0)
  sig_ref = hf_tiny._randomize(transformers.SiglipVisionModel(sig_cfg).eval())
  vae_ref = vae_tiny.autoencoder_wan("2.2")
  llm = qwen.config_from_hf(llm_ref.config)
  sc = dataclasses.replace(siglip.config_from_hf(sig_cfg), post_layernorm=False, use_head=False, feature_layer=-2)
  head = TunaHeadConfig(embed=64, mlp=112, depth=2, heads=4, kv_heads=2, head_dim=16, out_features=8)
  cfg = tuna.TunaConfig(llm=llm, head=head, encoder="siglip", siglip=sc, channels=8, patch=1)
  ours = jax.tree.map(np.asarray, tuna.Tuna(cfg).init(jax.random.key(0), schema.example_inputs(cfg.token_features))["params"])
  ours = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, ours, is_leaf=lambda x: hasattr(x, "value"))
  head_only = {k: v for k, v in engine.flatten(ours).items() if k.split("/")[0] in
               ("diffusion_head_b", "time_embed", "siglip_proj") or k.startswith("diffusion_head_a")}
  state = {k: np.asarray(v) for k, v in engine.export(head_only, tuna_map.RULES_SIGLIP).items()}
  state |= {"tuna." + k: v.numpy() for k, v in llm_ref.state_dict().items()}
  # the reference's tower: SiglipVisionTransformer as `vision_model`, no post-norm, no head, layers[:-1]
  state |= {"vision_model." + k.removeprefix("vision_model."): v.numpy() for k, v in sig_ref.state_dict().items()
            if not k.removeprefix("vision_model.").startswith(("post_layernorm", "head", "encoder.layers.2."))}
  vae_cfg, vae_params = vae_tiny.convert(vae_ref, "vae_wan")[:2]
  original = engine.export(engine.flatten(jax.tree.map(np.asarray, vae_params)),
                           vae_wan_map.original_rules(vae_cfg))
  state |= {"vae.model." + k: v for k, v in original.items()}
  path = str(tmp_path / "tuna_ref.safetensors")
  save_safetensors(path, {k: np.ascontiguousarray(v) for k, v in state.items()})
  return path, cfg, vae_cfg, (llm_ref, sig_ref, vae_ref), ours


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("tuna")
  path, cfg, vae_cfg, refs, init = _reference_checkpoint(tmp)
  return (tmp, cfg, vae_cfg, refs, init, *tuna_convert.convert_reference(path, cfg, vae_cfg))


def test_reference_checkpoint_converts_and_components_match_their_originals(converted):
  _, cfg, vae_cfg, (llm_ref, sig_ref, vae_ref), init, cfg2, params, vae_params = converted
  assert cfg2.llm.vocab == 211
  for k, v in engine.flatten(init).items():  # the head round-trips bit-exactly through the table
    if k.startswith("diffusion_head") or k.startswith("time_embed") or k.startswith("siglip_proj"):
      np.testing.assert_array_equal(engine.flatten(params)[k], v)
  ids = np.random.default_rng(0).integers(0, 211, (2, 9))
  logits = qwen.Qwen(cfg.llm).apply({"params": params["llm"]}, jnp.asarray(ids)).logits
  with torch.no_grad():
    np.testing.assert_allclose(logits, llm_ref(torch.from_numpy(ids)).logits.numpy(), atol=1e-4, rtol=0)
  latents = np.random.default_rng(1).normal(size=(2, 6, 5, 8)).astype(np.float32)  # 6x5 grid: interpolated table
  ours = siglip.VisionTransformer(cfg.siglip).apply({"params": params["vision_model"]}, jnp.asarray(latents))
  with torch.no_grad():
    ref = sig_ref(pixel_values=torch.from_numpy(latents).permute(0, 3, 1, 2), interpolate_pos_encoding=True,
                  output_hidden_states=True).hidden_states[-2]
  np.testing.assert_allclose(ours.last_hidden_state, ref.numpy(), atol=1e-4, rtol=0)
  video = np.random.default_rng(2).uniform(-1, 1, size=(1, 1, 32, 32, 3)).astype(np.float32)
  ours_mean = vae_wan.WanVAE(vae_cfg).apply({"params": vae_params}, jnp.asarray(video), method=vae_wan.WanVAE.encode).mean
  with torch.no_grad():
    ref_mean = vae_ref.encode(torch.from_numpy(video).permute(0, 4, 1, 2, 3)).latent_dist.mean
  np.testing.assert_allclose(np.asarray(ours_mean), ref_mean.permute(0, 2, 3, 4, 1).numpy(), atol=1e-4, rtol=0)


def test_saved_tuna_directory_loads_with_its_vae(converted):
  tmp_path, _, vae_cfg, _, _, cfg2, params, vae_params = converted
  tuna_convert.save(str(tmp_path / "ours"), cfg2, params, vae_cfg=vae_cfg, vae_params=vae_params)
  loaded = unimm_jax.load(str(tmp_path / "ours"))
  assert loaded.family == "tuna" and loaded.config == cfg2
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, loaded.params), params)
  vae = tuna_convert.load_vae(str(tmp_path / "ours"))
  assert vae.family == "vae_wan"
  out = loaded.module.apply({"params": loaded.params}, schema.example_inputs(cfg2.token_features))
  assert np.all(np.isfinite(out.prediction))
