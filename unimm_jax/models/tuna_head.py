"""TUNA flow head: modulated attention blocks with AdaLN-Zero on image spans, and the final layer.

Reference: facebookresearch/tuna-2 tuna/models/backbones/modules_new_mm.py (ModulatedAttentionBlock,
SdpaAttention with `apply_rope_image3d_text1d`, FinalLayer, DiffusionHeadConfig).
Shapes: b batch, t tokens, n spans (images) per row, d embed, h|k heads, e head_dim, o out features.

The head runs over every position of the LLM's last hidden state with the LLM's mask. Inside an
image span the time embedding of that image modulates the block; elsewhere shift = scale = 0 and
gate = 1. RoPE depends on the token class: text tokens get 1D rotate-half RoPE with LLaMA-3-scaled
frequencies at their position, the time slot none, image tokens 3D RoPE (t, y, x) on interleaved pairs
rotated by -phi, each image starting at (0, 0, 0).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from unimm_jax import schema
from unimm_jax.layers import Attention, DenseGeneral, GatedMLP, RMSNorm, apply_rope
from unimm_jax.layers.modulation import AdaLNModulation, modulate
from unimm_jax.layers.rope import llama3_inv_frequencies, rope_angles_thw
from unimm_jax.models.config import DictConfig


@dataclasses.dataclass(frozen=True)
class TunaHeadConfig(DictConfig):
  embed: int
  mlp: int
  depth: int
  heads: int
  kv_heads: int
  head_dim: int
  out_features: int                 # p * p * channels of the generated space
  norm_eps: float = 1e-5            # block norms (DiffusionHeadConfig.rms_norm_eps)
  qk_norm_eps: float = 1e-6         # q_norm / k_norm use RMSNorm's default
  final_norm_eps: float = 1e-6      # FinalLayer.norm_final: RMSNorm's default too
  # The reference's `share_adaln` (model_args.tuna_config; off in every released config): one SiLU -> Linear(d, 6d)
  # of the time embedding for all blocks (Tuna.shared_adaln), and per block a learned (6, d) `scale_shift_table`
  # added to it instead of the block's own adaLN_modulation. The final layer keeps its own modulation.
  share_adaln: bool = False
  text_rope_theta: float = 500000.0
  text_rope_llama3: tuple[float, float, float, int] = (32.0, 1.0, 4.0, 8192)  # factor, low, high, original
  image_rope_theta: float = 10000.0
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_impl: str = "auto"


def tuna_rope_fn(cfg: TunaHeadConfig, positions: jax.Array, span_ids: jax.Array, time_slot: jax.Array,
                 thw: jax.Array, meta_slots: int = 1,
                 spatial_shapes: jax.Array | None = None) -> Callable[[jax.Array], jax.Array]:
  """RoPE by token class: positions [b t], span_ids [b t], time_slot [b t] bool, thw [b t 3] -> rope_fn.

  meta_slots: the slots opening each span (1: time; 3: height, width, time -- TunaConfig.aspect_ratio_embeds),
  which then needs spatial_shapes [b n 2]."""
  factor, low, high, original = cfg.text_rope_llama3
  inv = llama3_inv_frequencies(cfg.head_dim, cfg.text_rope_theta, factor, low, high, original)
  text_angles = positions.astype(jnp.float32)[..., None] * inv
  text = (span_ids == 0)[:, :, None, None]
  if meta_slots == 1:
    image_angles = rope_angles_thw(thw, cfg.head_dim, cfg.image_rope_theta)
    image = schema.image_tokens(span_ids, time_slot)[:, :, None, None]
  else:
    # Reference quirk, reproduced so converted checkpoints work: the head's attention calls
    # apply_rope_image3d_text1d with add_ar_embeds left False (modules_new_mm.py SdpaAttention), so the 3D
    # rotations of the h*w grid go to span slots 1 .. h*w -- the width slot gets (0, 0, 0), the time slot the
    # second grid position, image token k the position k + meta_slots - 1 -- while the height slot and the last
    # meta_slots - 1 image tokens are not rotated at all.
    grid = schema.gather_spans(spatial_shapes, span_ids, 0)
    j = schema.span_slots(span_ids) - 1
    image = ((span_ids > 0) & (j >= 0) & (j < grid[..., 0] * grid[..., 1]))[:, :, None, None]
    y, x = jnp.divmod(jnp.maximum(j, 0), jnp.maximum(grid[..., 1], 1))
    image_angles = rope_angles_thw(jnp.stack([jnp.zeros_like(y), y, x], -1), cfg.head_dim, cfg.image_rope_theta)

  def rope_fn(x: jax.Array) -> jax.Array:
    rotated_text = apply_rope(x, text_angles)
    rotated_image = apply_rope(x, -image_angles, interleaved=True)
    return jnp.where(text, rotated_text, jnp.where(image, rotated_image, x))

  return rope_fn


class ModulatedBlock(nn.Module):
  """x + g1 * attn(mod(norm(x), s1, c1)); x + g2 * mlp(mod(norm(x), s2, c2)), (s, c, g) per image span.

  cond: the spans' time embeddings [b n d], or with cfg.share_adaln the shared projection of them [b n 6d]."""

  cfg: TunaHeadConfig

  @nn.compact
  def __call__(self, x, own, cond, span_ids, rope_fn, segment_ids):
    cfg = self.cfg
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    if cfg.share_adaln:
      # reference: (scale_shift_table[None].reshape(1, -1) + adaln_input).chunk(6); its init randn / sqrt(d)
      init = nn.with_logical_partitioning(nn.initializers.normal(cfg.embed ** -0.5), (None, "embed"))
      table = self.param("scale_shift_table", init, (6, cfg.embed), jnp.dtype(cfg.param_dtype))
      chunks = tuple(jnp.split(table.reshape(-1).astype(cond.dtype) + cond, 6, axis=-1))
    else:
      chunks = AdaLNModulation(cfg.embed, 6, name="adaLN_modulation", **kw)(cond)
    shift1, scale1, gate1, shift2, scale2, gate2 = (
        schema.gather_spans(c, span_ids, outside) for c, outside in zip(chunks, (0.0, 0.0, 1.0, 0.0, 0.0, 1.0)))
    h = modulate(RMSNorm(cfg.embed, cfg.norm_eps, name="input_layernorm", **kw)(x), shift1, scale1)
    h, _ = Attention(cfg.embed, cfg.heads, cfg.kv_heads, cfg.head_dim, qk_norm=True, norm_eps=cfg.qk_norm_eps,
                     impl=cfg.attention_impl, name="self_attn", **kw)(
                         h, rope_fn=rope_fn, segment_ids=segment_ids, span_ids=span_ids, causal=True)
    x = x + (gate1 * h).astype(x.dtype)
    h = modulate(RMSNorm(cfg.embed, cfg.norm_eps, name="post_attention_layernorm", **kw)(x), shift2, scale2)
    x = x + (gate2 * GatedMLP(cfg.embed, cfg.mlp, "silu", name="mlp", **kw)(h)).astype(x.dtype)
    return nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed")), own


class FinalLayer(nn.Module):
  """Linear(mod(norm(x), shift, scale)) with (shift, scale) from the span's time embedding: [b t d] -> [b t o]."""

  cfg: TunaHeadConfig

  @nn.compact
  def __call__(self, x, cond, span_ids):
    cfg = self.cfg
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    shift, scale = (schema.gather_spans(c, span_ids, 0.0)
                    for c in AdaLNModulation(cfg.embed, 2, name="adaLN_modulation", **kw)(cond))
    h = modulate(RMSNorm(cfg.embed, cfg.final_norm_eps, name="norm_final", **kw)(x), shift, scale)
    return DenseGeneral((cfg.embed,), (cfg.out_features,), ("embed", None), use_bias=True,
                        kernel_init=nn.initializers.zeros_init(), name="linear", **kw)(h)
