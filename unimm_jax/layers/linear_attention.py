"""ReLU linear attention (Katharopoulos et al. 2020; EfficientViT; SANA): softmax(q k^T) replaced by
relu(q) relu(k)^T with a row normaliser, so attention over n tokens costs O(n e^2) instead of O(n^2 e).

Shapes: b batch, n tokens, h heads, e head_dim (f for values), d embed.
Reference: diffusers models/attention_processor.py (SanaLinearAttnProcessor2_0 for SANA's self-attention,
SanaMultiscaleLinearAttention.apply_linear_attention / apply_quadratic_attention for DC-AE).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from unimm_jax.layers.attention import qk_rms_norm
from unimm_jax.layers.linear import DenseGeneral

EPS = 1e-15   # both references add 1e-15 to the normaliser


def relu_linear_attention(q: jax.Array, k: jax.Array, v: jax.Array, eps: float = EPS) -> jax.Array:
  """out_i = sum_j v_j (k_j . q_i) / (sum_j k_j . q_i + eps) with q, k <- relu(q), relu(k):
  q, k [b n h e], v [b n h f] -> [b n h f], computed in fp32, returned in v.dtype.

  The products are associated the cheaper way: (k^T v) first when n > e (what the references call linear
  attention), (q k^T) first otherwise (DC-AE's quadratic branch for tiny feature maps). Both are the same sum.
  """
  q, k = jax.nn.relu(q).astype(jnp.float32), jax.nn.relu(k).astype(jnp.float32)
  vf = v.astype(jnp.float32)
  if q.shape[1] > q.shape[-1]:
    kv = jnp.einsum("bnhe,bnhf->bhef", k, vf)
    num = jnp.einsum("bnhe,bhef->bnhf", q, kv)
    den = jnp.einsum("bnhe,bhe->bnh", q, jnp.sum(k, axis=1))
  else:
    scores = jnp.einsum("bnhe,bmhe->bhnm", q, k)
    num = jnp.einsum("bhnm,bmhf->bnhf", scores, vf)
    den = jnp.einsum("bhnm->bnh", scores)
  return (num / (den[..., None] + eps)).astype(v.dtype)


class LinearAttention(nn.Module):
  """Self-attention [b n d] -> [b n d] with the ReLU kernel (SANA): q/k/v_proj [d h e], optional q/k RMSNorm
  over all heads (SANA 1.5), o_proj [h e d] with bias. No mask: every token of an image sees every other."""

  features: int
  heads: int
  head_dim: int
  qkv_bias: bool = False
  o_bias: bool = True
  qk_norm: bool = False
  norm_eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d, h, e = self.features, self.heads, self.head_dim
    q, k, v = (DenseGeneral((d,), (h, e), ("embed", "heads", "head_dim"), self.qkv_bias, name=f"{n}_proj", **kw)(x)
               for n in "qkv")
    if self.qk_norm:
      q = qk_rms_norm(q, self.norm_eps, True, "q_norm", kw)
      k = qk_rms_norm(k, self.norm_eps, True, "k_norm", kw)
    axes = ("act_batch", "act_length", "act_heads", "act_head_dim")
    q, k, v = (nn.with_logical_constraint(a, axes) for a in (q, k, v))
    out = nn.with_logical_constraint(relu_linear_attention(q, k, v), axes)
    return DenseGeneral((h, e), (d,), ("heads", "head_dim", "embed"), self.o_bias, name="o_proj", **kw)(out)
