"""UniWorld-V1 sampling sharded over a mesh equals one device: the whole chain (VLM -> denoise_projector, SigLIP
tokens inserted before <|vision_end|>, joined with stand-in T5 embeddings, FLUX sampled with distilled guidance)
on a depth-1 model whose widths divide every sharded axis of the meshes (1,8,1) and (1,4,2): embed / fsdp,
heads, kv heads, MLP and vocabulary / tensor. Widths, not depth or size, decide how a layer is split, so this
exercises the release's layouts without its 3072 / 3584 widths (docs/uniworld.md has their bytes per device)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flux_tiny import FLUX_DEV_SCHEDULER
from jax.sharding import PartitionSpec as P

from unimm_jax import sharding
from unimm_jax.models import flux, qwen, qwen_vit, siglip, uniworld
from unimm_jax.models import qwen_vl
from unimm_jax.models.qwen_vl import QwenVLConfig
from unimm_jax.sampling import uniworld as sampling
from unimm_jax.sampling.flux import FluxSampler, FluxSamplerConfig

B, T, HW, T5 = 8, 12, (4, 4), 8   # prompts (divisible by every mesh), prompt tokens, latent grid, T5 tokens
MESHES = ((1, 8, 1), (1, 4, 2))


def reduced() -> uniworld.UniWorldConfig:
  text = qwen.QwenConfig.tiny(model_type="qwen2_5_vl_text", mrope_sections=(4, 6, 6), vocab=512, embed=128,
                              mlp=256, heads=4, kv_heads=2, head_dim=32, depth=1)
  ids = dict(vision_start_token_id=508, vision_end_token_id=509, image_token_id=510, video_token_id=511)
  vlm = QwenVLConfig(vision=qwen_vit.QwenVisionConfig.tiny(out_embed=text.embed, depth=1, fullatt_blocks=(0,)),
                     text=text, **ids)
  denoiser = flux.FluxConfig.tiny(depth=1, single_depth=1, heads=4, head_dim=32, context_dim=64, pooled_dim=32,
                                  axes_dims=(8, 12, 12))
  return uniworld.UniWorldConfig.tiny(vlm=vlm, denoiser=denoiser, image_end_token_id=509,
                                      siglip=siglip.SiglipVisionConfig.tiny(depth=1, use_head=False))


def _host_params(abstract, seed=1):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: (rng.standard_normal(x.shape, np.float32)
                                 * (0.5 / np.sqrt(x.shape[0]) if x.ndim > 1 else 0.1)).astype(x.dtype), abstract)


def _sample(cfg, mesh_shape):
  """Denoise embeddings and final latents of 2 steps from fixed inputs, and the params (for their specs).
  Params are drawn on the host, then put on one device (mesh_shape None) or straight onto their shards."""
  model = uniworld.UniWorld(cfg)
  boxed = jax.eval_shape(model.init, jax.random.key(0), *uniworld.example_inputs(cfg))["params"]
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 500, (B, T))
  ids[:, T // 2] = cfg.image_end_token_id        # one reference image per prompt, inserted before this token
  kw = qwen_vl.prepare(ids, cfg.vlm)
  side = cfg.siglip.posemb_grid * cfg.siglip.patch
  pixels = jnp.asarray(rng.uniform(-1, 1, (B, side, side, 3)), jnp.float32)
  insertion = uniworld.siglip_insertion(ids, cfg.image_end_token_id, B, cfg.siglip_tokens)
  t5 = jnp.asarray(rng.standard_normal((B, T5, cfg.context_dim)) * 0.5, jnp.float32)
  pooled = jnp.asarray(rng.standard_normal((B, cfg.denoiser.pooled_dim)), jnp.float32)
  z = jnp.asarray(rng.standard_normal((B, *HW, cfg.denoiser.in_channels // 4)), jnp.float32)

  def run(params):
    embeds = jax.jit(lambda p: model.apply({"params": p}, jnp.asarray(ids), positions=kw["positions"],
                                           siglip_pixels=pixels, insertion=insertion,
                                           method=uniworld.UniWorld.denoise_embeds))(params)
    sampler = FluxSampler(flux.FluxTransformer2DModel(cfg.denoiser), params["denoiser"], FLUX_DEV_SCHEDULER)
    out = sampler.generate(sampling.join_t5(t5, embeds), pooled, FluxSamplerConfig(steps=2), latents=z)
    return np.asarray(embeds), np.asarray(out.latents), params

  host = _host_params(nn.meta.unbox(boxed))
  if mesh_shape is None:
    return run(jax.tree.map(jnp.asarray, host))
  mesh = sharding.make_mesh(mesh_shape)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    return run(jax.device_put(host, sharding.logical_shardings(boxed, mesh)))


@pytest.fixture(scope="module")
def one_device():
  cfg = reduced()
  return cfg, _sample(cfg, None)


@pytest.mark.slow   # ~45 s on 2 shared cores: the chain compiles once per mesh (1 device, (1,8,1), (1,4,2))
@pytest.mark.parametrize("mesh_shape", MESHES, ids=str)
def test_sharded_sampling_equals_one_device(one_device, mesh_shape):
  assert jax.device_count() >= 8   # tests/conftest.py: --xla_force_host_platform_device_count=8
  cfg, (want_embeds, want, _) = one_device
  embeds, got, params = _sample(cfg, mesh_shape)
  fsdp, tp = mesh_shape[1], mesh_shape[2]
  kernel = params["denoise_projector"]["layers_0"]["kernel"]
  assert kernel.sharding.spec == P("fsdp", "tensor")
  assert kernel.addressable_shards[0].data.shape == (cfg.vlm.text.embed // fsdp, 3 * cfg.context_dim // tp)
  assert params["vlm"]["language_model"]["layers_0"]["mlp"]["gate_proj"]["kernel"].sharding.spec == P(
      "fsdp", "tensor")
  assert params["siglip_projector"]["layers_2"]["kernel"].sharding.spec == P("tensor", "fsdp")
  np.testing.assert_allclose(embeds, want_embeds, atol=1e-5, rtol=0, err_msg=str(mesh_shape))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=str(mesh_shape))
