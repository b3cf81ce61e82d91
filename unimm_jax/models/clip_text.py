"""CLIP text transformer (CLIP-L/14's is FLUX.1's `text_encoder`, whose pooled output conditions the DiT).

Paper: Radford et al., "Learning Transferable Visual Models From Natural Language Supervision" (arXiv 2103.00020).
Reference: transformers models/clip/modeling_clip.py (CLIPTextModel, CLIPTextModelWithProjection).
Shapes: b batch, t tokens, d embed, h heads, f mlp, v vocab, p projection.

Token + learned absolute position embeddings, causal pre-LN blocks (layers.PreLNBlock), a final LayerNorm; the
pooled output is the final state at the end-of-text token, found as transformers finds it (see `eos_index`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from unimm_jax.layers import DenseGeneral, Embed, LayerNorm, PreLNBlock, activation
from unimm_jax.layers.stack import build_layers, check_remat, run_layers
from unimm_jax.models.config import DictConfig

MODEL_TYPES = ("clip_text_model",)
# Configs written before transformers PR #24773 carry eos_token_id 2 (a wrong id, CLIP's is 49407); for them the
# end-of-text token is found as the largest id of the row, which it is in CLIP's vocabulary.
LEGACY_EOS_TOKEN_ID = 2


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(DictConfig):
  vocab: int = 49408
  embed: int = 512
  mlp: int = 2048
  depth: int = 12
  heads: int = 8
  max_positions: int = 77             # the learned position table: longer prompts are refused
  norm_eps: float = 1e-5
  act: str = "quick_gelu"             # CLIP-L: quick_gelu; OpenCLIP-G (SDXL's second encoder): gelu
  eos_token_id: int = 49407
  with_projection: bool = False       # CLIPTextModelWithProjection: text_projection [d p], no bias
  projection_dim: int = 512
  # Runtime choices: they change speed and memory, never the numbers.
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = False
  remat: str = "none"                 # none | full | dots
  attention_impl: str = "auto"

  def __post_init__(self):
    if self.embed % self.heads:
      raise ValueError(f"CLIPTextConfig: embed {self.embed} is not a multiple of heads {self.heads}")
    activation(self.act)
    check_remat(self.remat, "CLIPTextConfig")

  @property
  def num_layers(self) -> int:
    return self.depth

  @classmethod
  def clip_l14(cls, **kw) -> "CLIPTextConfig":
    """openai/clip-vit-large-patch14's text tower = FLUX.1 `text_encoder/config.json` (CLIPTextModel): width 768,
    12 layers, 12 heads, MLP 3072, quick_gelu, 77 positions, eos_token_id 2 (legacy argmax pooling)."""
    return cls(**{**dict(embed=768, mlp=3072, depth=12, heads=12, eos_token_id=LEGACY_EOS_TOKEN_ID,
                         projection_dim=768), **kw})

  @classmethod
  def tiny(cls, **kw) -> "CLIPTextConfig":
    return cls(**{**dict(vocab=99, embed=64, mlp=96, depth=2, heads=4, max_positions=16, eos_token_id=98,
                         projection_dim=48), **kw})


def config_from_hf(hf: Mapping[str, Any] | Any) -> CLIPTextConfig:
  """HF CLIPTextConfig (dict or PretrainedConfig) -> CLIPTextConfig; `architectures` says whether the
  directory holds a CLIPTextModelWithProjection."""
  d = hf if isinstance(hf, Mapping) else hf.to_dict()
  model_type = d.get("model_type")
  if model_type not in MODEL_TYPES:
    raise ValueError(f"unsupported model_type {model_type!r}; supported: {MODEL_TYPES}")
  eos = d.get("eos_token_id", 49407)
  if not isinstance(eos, int):
    raise NotImplementedError(f"{model_type}: eos_token_id {eos!r} (a list) is not supported; transformers "
                              "pools at one id")
  return CLIPTextConfig(
      vocab=d.get("vocab_size", 49408), embed=d.get("hidden_size", 512), mlp=d.get("intermediate_size", 2048),
      depth=d.get("num_hidden_layers", 12), heads=d.get("num_attention_heads", 8),
      max_positions=d.get("max_position_embeddings", 77), norm_eps=float(d.get("layer_norm_eps", 1e-5)),
      act=d.get("hidden_act", "quick_gelu"), eos_token_id=eos,
      with_projection="CLIPTextModelWithProjection" in (d.get("architectures") or ()),
      projection_dim=d.get("projection_dim", 512))


def eos_index(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
  """[b t] -> [b]: where transformers' CLIPTextModel pools. Legacy configs (eos_token_id 2): the largest id of the
  row; otherwise the first eos_token_id (position 0 if the row has none, as torch's argmax gives)."""
  if eos_token_id == LEGACY_EOS_TOKEN_ID:
    return jnp.argmax(input_ids, axis=-1)
  return jnp.argmax(input_ids == eos_token_id, axis=-1)


@flax.struct.dataclass
class CLIPTextOutput:
  last_hidden_state: jax.Array        # [b t d], after the final LayerNorm
  pooler_output: jax.Array            # [b d]: last_hidden_state at eos_index
  text_embeds: jax.Array | None       # [b p] text_projection(pooler_output) when with_projection
  hidden_states: tuple | None         # depth + 1 entries [b t d] as transformers' output_hidden_states:
                                      # embeddings, then each layer's output (the last one before the final norm)


class CLIPTextModel(nn.Module):
  """Token ids -> CLIPTextOutput (transformers' CLIPTextModel, or CLIPTextModelWithProjection)."""

  cfg: CLIPTextConfig

  def setup(self):
    cfg = self.cfg
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    self.token_embedding = Embed(cfg.vocab, cfg.embed, **kw)
    self.position_embedding = self.param(
        "position_embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
        (cfg.max_positions, cfg.embed), jnp.dtype(cfg.param_dtype))
    self.layers = build_layers(
        PreLNBlock, cfg.depth, cfg.embed, cfg.heads, cfg.mlp, cfg.act, cfg.norm_eps, causal=True,
        impl=cfg.attention_impl, scan=cfg.scan_layers, remat=cfg.remat, shared=2, **kw)
    self.final_layer_norm = LayerNorm(cfg.embed, cfg.norm_eps, **kw)
    if cfg.with_projection:
      self.text_projection = DenseGeneral((cfg.embed,), (cfg.projection_dim,), ("embed", None), **kw)

  def __call__(self, input_ids: jax.Array, *, attention_mask: jax.Array | None = None,
               return_hidden_states: bool = False) -> CLIPTextOutput:
    """input_ids [b t] with t <= max_positions (transformers raises past the table too; its tokenizer truncates
    only when called with truncation=True, as FLUX's pipeline does); attention_mask [b t] (1 = token, 0 = padding,
    masked as a key: right-padded rows, as CLIP's tokenizer pads, match transformers at every position)."""
    cfg = self.cfg
    b, t = input_ids.shape
    if t > cfg.max_positions:
      raise ValueError(f"CLIPTextModel: input_ids {input_ids.shape} have {t} tokens, more than the "
                       f"{cfg.max_positions} positions of the table (max_position_embeddings); truncate the prompt")
    if attention_mask is not None and attention_mask.shape != (b, t):
      raise ValueError(f"CLIPTextModel: attention_mask {attention_mask.shape} must be [b t]={(b, t)}")
    x = self.token_embedding(input_ids) + self.position_embedding[:t].astype(jnp.dtype(cfg.dtype))
    x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
    kv_segment_ids = None if attention_mask is None else attention_mask.astype(jnp.int32)
    x_in = x
    x, hidden, _ = run_layers(self.layers, x, None, None, kv_segment_ids, hidden_states=return_hidden_states)
    x = self.final_layer_norm(x)
    pooled = jnp.take_along_axis(x, eos_index(input_ids, cfg.eos_token_id)[:, None, None], axis=1)[:, 0]
    return CLIPTextOutput(
        last_hidden_state=x, pooler_output=pooled,
        text_embeds=self.text_projection(pooled) if cfg.with_projection else None,
        hidden_states=(x_in, *hidden) if return_hidden_states else None)
