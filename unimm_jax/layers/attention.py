"""Multi-head self-attention with GQA, optional q/k/v biases and q/k RMSNorm, and a KV cache.

Shapes: b batch, t tokens, s cache slots, d embed, h|k query|kv heads, e head_dim.
Positions are injected as `rope_fn(x [b t h e]) -> [b t h e]`, so the same layer serves 1D RoPE,
M-RoPE, TUNA's 3D RoPE or no RoPE. The attention itself is `unimm_jax.kernels.attention`.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from unimm_jax import kernels
from unimm_jax.layers.linear import DenseGeneral
from unimm_jax.layers.norms import RMSNorm

RopeFn = Callable[[jax.Array], jax.Array]


class Attention(nn.Module):
  """[b t d] -> [b t d]. Params q_proj/k_proj/v_proj [d h|k e], o_proj [h e d], q_norm/k_norm [e]."""

  features: int
  heads: int
  kv_heads: int
  head_dim: int
  qkv_bias: bool = False
  o_bias: bool = False
  qk_norm: bool = False
  norm_eps: float = 1e-6
  impl: str = "auto"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(
      self,
      x: jax.Array,
      *,
      rope_fn: RopeFn | None = None,
      segment_ids: jax.Array | None = None,
      span_ids: jax.Array | None = None,
      causal: bool = False,
      cache: dict[str, jax.Array] | None = None,
      cache_index: jax.Array | None = None,
      kv_segment_ids: jax.Array | None = None,
  ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
    """Returns (output, updated cache or None).

    Without `cache`: attention over x itself. With `cache` ({"k", "v"}: [b s k e]) the new k/v are
    written at `cache_index`; if `kv_segment_ids` [b s] is given (decode) the queries attend over the
    whole cache with it as the key mask, otherwise (prefill from slot 0) over x itself.
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d, h, k, e = self.features, self.heads, self.kv_heads, self.head_dim
    q = DenseGeneral((d,), (h, e), ("embed", "heads", "head_dim"), self.qkv_bias, name="q_proj", **kw)(x)
    key = DenseGeneral((d,), (k, e), ("embed", "kv_heads", "head_dim"), self.qkv_bias, name="k_proj", **kw)(x)
    val = DenseGeneral((d,), (k, e), ("embed", "kv_heads", "head_dim"), self.qkv_bias, name="v_proj", **kw)(x)
    if self.qk_norm:  # Qwen3 / TUNA head: RMSNorm per head, before RoPE
      q = RMSNorm(e, self.norm_eps, name="q_norm", **kw)(q)
      key = RMSNorm(e, self.norm_eps, name="k_norm", **kw)(key)
    if rope_fn is not None:
      q, key = rope_fn(q), rope_fn(key)
    q = nn.with_logical_constraint(q, ("act_batch", "act_length", "act_heads", "act_head_dim"))
    key = nn.with_logical_constraint(key, ("act_batch", "act_length", "act_kv_heads", "act_head_dim"))
    val = nn.with_logical_constraint(val, ("act_batch", "act_length", "act_kv_heads", "act_head_dim"))

    new_cache = None
    if cache is not None:
      start = (0, cache_index, 0, 0)
      new_cache = {
          "k": jax.lax.dynamic_update_slice(cache["k"], key.astype(cache["k"].dtype), start),
          "v": jax.lax.dynamic_update_slice(cache["v"], val.astype(cache["v"].dtype), start),
      }
    if cache is not None and kv_segment_ids is not None:
      out = kernels.attention(
          q, new_cache["k"].astype(q.dtype), new_cache["v"].astype(q.dtype), segment_ids=segment_ids,
          kv_segment_ids=kv_segment_ids, impl=self.impl)
    else:
      out = kernels.attention(
          q, key, val, segment_ids=segment_ids, span_ids=span_ids, causal=causal, impl=self.impl)
    out = nn.with_logical_constraint(out, ("act_batch", "act_length", "act_heads", "act_head_dim"))
    y = DenseGeneral((h, e), (d,), ("heads", "head_dim", "embed"), self.o_bias, name="o_proj", **kw)(out)
    return y, new_cache
