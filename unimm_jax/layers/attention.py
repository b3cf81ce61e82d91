"""Multi-head attention: self-attention with GQA, q/k/v biases, q/k RMSNorm and a KV cache; cross-attention
over another sequence; and joint attention over several streams with their own projections (MMDiT / FLUX).

Shapes: b batch, t tokens, s cache slots or kv tokens, d embed, c kv input width, h|k query|kv heads,
e head_dim. Positions are injected as `rope_fn(x [b t h e]) -> [b t h e]`, so the same layer serves 1D RoPE,
M-RoPE, TUNA's 3D RoPE or no RoPE. The attention itself is `unimm_jax.kernels.attention`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from unimm_jax import kernels
from unimm_jax.layers.linear import DenseGeneral
from unimm_jax.layers.norms import RMSNorm

RopeFn = Callable[[jax.Array], jax.Array]


class Attention(nn.Module):
  """[b t d] -> [b t d]. Params q_proj [d h e], k_proj/v_proj [c k e], o_proj [h e d], q_norm/k_norm [e]
  (or [h e] / [k e] flat when `qk_norm_across_heads`).

  Without `out_proj` there is no o_proj and the output is the attention's heads [b t h e] (FLUX single-stream
  blocks project them together with their MLP branch)."""

  features: int
  heads: int
  kv_heads: int
  head_dim: int
  qkv_bias: bool = False
  o_bias: bool = False
  qk_norm: bool = False
  qk_norm_across_heads: bool = False  # one RMSNorm over all heads' features (diffusers rms_norm_across_heads)
  norm_eps: float = 1e-6
  kv_features: int | None = None     # c, the width of a cross-attention kv input (default: features)
  out_proj: bool = True
  impl: str = "auto"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  sm_scale: float | None = None      # logit scale (default 1/sqrt(e)); T5 folds it into its init and uses 1

  @nn.compact
  def __call__(
      self,
      x: jax.Array,
      *,
      kv: jax.Array | None = None,
      rope_fn: RopeFn | None = None,
      segment_ids: jax.Array | None = None,
      span_ids: jax.Array | None = None,
      causal: bool = False,
      cache: dict[str, jax.Array] | None = None,
      cache_index: jax.Array | None = None,
      kv_segment_ids: jax.Array | None = None,
      bias: jax.Array | None = None,
  ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
    """Returns (output, updated cache or None).

    Self-attention (kv None), without `cache`: attention over x itself. With `cache` ({"k", "v"}: [b s k e])
    the new k/v are written at `cache_index`; if `kv_segment_ids` [b s] is given (decode) the queries attend
    over the whole cache with it as the key mask, otherwise (prefill from slot 0) over x itself.
    Cross-attention: k/v come from `kv` [b s c], masked by its own `kv_segment_ids` [b s] (0 = padding;
    default: all valid); `segment_ids` [b t] then only marks padded queries; no cache, causality or spans.
    Self-attention without a cache takes `kv_segment_ids` as the key mask too (segment_ids default to 1, so
    padded queries still attend to the valid keys, as transformers' padding masks do). `bias` [b|1 h t s]
    is added to the logits (kernels.attention: XLA only).
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d, h, k, e = self.features, self.heads, self.kv_heads, self.head_dim
    if kv is not None and (cache is not None or causal or span_ids is not None):
      raise ValueError(f"{self.name}: cross-attention (kv) takes no cache, causal mask or span_ids")
    src = x if kv is None else kv
    c = self.kv_features or d
    q = DenseGeneral((d,), (h, e), ("embed", "heads", "head_dim"), self.qkv_bias, name="q_proj", **kw)(x)
    key = DenseGeneral((c,), (k, e), ("embed", "kv_heads", "head_dim"), self.qkv_bias, name="k_proj", **kw)(src)
    val = DenseGeneral((c,), (k, e), ("embed", "kv_heads", "head_dim"), self.qkv_bias, name="v_proj", **kw)(src)
    if self.qk_norm:  # Qwen3 / TUNA head: RMSNorm per head, before RoPE; SANA 1.5: over all heads
      q, key = (qk_rms_norm(a, self.norm_eps, self.qk_norm_across_heads, name, kw)
                for a, name in ((q, "q_norm"), (key, "k_norm")))
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
    if kv is not None:
      if segment_ids is None and kv_segment_ids is not None:
        segment_ids = jnp.ones(q.shape[:2], jnp.int32)
      out = kernels.attention(q, key, val, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, bias=bias,
                              sm_scale=self.sm_scale, impl=self.impl)
    elif cache is not None and kv_segment_ids is not None:
      out = kernels.attention(
          q, new_cache["k"].astype(q.dtype), new_cache["v"].astype(q.dtype), segment_ids=segment_ids,
          kv_segment_ids=kv_segment_ids, bias=bias, sm_scale=self.sm_scale, impl=self.impl)
    else:
      out = kernels.attention(
          q, key, val, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, span_ids=span_ids, causal=causal,
          bias=bias, sm_scale=self.sm_scale, impl=self.impl)
    out = nn.with_logical_constraint(out, ("act_batch", "act_length", "act_heads", "act_head_dim"))
    if not self.out_proj:
      return out, new_cache
    y = DenseGeneral((h, e), (d,), ("heads", "head_dim", "embed"), self.o_bias, name="o_proj", **kw)(out)
    return y, new_cache


def qk_rms_norm(x: jax.Array, eps: float, across_heads: bool, name: str, kw: dict) -> jax.Array:
  """RMSNorm of [b t h e] over e (per head) or over (h e) at once; called inside a compact module."""
  if not across_heads:
    return RMSNorm(x.shape[-1], eps, name=name, **kw)(x)
  flat = x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])
  return RMSNorm(flat.shape[-1], eps, name=name, **kw)(flat).reshape(x.shape)


class JointAttention(nn.Module):
  """One attention over the concatenation of several token streams, each with its own q/k/v/o projections and
  q/k RMSNorms (SD3 MMDiT, FLUX double-stream blocks): a list of [b t_i d_i] -> a list of [b t_i d].

  Submodule `streams[i]` holds stream i's q_proj/k_proj/v_proj [d_i h e], q_norm/k_norm [e] and o_proj
  [h e d] (no o_proj where `outputs[i]` is False: the last MMDiT block drops the context's). RoPE, if
  given, rotates the concatenated q and k in stream order (FLUX: text ids then image ids).
  """

  features: int
  heads: int
  head_dim: int
  streams: tuple[str, ...]
  in_features: tuple[int, ...] | None = None   # d_i of each stream (default: features)
  outputs: tuple[bool, ...] | None = None      # which streams get an o_proj (default: all)
  qkv_bias: bool = True
  o_bias: bool = True
  qk_norm: bool = True
  norm_eps: float = 1e-6
  impl: str = "auto"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, xs: list[jax.Array], *, rope_fn: RopeFn | None = None,
               segment_ids: jax.Array | None = None) -> list[jax.Array | None]:
    """xs in stream order; segment_ids [b sum(t_i)] over the concatenation (0 = padding) or None.
    Returns each stream's output ([b t_i d], or the attention output [b t_i h e] where it has no o_proj)."""
    if len(xs) != len(self.streams):
      raise ValueError(f"{self.name}: {len(xs)} inputs for streams {self.streams}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h, e = self.heads, self.head_dim
    dims = self.in_features or (self.features,) * len(xs)
    outputs = self.outputs or (True,) * len(xs)
    qs, ks, vs = [], [], []
    for name, d, x in zip(self.streams, dims, xs):
      proj = lambda n, d=d, name=name: DenseGeneral(  # noqa: E731
          (d,), (h, e), ("embed", "heads", "head_dim"), self.qkv_bias, name=f"{name}_{n}", **kw)
      q, key, val = proj("q_proj")(x), proj("k_proj")(x), proj("v_proj")(x)
      if self.qk_norm:
        q = RMSNorm(e, self.norm_eps, name=f"{name}_q_norm", **kw)(q)
        key = RMSNorm(e, self.norm_eps, name=f"{name}_k_norm", **kw)(key)
      qs.append(q), ks.append(key), vs.append(val)
    q, key, val = (jnp.concatenate(a, axis=1) for a in (qs, ks, vs))
    if rope_fn is not None:
      q, key = rope_fn(q), rope_fn(key)
    axes = ("act_batch", "act_length", "act_heads", "act_head_dim")
    q, key, val = (nn.with_logical_constraint(a, axes) for a in (q, key, val))
    out = nn.with_logical_constraint(kernels.attention(q, key, val, segment_ids=segment_ids, impl=self.impl), axes)
    splits = list(itertools.accumulate(x.shape[1] for x in xs))[:-1]
    results = []
    for name, part, has_out in zip(self.streams, jnp.split(out, splits, axis=1), outputs):
      results.append(DenseGeneral((h, e), (self.features,), ("heads", "head_dim", "embed"), self.o_bias,
                                  name=f"{name}_o_proj", **kw)(part) if has_out else part)
    return results
