"""OpenUni against a PyTorch pipeline assembled from library classes (scripts/bench_openuni.py TorchOpenUni:
transformers InternVL3 with its Qwen2 LLM, a SiglipEncoder connector, diffusers SanaPipeline with SanaTransformer2DModel,
DPMSolverMultistepScheduler and AutoencoderDC), in a configuration unlike the golden fixtures': other widths, heads,
query count, latent channels, a 3-level (f4) autoencoder, SANA's sin-cos position embedding, a non-square image,
7 steps, guidance 3. Its weights go through our converter in the released naming; every stage must match."""

from __future__ import annotations

import importlib.util
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_tiny
from unimm_jax.sampling import openuni as ou

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "bench_openuni.py")
TOL = dict(rtol=1e-4, atol=1e-5)
LATENT = dict(rtol=0, atol=1e-4)
STEPS, GUIDANCE, HEIGHT, WIDTH = 7, 3.0, 96, 64   # SanaPipeline takes multiples of 32


@pytest.fixture(scope="module")
def bench():
  spec = importlib.util.spec_from_file_location("bench_openuni", SCRIPT)
  mod = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = mod   # its dataclasses look their module up there
  spec.loader.exec_module(mod)
  return mod


@pytest.fixture(scope="module")
def pair(bench):
  spec = bench.Spec(
      vision=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=7, attention_bias=True),
      text=dict(bench.TEXT_B, hidden_size=96, intermediate_size=160, num_hidden_layers=3, num_attention_heads=6,
                num_key_value_heads=3, vocab_size=320, max_position_embeddings=512),
      connector=dict(hidden_size=96, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4),
      sana=dict(in_channels=4, out_channels=4, num_layers=3, num_attention_heads=3, attention_head_dim=8,
                num_cross_attention_heads=2, cross_attention_head_dim=12, cross_attention_dim=24, caption_channels=32,
                sample_size=16, interpolation_scale=1.0),
      dcae=dict(bench.DCAE_TINY, latent_channels=4, attention_head_dim=4, decoder_layers_per_block=(1, 2, 1)),
      num_queries=24, image_token_id=319)
  torch.manual_seed(3)
  ref = hf_tiny._randomize(bench.TorchOpenUni(spec, attn="eager"))
  module, params = bench.convert(ref, HEIGHT)
  return ref, ou.OpenUniPipeline(module, params, tokenizer=None, where="test_openuni_torch")


@pytest.mark.slow   # ~2 min on 2 shared cores: builds both sides, compiles the LLM, SANA step and decode
def test_conditioning_sampling_and_decode_match_the_torch_pipeline(pair):
  ref, pipe = pair
  rng = np.random.default_rng(5)
  ids = rng.integers(0, 310, (2, 13)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 9:] = 0                                            # the CFG prompt is shorter: right padding
  want = ref.prompt_embeds(torch.from_numpy(ids).long(), torch.from_numpy(mask))
  got = pipe.module.apply({"params": pipe.params}, jnp.asarray(ids), jnp.asarray(mask),
                          method=type(pipe.module).condition)
  np.testing.assert_allclose(got.query_hidden, want["query_hidden"].numpy(), **TOL)
  np.testing.assert_allclose(got.connector_out, want["connector_out"].numpy(), **TOL)
  np.testing.assert_allclose(got.prompt_embeds, want["prompt_embeds"].numpy(), **TOL)

  f = pipe.cfg.vae.spatial_downscale
  noise = rng.standard_normal((1, pipe.cfg.transformer.in_channels, HEIGHT // f, WIDTH // f)).astype(np.float32)
  embeds = want["prompt_embeds"]
  torch_steps, our_steps = [], []
  final_t = ref.sample(embeds[:1], embeds[1:], torch.from_numpy(noise), STEPS, GUIDANCE,
                       on_step=lambda i, x: torch_steps.append(x.numpy().copy()))
  sampler = ou.OpenUniSamplerConfig(steps=STEPS, guidance=GUIDANCE)
  final = pipe.sample_latents(jnp.asarray(embeds[:1].numpy()), jnp.asarray(embeds[1:].numpy()), sampler,
                              jnp.asarray(np.moveaxis(noise, 1, -1)), on_step=lambda i, x: our_steps.append(x))
  assert len(our_steps) == len(torch_steps) == STEPS
  for i, (a, b) in enumerate(zip(our_steps, torch_steps)):
    np.testing.assert_allclose(np.moveaxis(np.asarray(a), -1, 1), b, **LATENT, err_msg=f"step {i}")
  np.testing.assert_allclose(np.moveaxis(np.asarray(final), -1, 1), final_t.numpy(), **LATENT)
  image_t = ref.decode(final_t).numpy()
  assert image_t.shape == (1, 3, HEIGHT, WIDTH)
  np.testing.assert_allclose(np.moveaxis(np.asarray(pipe.decode(final)), -1, 1), image_t, **LATENT)
