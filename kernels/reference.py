"""XLA reference attention: the one definition of the mask semantics, with a materialised mask.

Shapes: b batch, t query tokens, s key/value tokens, h query heads, k kv heads, g = h // k, e head_dim.

Token i may attend to token j iff
  segment_ids[i] == kv_segment_ids[j] != 0                        (0 marks padding)
  and, if causal: j <= i  or  span_ids[i] == span_ids[j] != 0     (bidirectional spans, e.g. one image).
Rows with nothing to attend to return zeros (never NaN), with finite gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange


def attention_mask(
    segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    span_ids: jax.Array | None,
    causal: bool,
) -> jax.Array:
  """[b t], [b s], [b t] | None -> bool [b t s] visibility mask."""
  mask = (segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (kv_segment_ids[:, None, :] != 0)
  if causal:
    t, s = segment_ids.shape[1], kv_segment_ids.shape[1]
    visible = jnp.arange(s)[None, :] <= jnp.arange(t)[:, None]
    if span_ids is not None:
      visible = visible | ((span_ids[:, :, None] == span_ids[:, None, :]) & (span_ids[:, :, None] != 0))
    mask = mask & visible
  return mask


def attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    span_ids: jax.Array | None,
    causal: bool,
    sm_scale: float,
    bias: jax.Array | None = None,
) -> jax.Array:
  """q [b t h e], k/v [b s k e] -> [b t h e]; softmax in fp32, output in q.dtype.
  bias (broadcastable to [b h t s]) is added to the scaled logits before masking."""
  groups = q.shape[2] // k.shape[2]
  qg = rearrange(q, "b t (k g) e -> b k g t e", g=groups)
  logits = jnp.einsum("bkgte,bske->bkgts", qg, k, preferred_element_type=jnp.float32) * sm_scale
  if bias is not None:
    bias = bias.astype(jnp.float32)
    if bias.shape[1] == 1:
      logits = logits + bias[:, :, None]
    else:
      logits = logits + rearrange(bias, "b (k g) t s -> b k g t s", g=groups)
  mask = attention_mask(segment_ids, kv_segment_ids, span_ids, causal)[:, None, None]
  logits = jnp.where(mask, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  # Fully masked rows have max -inf; shifting by 0 there keeps exp() at 0 instead of NaN.
  row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  p = jnp.where(mask, jnp.exp(logits - row_max), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom == 0.0, 1.0, denom)
  out = jnp.einsum("bkgts,bske->bkgte", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return rearrange(out, "b k g t e -> b t (k g) e").astype(q.dtype)
