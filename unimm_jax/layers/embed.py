"""Token embedding table, usable as the tied output projection."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class Embed(nn.Module):
  """ids [b t] -> [b t d]; `attend(x [b t d]) -> [b t v]` reuses the table (tied embeddings)."""

  vocab: int
  features: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), ("vocab", "embed")),
        (self.vocab, self.features), self.param_dtype)

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    return jnp.einsum("btd,vd->btv", x.astype(self.dtype), self.embedding.astype(self.dtype))
