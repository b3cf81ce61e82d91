"""FLUX.1 transformer: an MMDiT of double-stream blocks (image and text streams meeting in one joint attention)
followed by single-stream blocks (one parallel attention + MLP over [text; image]).

Reference: diffusers models/transformers/transformer_flux.py (FluxTransformer2DModel, FluxTransformerBlock,
FluxSingleTransformerBlock, FluxPosEmbed), embeddings.py (CombinedTimestep(Guidance)TextProjEmbeddings),
normalization.py (AdaLayerNormZero, AdaLayerNormZeroSingle, AdaLayerNormContinuous).
Shapes: b batch, n image tokens (2x2 patches of the latent), T text tokens, d width (= h e), h heads,
e head_dim, f mlp, c packed channels (4 z), z latent channels, p pooled-text width.

The blocks take numbers, not a FluxConfig, so other FLUX-derived DiTs (Ovis-U1's MMDiT-X) build on them.
Positions are (t, h, w) ids per token, rotated on interleaved feature pairs, one block of features per axis.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

from unimm_jax.layers import MLP, Attention, DenseGeneral, JointAttention, LayerNorm, activation, apply_rope
from unimm_jax.layers.modulation import AdaLNModulation, TimestepEmbedder, modulate
from unimm_jax.layers.rope import rope_angles_axes
from unimm_jax.layers.stack import build_layers, run_layers
from unimm_jax.models.config import DictConfig

ACT = ("act_batch", "act_length", "act_embed")


@dataclasses.dataclass(frozen=True)
class FluxConfig(DictConfig):
  """Defaults are diffusers' FluxTransformer2DModel defaults (= FLUX.1 sizes, no guidance embedding)."""

  in_channels: int = 64              # per token: a 2x2 patch of the 16-channel VAE latent
  out_channels: int | None = None    # None: in_channels
  patch_size: int = 1                # proj_out emits patch_size^2 * out_channels (the pipeline packs 2x2 itself)
  depth: int = 19                    # double-stream blocks (num_layers)
  single_depth: int = 38             # single-stream blocks (num_single_layers)
  heads: int = 24
  head_dim: int = 128
  context_dim: int = 4096            # T5 features (joint_attention_dim)
  pooled_dim: int = 768              # CLIP pooled features (pooled_projection_dim)
  guidance_embeds: bool = False      # FLUX.1-dev: the distilled guidance scale is a second timestep input
  axes_dims: tuple[int, ...] = (16, 56, 56)   # RoPE features per id axis (t, h, w); sums to head_dim
  rope_theta: float = 10000.0
  mlp_ratio: float = 4.0
  norm_eps: float = 1e-6
  # Runtime choices: they change speed and memory, never the numbers.
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_impl: str = "auto"

  def __post_init__(self):
    if sum(self.axes_dims) != self.head_dim or any(a % 2 for a in self.axes_dims):
      raise ValueError(f"FluxConfig: axes_dims {self.axes_dims} must be even and sum to head_dim {self.head_dim}")

  @property
  def embed(self) -> int:
    return self.heads * self.head_dim

  @property
  def mlp(self) -> int:
    return int(self.embed * self.mlp_ratio)

  @property
  def output_channels(self) -> int:
    return self.patch_size ** 2 * (self.out_channels or self.in_channels)

  # Released sizes: transformer/config.json of black-forest-labs/FLUX.1-dev and FLUX.1-schnell (read from stored
  # copies: MindIE FLUX.1-dev README, edkamesh/FluX-optimized transformer/config.json for schnell); they differ
  # only in guidance_embeds. 11.9B parameters.
  @classmethod
  def dev(cls, **kw) -> "FluxConfig":
    return cls(**{**dict(guidance_embeds=True), **kw})

  @classmethod
  def schnell(cls, **kw) -> "FluxConfig":
    return cls(**{**dict(guidance_embeds=False), **kw})

  @classmethod
  def tiny(cls, **kw) -> "FluxConfig":
    return cls(**{**dict(in_channels=16, depth=2, single_depth=2, heads=4, head_dim=16, context_dim=32,
                         pooled_dim=24, guidance_embeds=True, axes_dims=(4, 6, 6)), **kw})

  def num_params(self) -> int:
    d, f, e = self.embed, self.mlp, self.head_dim
    attn = 4 * (d * d + d) + 2 * e
    double = 2 * (attn + d * 6 * d + 6 * d + d * f + f + f * d + d)
    single = 3 * (d * d + d) + 2 * e + d * f + f + (d + f) * d + d + d * 3 * d + 3 * d
    time = 256 * d + d + d * d + d
    embed = (self.in_channels + 1) * d + (self.context_dim + 1) * d + (self.pooled_dim + 1) * d + d * d + d
    out = d * 2 * d + 2 * d + (d + 1) * self.output_channels
    return (self.depth * double + self.single_depth * single + time * (1 + self.guidance_embeds) + embed + out)


# diffusers config.json field -> FluxConfig field
DIFFUSERS_FIELDS = {
    "in_channels": "in_channels", "out_channels": "out_channels", "patch_size": "patch_size",
    "num_layers": "depth", "num_single_layers": "single_depth", "num_attention_heads": "heads",
    "attention_head_dim": "head_dim", "joint_attention_dim": "context_dim",
    "pooled_projection_dim": "pooled_dim", "guidance_embeds": "guidance_embeds", "axes_dims_rope": "axes_dims",
}


def config_from_diffusers(d: Mapping[str, Any]) -> FluxConfig:
  """diffusers FluxTransformer2DModel config.json (dict) -> FluxConfig; unknown fields are refused by name."""
  unknown = sorted(k for k in d if not k.startswith("_") and k not in DIFFUSERS_FIELDS)
  if unknown:
    raise ValueError(f"FluxTransformer2DModel config: fields {unknown} are not supported "
                     f"(known: {sorted(DIFFUSERS_FIELDS)})")
  return FluxConfig(**{DIFFUSERS_FIELDS[k]: tuple(v) if isinstance(v, list) else v
                       for k, v in d.items() if k in DIFFUSERS_FIELDS})


def diffusers_config(cfg: FluxConfig) -> dict[str, Any]:
  """FluxConfig -> diffusers config.json."""
  out = {"_class_name": "FluxTransformer2DModel"}
  for theirs, ours in DIFFUSERS_FIELDS.items():
    value = getattr(cfg, ours)
    out[theirs] = list(value) if isinstance(value, tuple) else value
  return out


# --- 2x2 packing of VAE latents and the position ids of the tokens -------------------------------------------

def pack_latents(z: jax.Array) -> jax.Array:
  """[b h w z] latents -> [b (h/2 w/2) (z 2 2)] tokens, each a 2x2 patch (diffusers' `_pack_latents` order)."""
  if z.ndim != 4 or z.shape[1] % 2 or z.shape[2] % 2:
    raise ValueError(f"pack_latents: latents {z.shape} must be [b h w z] with even h and w")
  return rearrange(z, "b (h p) (w q) c -> b (h w) (c p q)", p=2, q=2)


def unpack_latents(x: jax.Array, height: int, width: int) -> jax.Array:
  """Inverse of pack_latents: [b n c] tokens -> [b height width c/4] for a latent of height x width."""
  if x.shape[1] != (height // 2) * (width // 2) or height % 2 or width % 2:
    raise ValueError(f"unpack_latents: {x.shape[1]} tokens do not tile a {height}x{width} latent in 2x2 patches")
  return rearrange(x, "b (h w) (c p q) -> b (h p) (w q) c", h=height // 2, p=2, q=2)


def image_ids(height: int, width: int, frame: int = 0) -> np.ndarray:
  """[(height/2 width/2) 3] ids (frame, row, column) of the packed tokens of a height x width latent."""
  rows, cols = np.meshgrid(np.arange(height // 2), np.arange(width // 2), indexing="ij")
  return np.stack([np.full_like(rows, frame), rows, cols], axis=-1).reshape(-1, 3).astype(np.float32)


def text_ids(length: int) -> np.ndarray:
  """[T 3] ids of text tokens: all zero (FLUX gives text no position; T5 has its own)."""
  return np.zeros((length, 3), np.float32)


# --- blocks ----------------------------------------------------------------------------------------------------

def _rope(angles: jax.Array):
  return functools.partial(apply_rope, angles=angles, interleaved=True)


class TimeTextEmbed(nn.Module):
  """vec [b d] = timestep_embedder(1000 t) (+ guidance_embedder(1000 g)) + text_embedder(pooled)."""

  features: int
  pooled_dim: int
  guidance: bool
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, t: jax.Array, pooled: jax.Array, guidance: jax.Array | None) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.guidance != (guidance is not None):
      raise ValueError(f"{self.name}: guidance is {'required' if self.guidance else 'not taken'} by this model "
                       f"(guidance_embeds={self.guidance})")
    # diffusers feeds sigma in [0, 1] and multiplies by 1000 inside, in the compute dtype
    vec = TimestepEmbedder(self.features, name="timestep_embedder", **kw)(t.astype(self.dtype) * 1000)
    if self.guidance:
      vec = vec + TimestepEmbedder(self.features, name="guidance_embedder", **kw)(guidance.astype(self.dtype) * 1000)
    return vec + MLP(self.pooled_dim, self.features, "silu", out_features=self.features, name="text_embedder",
                     **kw)(pooled)


class StreamBlock(nn.Module):
  """What FLUX's blocks (and those built on them) are made of: width d = heads x head_dim, MLP width, norm eps."""

  features: int
  heads: int
  head_dim: int
  mlp: int
  eps: float = 1e-6
  impl: str = "auto"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32


class DoubleStreamBlock(StreamBlock):
  """FluxTransformerBlock: each stream is modulated by vec (AdaLN-Zero: shift, scale, gate for attention and
  MLP), both attend jointly over [text; image], then each has its own MLP.
  ((img [b n d], txt [b T d]), None, vec [b d], angles [1 T+n e/2][, segment_ids [b T+n]]) -> ((img, txt), None);
  segment_ids (0 = padding) mask padded text tokens out of the joint attention (a batch of prompts of unequal
  lengths); None: every token attends to every token.

  image_self_attention: Ovis-U1's MMDiT-X (DoubleStreamXBlock): a third image modulation (9 chunks: joint,
  MLP, self) drives an image-only self-attention (`img_self_attn`, QK-norm, RoPE of the image ids) on the
  block's normed input, added after the joint branch: img += g1 joint; img += g3 self; img += g2 MLP."""

  image_self_attention: bool = False

  @nn.compact
  def __call__(self, x, own, vec, angles, segment_ids=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d = self.features
    img, txt = x
    norm = LayerNorm(d, self.eps, use_bias=False, use_scale=False, name="layer_norm", **kw)
    img_mod = AdaLNModulation(d, 9 if self.image_self_attention else 6, name="norm1", **kw)(vec)
    txt_mod = AdaLNModulation(d, 6, name="norm1_context", **kw)(vec)
    img_mod, txt_mod = ([m[:, None] for m in mods] for mods in (img_mod, txt_mod))
    attn_txt, attn_img = JointAttention(
        d, self.heads, self.head_dim, streams=("txt", "img"), norm_eps=self.eps, impl=self.impl, name="attn", **kw)(
            [modulate(norm(txt), txt_mod[0], txt_mod[1]), modulate(norm(img), img_mod[0], img_mod[1])],
            rope_fn=_rope(angles), segment_ids=segment_ids)
    img_self = None
    if self.image_self_attention:
      shift3, scale3, gate3 = img_mod[6:]
      img_self, _ = Attention(d, self.heads, self.heads, self.head_dim, qkv_bias=True, o_bias=True, qk_norm=True,
                              norm_eps=self.eps, impl=self.impl, name="img_self_attn", **kw)(
          modulate(norm(img), shift3, scale3), rope_fn=_rope(angles[:, txt.shape[1]:]))
      img_self = gate3 * img_self
    out = []
    for h, (_, _, gate1, shift2, scale2, gate2), a, extra, ff in (
        (img, img_mod[:6], attn_img, img_self, "ff"), (txt, txt_mod, attn_txt, None, "ff_context")):
      h = h + gate1 * a
      if extra is not None:
        h = h + extra
      h = h + gate2 * MLP(d, self.mlp, "gelu_tanh", name=ff, **kw)(modulate(norm(h), shift2, scale2))
      out.append(nn.with_logical_constraint(h, ACT))
    return tuple(out), None


class SingleStreamBlock(StreamBlock):
  """FluxSingleTransformerBlock over x = [text; image]: one modulation (shift, scale, gate), attention and a
  GELU MLP in parallel, their outputs concatenated and projected together.
  (x [b T+n d], None, vec [b d], angles[, segment_ids [b T+n]]) -> (x, None); segment_ids as DoubleStreamBlock."""

  @nn.compact
  def __call__(self, x, own, vec, angles, segment_ids=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d, h, e = self.features, self.heads, self.head_dim
    shift, scale, gate = (m[:, None] for m in AdaLNModulation(d, 3, name="norm", **kw)(vec))
    y = modulate(LayerNorm(d, self.eps, use_bias=False, use_scale=False, name="layer_norm", **kw)(x), shift, scale)
    mlp = DenseGeneral((d,), (self.mlp,), ("embed", "mlp"), use_bias=True, name="proj_mlp", **kw)(y)
    mlp = nn.with_logical_constraint(activation("gelu_tanh")(mlp), ("act_batch", "act_length", "act_mlp"))
    attn, _ = Attention(d, h, h, e, qkv_bias=True, qk_norm=True, norm_eps=self.eps, out_proj=False,
                        impl=self.impl, name="attn", **kw)(y, rope_fn=_rope(angles), segment_ids=segment_ids)
    both = jnp.concatenate([rearrange(attn, "b t h e -> b t (h e)"), mlp], axis=-1)
    out = DenseGeneral((h * e + self.mlp,), (d,), ("mlp", "embed"), use_bias=True, name="proj_out", **kw)(both)
    return nn.with_logical_constraint(x + gate * out, ACT), None


class FluxTransformer2DModel(nn.Module):
  """Packed latent tokens + text features -> the velocity of each token (dx/dsigma, sampling/flow.py)."""

  cfg: FluxConfig

  def setup(self):
    cfg = self.cfg
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    d = cfg.embed
    dense = functools.partial(DenseGeneral, use_bias=True, **kw)
    self.x_embedder = dense((cfg.in_channels,), (d,), (None, "embed"))
    self.context_embedder = dense((cfg.context_dim,), (d,), (None, "embed"))
    self.time_text_embed = TimeTextEmbed(d, cfg.pooled_dim, cfg.guidance_embeds, **kw)
    block = (d, cfg.heads, cfg.head_dim, cfg.mlp, cfg.norm_eps, cfg.attention_impl, kw["dtype"], kw["param_dtype"])
    self.transformer_blocks = build_layers(DoubleStreamBlock, cfg.depth, *block, scan=False, shared=2,
                                           name="transformer_blocks")
    self.single_transformer_blocks = build_layers(SingleStreamBlock, cfg.single_depth, *block, scan=False,
                                                  shared=2, name="single_transformer_blocks")
    self.norm_out = AdaLNModulation(d, 2, **kw)      # AdaLayerNormContinuous: (scale, shift), scale first
    self.norm_out_layer_norm = LayerNorm(d, cfg.norm_eps, use_bias=False, use_scale=False, **kw)
    self.proj_out = dense((d,), (cfg.output_channels,), ("embed", None))

  def __call__(self, x: jax.Array, context: jax.Array, pooled: jax.Array, timestep: jax.Array,
               img_ids: jax.Array, txt_ids: jax.Array, guidance: jax.Array | None = None,
               txt_mask: jax.Array | None = None) -> jax.Array:
    """x [b n c] packed latents, context [b T context_dim], pooled [b p], timestep [b] (sigma in [0, 1]),
    img_ids [n 3], txt_ids [T 3] (t, h, w) ids, guidance [b] (models with guidance_embeds) -> [b n out].
    txt_mask [b T] (1 = token, 0 = padding; default: all tokens) keeps the padding of a batch of unequal
    prompts out of the joint attention, as each prompt alone would be (diffusers takes no mask)."""
    cfg = self.cfg
    if x.ndim != 3 or x.shape[-1] != cfg.in_channels:
      raise ValueError(f"FluxTransformer2DModel: latents {x.shape} must be [b n {cfg.in_channels}] "
                       f"(2x2-packed, pack_latents)")
    if context.ndim != 3 or context.shape[-1] != cfg.context_dim:
      raise ValueError(f"FluxTransformer2DModel: context {context.shape} must be [b T {cfg.context_dim}]")
    if pooled.shape != (x.shape[0], cfg.pooled_dim):
      raise ValueError(f"FluxTransformer2DModel: pooled {pooled.shape} must be [{x.shape[0]} {cfg.pooled_dim}]")
    if img_ids.shape != (x.shape[1], 3) or txt_ids.shape != (context.shape[1], 3):
      raise ValueError(f"FluxTransformer2DModel: img_ids {img_ids.shape} / txt_ids {txt_ids.shape} must be "
                       f"[{x.shape[1]} 3] / [{context.shape[1]} 3]")
    img = nn.with_logical_constraint(self.x_embedder(x), ACT)
    txt = nn.with_logical_constraint(self.context_embedder(context), ACT)
    vec = self.time_text_embed(timestep, pooled, guidance)
    angles = rope_angles_axes(jnp.concatenate([txt_ids, img_ids]), cfg.axes_dims, cfg.rope_theta)[None]
    segments = None if txt_mask is None else jnp.concatenate(
        [jnp.asarray(txt_mask, jnp.int32), jnp.ones(img.shape[:2], jnp.int32)], axis=1)
    (img, txt), _, _ = run_layers(self.transformer_blocks, (img, txt), None, vec, angles, segments)
    # diffusers concatenates and splits again in every single block; once around all of them is the same
    x, _, _ = run_layers(self.single_transformer_blocks, jnp.concatenate([txt, img], axis=1), None, vec, angles,
                         segments)
    img = x[:, txt.shape[1]:]
    scale, shift = self.norm_out(vec)
    img = modulate(self.norm_out_layer_norm(img), shift[:, None], scale[:, None])
    return self.proj_out(img)


def example_inputs(cfg: FluxConfig) -> tuple:
  """Inputs that build every param: one 2x2 latent patch and one text token."""
  b = 1
  return (jnp.zeros((b, 1, cfg.in_channels)), jnp.zeros((b, 1, cfg.context_dim)), jnp.zeros((b, cfg.pooled_dim)),
          jnp.zeros((b,)), jnp.zeros((1, 3)), jnp.zeros((1, 3)), jnp.zeros((b,)) if cfg.guidance_embeds else None)
