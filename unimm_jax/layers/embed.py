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


def scatter_placeholders(embeds: jax.Array, ids: jax.Array, features: jax.Array, token_id: int) -> jax.Array:
  """Multimodal prompts: embeds [b t d] whose rows at `ids == token_id` are replaced, in row-major order, by the
  rows of features [n d] (transformers' `masked_scatter`). n must equal the number of placeholders: the caller
  checks it where the ids are concrete (traced ids cannot raise); extra features are unused, missing ones repeat
  the last."""
  mask = ids == token_id
  index = jnp.clip(jnp.cumsum(mask.reshape(-1)) - 1, 0, features.shape[0] - 1).reshape(mask.shape)
  return jnp.where(mask[..., None], jnp.take(features, index, axis=0).astype(embeds.dtype), embeds)
