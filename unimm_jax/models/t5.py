"""T5 encoder (T5 v1.0 / v1.1; T5-XXL is FLUX.1's `text_encoder_2`).

Paper: Raffel et al., "Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer"
(arXiv 1910.10683); v1.1 (gated-GELU FF, no dropout in pre-training, untied head) from the T5 repo's notes.
Reference: transformers models/t5/modeling_t5.py (T5EncoderModel, T5Stack, T5Attention).
Shapes: b batch, t tokens (queries), s tokens (keys), d embed, h heads, e head_dim (d_kv), f mlp (d_ff),
v vocab, n relative-position buckets.

What makes T5 T5: no absolute positions; instead one learned bias per (bucket of j - i, head), added to
the attention logits of every layer (only layer 0 holds the table: `relative_attention_bias` [n h]); no
1/sqrt(e) logit scale (folded into the init); RMS-style LayerNorm without mean or bias; no biases anywhere.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

from unimm_jax.layers import MLP, Attention, Embed, GatedMLP, RMSNorm, activation
from unimm_jax.layers.stack import build_layers, check_remat, run_layers
from unimm_jax.models.config import DictConfig

MODEL_TYPES = ("t5",)


@dataclasses.dataclass(frozen=True)
class T5Config(DictConfig):
  vocab: int = 32128
  embed: int = 512                    # d_model
  heads: int = 8
  head_dim: int = 64                  # d_kv (heads * head_dim need not equal embed)
  mlp: int = 2048                     # d_ff
  depth: int = 6
  num_buckets: int = 32               # relative_attention_num_buckets
  max_distance: int = 128             # relative_attention_max_distance
  norm_eps: float = 1e-6
  act: str = "relu"                   # T5 v1.0: relu; v1.1 "gated-gelu": gelu_new (tanh approximation)
  gated: bool = False                 # v1.1: wo(act(wi_0 x) * wi_1 x)
  # Runtime choices: they change speed and memory, never the numbers.
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = False
  remat: str = "none"                 # none | full | dots
  attention_impl: str = "auto"        # the position bias needs the XLA attention ("auto" picks it)

  def __post_init__(self):
    activation(self.act)  # raises on an unknown name
    check_remat(self.remat, "T5Config")
    if self.num_buckets < 4 or self.num_buckets % 4:
      raise ValueError(f"T5Config: num_buckets {self.num_buckets} must be a positive multiple of 4 (two "
                       "directions, each half exact and half logarithmic)")

  @property
  def num_layers(self) -> int:
    return self.depth

  @classmethod
  def t5_v1_1_xxl(cls, **kw) -> "T5Config":
    """google/t5-v1_1-xxl's encoder = FLUX.1-dev / -schnell `text_encoder_2/config.json` (T5EncoderModel):
    d_model 4096, d_kv 64, d_ff 10240, 24 layers, 64 heads, 32 buckets up to 128, gated-gelu, vocab 32128."""
    return cls(**{**dict(vocab=32128, embed=4096, heads=64, head_dim=64, mlp=10240, depth=24, act="gelu_new",
                         gated=True), **kw})

  @classmethod
  def tiny(cls, **kw) -> "T5Config":
    return cls(**{**dict(vocab=128, embed=64, heads=4, head_dim=24, mlp=96, depth=2, num_buckets=8,
                         max_distance=16, act="gelu_new", gated=True), **kw})


def config_from_hf(hf: Mapping[str, Any] | Any) -> T5Config:
  """HF T5 config (T5EncoderModel or T5ForConditionalGeneration; dict or PretrainedConfig) -> T5Config."""
  d = hf if isinstance(hf, Mapping) else hf.to_dict()
  model_type = d.get("model_type")
  if model_type not in MODEL_TYPES:
    raise ValueError(f"unsupported model_type {model_type!r}; supported: {MODEL_TYPES} (umT5 has a position "
                     "bias table per layer, mT5 another vocabulary: neither is built here)")
  # As transformers' T5Config: "gated-ACT" or "ACT", and gated-gelu means the tanh approximation.
  proj = d.get("feed_forward_proj", "relu")
  parts = proj.split("-")
  if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
    raise ValueError(f"{model_type}: feed_forward_proj {proj!r} is not 'gated-ACT' or 'ACT'")
  act = "gelu_new" if proj == "gated-gelu" else parts[-1]
  return T5Config(
      vocab=d.get("vocab_size", 32128), embed=d.get("d_model", 512), heads=d.get("num_heads", 8),
      head_dim=d.get("d_kv", 64), mlp=d.get("d_ff", 2048), depth=d.get("num_layers", 6),
      num_buckets=d.get("relative_attention_num_buckets", 32),
      max_distance=d.get("relative_attention_max_distance", 128),
      norm_eps=float(d.get("layer_norm_epsilon", 1e-6)), act=act, gated=parts[0] == "gated" and len(parts) == 2)


def relative_position_buckets(t: int, s: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """[t s] int32 bucket of key j relative to query i (bidirectional, as in the encoder).

  Half the buckets per direction; of those, the first half are exact distances, the rest logarithmic up to
  max_distance (everything beyond shares the last). Computed on the host in float32 with the same operations
  as transformers' `_relative_position_bucket`: the distances 2x, 4x, ... the exact range land exactly on a
  bucket edge, so the rounding of that log must be torch's, not that of whichever device runs the model.
  """
  rel = np.arange(s)[None, :] - np.arange(t)[:, None]
  half = num_buckets // 2
  buckets = (rel > 0).astype(np.int64) * half
  dist = np.abs(rel)
  exact = half // 2
  with np.errstate(divide="ignore"):  # log(0) where the distance is exact anyway
    log_ratio = np.log(dist.astype(np.float32) / np.float32(exact)) / np.float32(math.log(max_distance / exact))
  large = exact + np.nan_to_num(log_ratio * np.float32(half - exact), neginf=0.0).astype(np.int64)
  return (buckets + np.where(dist < exact, dist, np.minimum(large, half - 1))).astype(np.int32)


@flax.struct.dataclass
class T5Output:
  last_hidden_state: jax.Array        # [b t d], after the final norm
  hidden_states: tuple | None         # depth + 1 entries [b t d] as transformers' output_hidden_states:
                                      # embeddings, each layer's output, the last one after the final norm


class T5Block(nn.Module):
  """x + attn(norm(x), + position bias); x + ff(norm(x)). HF names: layer.0 (SelfAttention, layer_norm),
  layer.1 (DenseReluDense, layer_norm)."""

  cfg: T5Config

  @nn.compact
  def __call__(self, x: jax.Array, own: None, bias: jax.Array, kv_segment_ids: jax.Array | None):
    cfg = self.cfg
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    h = RMSNorm(cfg.embed, cfg.norm_eps, name="attn_layer_norm", **kw)(x)
    h, _ = Attention(cfg.embed, cfg.heads, cfg.heads, cfg.head_dim, sm_scale=1.0, impl=cfg.attention_impl,
                     name="self_attn", **kw)(h, bias=bias, kv_segment_ids=kv_segment_ids)
    x = x + h
    h = RMSNorm(cfg.embed, cfg.norm_eps, name="ff_layer_norm", **kw)(x)
    ff = (GatedMLP(cfg.embed, cfg.mlp, cfg.act, name="mlp", **kw) if cfg.gated
          else MLP(cfg.embed, cfg.mlp, cfg.act, use_bias=False, name="mlp", **kw))
    x = nn.with_logical_constraint(x + ff(h), ("act_batch", "act_length", "act_embed"))
    return x, own


class T5EncoderModel(nn.Module):
  """Token ids -> T5Output (transformers' T5EncoderModel)."""

  cfg: T5Config

  def setup(self):
    cfg = self.cfg
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    self.shared = Embed(cfg.vocab, cfg.embed, **kw)
    self.relative_attention_bias = self.param(
        "relative_attention_bias", nn.with_logical_partitioning(nn.initializers.normal(cfg.embed ** -0.5),
                                                                (None, "heads")),
        (cfg.num_buckets, cfg.heads), jnp.dtype(cfg.param_dtype))
    self.layers = build_layers(T5Block, cfg.depth, cfg, scan=cfg.scan_layers, remat=cfg.remat, shared=2)
    self.final_layer_norm = RMSNorm(cfg.embed, cfg.norm_eps, **kw)

  def position_bias(self, t: int, s: int) -> jax.Array:
    """[1 h t s] fp32: the bias every layer adds to its logits."""
    buckets = relative_position_buckets(t, s, self.cfg.num_buckets, self.cfg.max_distance)
    values = jnp.take(self.relative_attention_bias.astype(jnp.float32), jnp.asarray(buckets), axis=0)
    return rearrange(values, "t s h -> 1 h t s")

  def __call__(self, input_ids: jax.Array | None = None, *, inputs_embeds: jax.Array | None = None,
               attention_mask: jax.Array | None = None, return_hidden_states: bool = False) -> T5Output:
    """input_ids [b t] or inputs_embeds [b t d]; attention_mask [b t] (1 = token, 0 = padding; None: all
    tokens). As in transformers, padding is masked as a key only: padded positions still get outputs. Any
    length runs (relative positions have no table to outgrow)."""
    cfg = self.cfg
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("T5EncoderModel: pass exactly one of input_ids and inputs_embeds")
    x = self.shared(input_ids) if inputs_embeds is None else inputs_embeds.astype(jnp.dtype(cfg.dtype))
    b, t = x.shape[:2]
    if attention_mask is not None and attention_mask.shape != (b, t):
      raise ValueError(f"T5EncoderModel: attention_mask {attention_mask.shape} must be [b t]={(b, t)}")
    x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
    kv_segment_ids = None if attention_mask is None else attention_mask.astype(jnp.int32)
    x_in = x
    x, hidden, _ = run_layers(self.layers, x, None, self.position_bias(t, t), kv_segment_ids,
                              hidden_states=return_hidden_states)
    x = self.final_layer_norm(x)
    return T5Output(last_hidden_state=x,
                    hidden_states=(x_in, *hidden[:-1], x) if return_hidden_states else None)
