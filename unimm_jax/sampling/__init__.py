"""Sampling: text generation with a KV cache (and, later, image sampling)."""

from unimm_jax.sampling.text import Generation, SamplerConfig, generate, sample_logits

__all__ = ["Generation", "SamplerConfig", "generate", "sample_logits"]
