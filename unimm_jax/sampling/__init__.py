"""Sampling: text generation with a KV cache (and, later, image sampling)."""

from unimm_jax.sampling.text import Generation, SamplerConfig, generate, generate_from_embeddings, sample_logits

__all__ = ["Generation", "SamplerConfig", "generate", "generate_from_embeddings", "sample_logits"]
