"""Qwen2 / Qwen2.5 / Qwen3 decoder (and the Qwen2.5-VL text model with M-RoPE).

Reference: transformers models/qwen2/modeling_qwen2.py, qwen3/modeling_qwen3.py,
qwen2_5_vl/modeling_qwen2_5_vl.py (Qwen2_5_VLTextModel).
Shapes: b batch, t tokens, s cache slots, d embed, h|k query|kv heads, e head_dim, f mlp, v vocab,
l layers.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from unimm_jax.layers import Attention, DenseGeneral, Embed, GatedMLP, RMSNorm, apply_rope
from unimm_jax.layers import rope_angles, rope_angles_mrope
from unimm_jax.layers.stack import build_layers, check_remat, run_layers
from unimm_jax.models.config import DictConfig

MODEL_TYPES = ("qwen2", "qwen3", "qwen2_5_vl_text")


@dataclasses.dataclass(frozen=True)
class QwenConfig(DictConfig):
  vocab: int
  embed: int
  mlp: int
  depth: int
  heads: int
  kv_heads: int
  head_dim: int
  model_type: str = "qwen2"
  qkv_bias: bool = True        # Qwen2/2.5 have q/k/v biases ...
  qk_norm: bool = False        # ... Qwen3 drops them and RMS-normalises q and k per head.
  o_bias: bool = False         # Qwen3 with attention_bias=True biases o_proj too (with q/k/v)
  tie_embeddings: bool = False
  rope_theta: float = 1e6
  mrope_sections: tuple[int, ...] | None = None  # Qwen2.5-VL (16, 24, 24): positions become [b t 3]
  norm_eps: float = 1e-6
  act: str = "silu"
  # Runtime choices: they change speed and memory, never the numbers.
  dtype: str = "float32"         # compute
  param_dtype: str = "float32"   # storage
  scan_layers: bool = False
  remat: str = "none"            # none | full | dots (save matmul outputs)
  attention_impl: str = "auto"

  def __post_init__(self):
    if self.model_type not in MODEL_TYPES:
      raise ValueError(f"QwenConfig.model_type {self.model_type!r} is not one of {MODEL_TYPES}")
    if self.heads % self.kv_heads:
      raise ValueError(f"QwenConfig: heads {self.heads} is not a multiple of kv_heads {self.kv_heads}")
    check_remat(self.remat, "QwenConfig")

  # Released sizes (the HF config.json of each) and a CPU-sized tiny.
  @classmethod
  def qwen2_5_0_5b(cls, **kw) -> "QwenConfig":
    return cls(**{**dict(vocab=151936, embed=896, mlp=4864, depth=24, heads=14, kv_heads=2, head_dim=64,
                         tie_embeddings=True), **kw})

  @classmethod
  def qwen2_5_1_5b(cls, **kw) -> "QwenConfig":
    return cls(**{**dict(vocab=151936, embed=1536, mlp=8960, depth=28, heads=12, kv_heads=2, head_dim=128,
                         tie_embeddings=True), **kw})

  @classmethod
  def qwen2_5_7b(cls, **kw) -> "QwenConfig":
    return cls(**{**dict(vocab=152064, embed=3584, mlp=18944, depth=28, heads=28, kv_heads=4, head_dim=128), **kw})

  @classmethod
  def qwen3_1_7b(cls, **kw) -> "QwenConfig":
    return cls(**{**dict(vocab=151936, embed=2048, mlp=6144, depth=28, heads=16, kv_heads=8, head_dim=128,
                         model_type="qwen3", qkv_bias=False, qk_norm=True, tie_embeddings=True), **kw})

  @classmethod
  def tiny(cls, **kw) -> "QwenConfig":
    return cls(**{**dict(vocab=256, embed=64, mlp=128, depth=2, heads=4, kv_heads=2, head_dim=16), **kw})

  def num_params(self) -> int:
    attn = self.embed * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
    bias = self.head_dim * (self.heads + 2 * self.kv_heads) if self.qkv_bias else 0
    bias += self.embed if self.o_bias else 0
    norms = 2 * self.embed + (2 * self.head_dim if self.qk_norm else 0)
    layer = attn + bias + 3 * self.embed * self.mlp + norms
    head = 0 if self.tie_embeddings else self.vocab * self.embed
    return self.vocab * self.embed + self.depth * layer + self.embed + head


def config_from_hf(hf: Mapping[str, Any] | Any) -> QwenConfig:
  """HF config (dict from config.json or a PretrainedConfig) -> QwenConfig."""
  d = hf if isinstance(hf, Mapping) else hf.to_dict()
  model_type = d.get("model_type")
  if model_type == "qwen2_5_vl":  # full VL config: the decoder lives in text_config
    d = {**d, **d.get("text_config", {}), "model_type": "qwen2_5_vl_text"}
    model_type = "qwen2_5_vl_text"
  if model_type not in MODEL_TYPES:
    raise ValueError(f"unsupported model_type {model_type!r}; supported: {MODEL_TYPES}")
  if d.get("use_sliding_window"):
    raise NotImplementedError(f"{model_type}: use_sliding_window=True is not supported")
  rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in ("default", "mrope"):
    raise NotImplementedError(f"{model_type}: rope type {rope_type!r} is not supported (default, mrope)")
  theta = rope.get("rope_theta", d.get("rope_theta", 1e6 if model_type != "qwen2" else 1e4))
  heads = d["num_attention_heads"]
  mrope = rope.get("mrope_section")
  if model_type == "qwen2_5_vl_text" and mrope is None:
    mrope = [16, 24, 24]  # transformers' default
  return QwenConfig(
      vocab=d["vocab_size"], embed=d["hidden_size"], mlp=d["intermediate_size"],
      depth=d["num_hidden_layers"], heads=heads, kv_heads=d.get("num_key_value_heads") or heads,
      head_dim=d.get("head_dim") or d["hidden_size"] // heads, model_type=model_type,
      qkv_bias=model_type != "qwen3" or bool(d.get("attention_bias", False)),
      qk_norm=model_type == "qwen3", o_bias=model_type == "qwen3" and bool(d.get("attention_bias", False)),
      tie_embeddings=bool(d.get("tie_word_embeddings", False)),
      rope_theta=float(theta), mrope_sections=tuple(mrope) if mrope else None,
      norm_eps=float(d.get("rms_norm_eps", 1e-6)), act=d.get("hidden_act", "silu"))


@flax.struct.dataclass
class DecoderOutput:
  logits: jax.Array | None            # [b t v] fp32, None when return_logits=False
  hidden_states: tuple | None         # depth + 1 entries [b t d], as transformers' output_hidden_states
  last_hidden_state: jax.Array        # [b t d], after the final norm
  cache: Any = None                   # updated KV cache when one was passed


class DecoderLayer(nn.Module):
  """Pre-norm block: x + attn(norm(x)); x + mlp(norm(x))."""

  cfg: QwenConfig

  @nn.compact
  def __call__(self, x, cache, angles, segment_ids, span_ids, cache_index, kv_segment_ids):
    cfg = self.cfg
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    rope_fn = None if angles is None else functools.partial(apply_rope, angles=angles)
    h = RMSNorm(cfg.embed, cfg.norm_eps, name="input_layernorm", **kw)(x)
    h, cache = Attention(
        cfg.embed, cfg.heads, cfg.kv_heads, cfg.head_dim, qkv_bias=cfg.qkv_bias, o_bias=cfg.o_bias,
        qk_norm=cfg.qk_norm, norm_eps=cfg.norm_eps, impl=cfg.attention_impl, name="self_attn", **kw)(
            h, rope_fn=rope_fn, segment_ids=segment_ids, span_ids=span_ids, causal=True, cache=cache,
            cache_index=cache_index, kv_segment_ids=kv_segment_ids)
    x = x + h
    h = RMSNorm(cfg.embed, cfg.norm_eps, name="post_attention_layernorm", **kw)(x)
    x = x + GatedMLP(cfg.embed, cfg.mlp, cfg.act, name="mlp", **kw)(h)
    x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
    return x, cache


def segment_positions(segment_ids: jax.Array) -> jax.Array:
  """[b t] segment ids -> [b t] positions restarting at 0 at each change of id."""
  t = segment_ids.shape[1]
  idx = jnp.broadcast_to(jnp.arange(t), segment_ids.shape)
  change = jnp.concatenate(
      [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  start = jax.lax.cummax(jnp.where(change, idx, 0), axis=1)
  return idx - start


class Qwen(nn.Module):
  """Token ids or embeddings -> logits (and hidden states, and the updated KV cache)."""

  cfg: QwenConfig

  def setup(self):
    cfg = self.cfg
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    self.embed_tokens = Embed(cfg.vocab, cfg.embed, **kw)
    self.layers = build_layers(DecoderLayer, cfg.depth, cfg, scan=cfg.scan_layers, remat=cfg.remat, shared=5)
    self.norm = RMSNorm(cfg.embed, cfg.norm_eps, **kw)
    if not cfg.tie_embeddings:
      self.lm_head = DenseGeneral((cfg.embed,), (cfg.vocab,), ("embed", "vocab"), **kw)

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """[b t] -> [b t d]; multimodal models splice image embeddings into this."""
    return self.embed_tokens(input_ids)

  def __call__(
      self,
      input_ids: jax.Array | None = None,
      *,
      inputs_embeds: jax.Array | None = None,
      positions: jax.Array | None = None,
      segment_ids: jax.Array | None = None,
      span_ids: jax.Array | None = None,
      cache: Any = None,
      cache_index: jax.Array | int = 0,
      kv_segment_ids: jax.Array | None = None,
      return_hidden_states: bool = False,
      return_logits: bool = True,
  ) -> DecoderOutput:
    """Causal decoding over packed rows.

    input_ids [b t] or inputs_embeds [b t d]; positions [b t] (or [b t 3] with M-RoPE; default:
    restart at each segment); segment_ids [b t] (0 = padding); span_ids [b t] bidirectional spans.
    With `cache` (from `init_cache`): prefill writes slots from `cache_index`; decode passes
    `kv_segment_ids` [b s] marking the valid cache slots.
    """
    cfg = self.cfg
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("Qwen: pass exactly one of input_ids and inputs_embeds")
    x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(jnp.dtype(cfg.dtype))
    b, t = x.shape[:2]
    x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
    if positions is None:
      positions = (segment_positions(segment_ids) if segment_ids is not None
                   else jnp.broadcast_to(jnp.arange(t), (b, t)))
    if cfg.mrope_sections is not None:
      if positions.ndim == 2:
        positions = jnp.repeat(positions[..., None], 3, axis=-1)
      angles = rope_angles_mrope(positions, cfg.head_dim, cfg.rope_theta, cfg.mrope_sections)
    else:
      if positions.ndim != 2:
        raise ValueError(f"Qwen: positions {positions.shape} must be [b t] without mrope_sections")
      angles = rope_angles(positions, cfg.head_dim, cfg.rope_theta)
    cache_index = jnp.asarray(cache_index, jnp.int32)

    x_in = x
    x, hidden, cache = run_layers(self.layers, x, cache, angles, segment_ids, span_ids, cache_index, kv_segment_ids,
                                  hidden_states=return_hidden_states)
    x = self.norm(x)
    hidden = (x_in, *hidden[:-1], x)  # transformers reports the normed output as the last hidden state
    logits = None
    if return_logits:
      logits = self.embed_tokens.attend(x) if cfg.tie_embeddings else self.lm_head(x)
      logits = nn.with_logical_constraint(logits.astype(jnp.float32), ("act_batch", "act_length", "act_vocab"))
    return DecoderOutput(
        logits=logits, hidden_states=tuple(hidden) if return_hidden_states else None,
        last_hidden_state=x, cache=cache)


def init_cache(cfg: QwenConfig, batch: int, length: int, dtype: str | None = None) -> Any:
  """Zero KV cache in the layout the model expects: per layer {"k", "v"}: [b s k e] (stacked on l if scanned)."""
  dtype = jnp.dtype(dtype or cfg.dtype)
  shape = (batch, length, cfg.kv_heads, cfg.head_dim)
  if cfg.scan_layers:
    return {"k": jnp.zeros((cfg.depth, *shape), dtype), "v": jnp.zeros((cfg.depth, *shape), dtype)}
  return {f"layers_{i}": {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for i in range(cfg.depth)}
