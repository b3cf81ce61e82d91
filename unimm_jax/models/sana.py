"""SANA: the linear-attention diffusion transformer (Xie et al. 2024, arXiv:2410.10629; SANA 1.5, arXiv:2501.18427).

Reference: diffusers models/transformers/sana_transformer.py (SanaTransformer2DModel, SanaTransformerBlock,
GLUMBConv, SanaModulatedNorm), normalization.py (AdaLayerNormSingle), embeddings.py (PatchEmbed,
PixArtAlphaTextProjection, get_2d_sincos_pos_embed).
Shapes: b batch, H W latent rows / columns, h w patch grid (H/p, W/p), c latent channels, l caption tokens,
k caption channels, d embed.

A block: x + g1 * linear_attn(mod(LN(x))); x + cross_attn(x, caption) (no norm, no gate); x + g2 * mixffn(mod(LN(x))),
where (shift, scale, gate) x 2 are one AdaLN-single projection of the timestep shared by every block plus each
block's learned `scale_shift_table`. Images stay [b h w d] between blocks (the Mix-FFN convolves them);
attention sees the h*w tokens in row-major order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

from unimm_jax.layers import Attention, Conv, DenseGeneral, GLUMBConv, LayerNorm, LinearAttention, RMSNorm
from unimm_jax.layers.modulation import AdaLNModulation, TimestepEmbedder, modulate
from unimm_jax.layers.stack import build_layers, check_remat, run_layers
from unimm_jax.models.config import DictConfig

QK_NORMS = (None, "rms_norm_across_heads")
ACT = ("act_batch", "act_height", "act_width", "act_embed")


@dataclasses.dataclass(frozen=True)
class SanaConfig(DictConfig):
  """diffusers' SanaTransformer2DModel config (same names and defaults)."""

  in_channels: int = 32
  out_channels: int = 32
  num_attention_heads: int = 70
  attention_head_dim: int = 32
  num_layers: int = 20
  num_cross_attention_heads: int = 20
  cross_attention_head_dim: int = 112
  cross_attention_dim: int = 2240
  caption_channels: int = 2304
  mlp_ratio: float = 2.5
  attention_bias: bool = False            # q/k/v biases of the self-attention (its output always has one)
  sample_size: int = 32                   # latent size trained at: the sincos table's base size, resolution bins
  patch_size: int = 1
  norm_elementwise_affine: bool = False   # the pre-FFN LayerNorm's scale and bias
  norm_eps: float = 1e-6
  interpolation_scale: float | None = None  # None: no position embedding (512 / 1024 px); 2K / 4K: sincos
  guidance_embeds: bool = False           # SANA-Sprint: an embedded guidance scale adds to the timestep embedding
  guidance_embeds_scale: float = 0.1      # what the Sprint pipeline multiplies the guidance by (not the model)
  qk_norm: str | None = None              # SANA 1.5: "rms_norm_across_heads" on both attentions
  timestep_scale: float = 1.0             # the pipeline multiplies the scheduler's timestep by this
  # Runtime choices: they change speed and memory, never the numbers.
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = False
  remat: str = "none"
  attention_impl: str = "auto"

  def __post_init__(self):
    if self.qk_norm not in QK_NORMS:
      raise ValueError(f"SanaConfig.qk_norm {self.qk_norm!r} is not one of {QK_NORMS}")
    if self.cross_attention_dim != self.inner_dim:
      raise ValueError(f"SanaConfig: cross_attention_dim {self.cross_attention_dim} must equal the width "
                       f"num_attention_heads * attention_head_dim = {self.inner_dim} (the caption is projected to it)")
    check_remat(self.remat, "SanaConfig")

  @property
  def inner_dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @property
  def mlp_hidden(self) -> int:
    return int(self.mlp_ratio * self.inner_dim)

  # Released sizes. Numbers from diffusers scripts/convert_sana_to_diffusers.py (the script that wrote the
  # Efficient-Large-Model/*_diffusers config.json files: model_kwargs per model_type, sample_size = px / 32,
  # interpolation_scale None at 512 / 1024 px, qk_norm for SANA 1.5) and the SANA1.5_1.6B_1024px transformer
  # config.json as pinned by a downstream loader (20 layers, 70 x 32, cross 20 x 112, rms_norm_across_heads).
  @classmethod
  def sana_600m_512(cls, **kw) -> "SanaConfig":
    """Efficient-Large-Model/Sana_600M_512px_diffusers (OpenUni-B-512)."""
    return cls(**{**dict(num_attention_heads=36, attention_head_dim=32, num_layers=28, num_cross_attention_heads=16,
                         cross_attention_head_dim=72, cross_attention_dim=1152, sample_size=16), **kw})

  @classmethod
  def sana_1600m_512(cls, **kw) -> "SanaConfig":
    """Efficient-Large-Model/Sana_1600M_512px_diffusers (OpenUni-L-512, Ming-Lite-Uni)."""
    return cls(**{**dict(num_attention_heads=70, attention_head_dim=32, num_layers=20, num_cross_attention_heads=20,
                         cross_attention_head_dim=112, cross_attention_dim=2240, sample_size=16), **kw})

  @classmethod
  def sana1_5_1600m_1024(cls, **kw) -> "SanaConfig":
    """Efficient-Large-Model/SANA1.5_1.6B_1024px_diffusers (OpenUni-L-1024)."""
    return cls.sana_1600m_512(**{**dict(sample_size=32, qk_norm="rms_norm_across_heads"), **kw})

  @classmethod
  def tiny(cls, **kw) -> "SanaConfig":
    return cls(**{**dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                         num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
                         caption_channels=12, sample_size=8), **kw})


def config_from_diffusers(d: Mapping[str, Any]) -> SanaConfig:
  """diffusers transformer/config.json (dict) -> SanaConfig; options this module does not build are refused."""
  if d.get("dropout", 0.0):
    raise NotImplementedError(f"SanaTransformer2DModel: dropout {d['dropout']} is not supported (inference only)")
  skip = {"dtype", "param_dtype", "scan_layers", "remat", "attention_impl"}
  fields = {f.name for f in dataclasses.fields(SanaConfig)} - skip
  unknown = sorted(k for k in d if not k.startswith("_") and k not in fields | {"dropout"})
  if unknown:   # an option of a newer release this module does not build: refuse rather than ignore it
    raise NotImplementedError(f"SanaTransformer2DModel: config fields {unknown} are not supported")
  kw = {k: d[k] for k in fields if k in d}
  kw["out_channels"] = kw.get("out_channels") or kw.get("in_channels", 32)
  return SanaConfig.from_dict(kw)


def diffusers_config(cfg: SanaConfig) -> dict[str, Any]:
  """SanaConfig -> diffusers config.json."""
  skip = ("dtype", "param_dtype", "scan_layers", "remat", "attention_impl")
  return {"_class_name": "SanaTransformer2DModel", **{k: v for k, v in cfg.to_dict().items() if k not in skip},
          "dropout": 0.0}


def sincos_pos_embed(h: int, w: int, dim: int, base_size: int, interpolation_scale: float) -> np.ndarray:
  """diffusers get_2d_sincos_pos_embed over an h x w grid -> [h*w dim] float32: per token
  [sin, cos](x omega), [sin, cos](y omega) with x, y = index / (size / base_size) / interpolation_scale."""
  ys = np.arange(h, dtype=np.float32) / np.float32(h / base_size) / np.float32(interpolation_scale)
  xs = np.arange(w, dtype=np.float32) / np.float32(w / base_size) / np.float32(interpolation_scale)
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

  def one_d(pos: np.ndarray) -> np.ndarray:
    out = np.outer(pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  gx, gy = np.meshgrid(xs, ys, indexing="xy")          # [h w] each, row-major tokens
  return np.concatenate([one_d(gx), one_d(gy)], axis=1).astype(np.float32)


class TimeEmbedding(nn.Module):
  """AdaLN-single: timestep (and guidance) sinusoids -> MLP -> emb [b d]; SiLU -> Linear -> t6 [b 6d]."""

  features: int
  guidance: bool
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, timestep: jax.Array, guidance: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    emb = TimestepEmbedder(self.features, name="timestep_embedder", **kw)(timestep)
    if self.guidance:
      emb = emb + TimestepEmbedder(self.features, name="guidance_embedder", **kw)(guidance)
    return jnp.concatenate(AdaLNModulation(self.features, 6, name="modulation", **kw)(emb), axis=-1), emb


class SanaBlock(nn.Module):
  """[b h w d] -> [b h w d]: modulated linear self-attention, cross-attention to the caption, modulated Mix-FFN."""

  cfg: SanaConfig

  @nn.compact
  def __call__(self, x: jax.Array, own: Any, t6: jax.Array, caption: jax.Array,
               caption_mask: jax.Array | None) -> tuple[jax.Array, Any]:
    cfg = self.cfg
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    b, h, w, d = x.shape
    table = self.param("scale_shift_table", nn.with_logical_partitioning(
        nn.initializers.normal(d ** -0.5), (None, "embed")), (6, d), jnp.dtype(cfg.param_dtype))
    mod = table.astype(t6.dtype)[None] + t6.reshape(b, 6, d)
    shift1, scale1, gate1, shift2, scale2, gate2 = (mod[:, i, None] for i in range(6))     # [b 1 d]
    tokens = rearrange(x, "b h w d -> b (h w) d")
    qk_norm = cfg.qk_norm is not None

    y = modulate(LayerNorm(d, cfg.norm_eps, use_bias=False, use_scale=False, name="norm1", **kw)(tokens),
                 shift1, scale1)
    y = LinearAttention(d, cfg.num_attention_heads, cfg.attention_head_dim, qkv_bias=cfg.attention_bias,
                        qk_norm=qk_norm, name="attn1", **kw)(y)
    tokens = tokens + (gate1 * y).astype(tokens.dtype)

    heads = cfg.num_cross_attention_heads
    y, _ = Attention(d, heads, heads, cfg.cross_attention_head_dim, qkv_bias=True, o_bias=True, qk_norm=qk_norm,
                     qk_norm_across_heads=True, norm_eps=1e-5, kv_features=cfg.cross_attention_dim,
                     impl=cfg.attention_impl, name="attn2", **kw)(tokens, kv=caption, kv_segment_ids=caption_mask)
    tokens = tokens + y

    affine = cfg.norm_elementwise_affine
    y = modulate(LayerNorm(d, cfg.norm_eps, use_bias=affine, use_scale=affine, name="norm2", **kw)(tokens),
                 shift2, scale2)
    y = GLUMBConv(d, cfg.mlp_hidden, name="ff", **kw)(rearrange(y, "b (h w) d -> b h w d", h=h))
    tokens = tokens + (gate2 * rearrange(y, "b h w d -> b (h w) d")).astype(tokens.dtype)
    return nn.with_logical_constraint(rearrange(tokens, "b (h w) d -> b h w d", h=h), ACT), own


class SanaTransformer(nn.Module):
  """Noisy latents [b H W c], caption embeddings [b l k] (+ mask [b l], 1 = token), timestep [b] -> [b H W o]."""

  cfg: SanaConfig

  def setup(self):
    cfg = self.cfg
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    d, p = cfg.inner_dim, cfg.patch_size
    self.patch_embed = Conv(d, (p, p), (p, p), ((0, 0), (0, 0)), **kw)
    self.time_embed = TimeEmbedding(d, cfg.guidance_embeds, **kw)
    self.caption_projection_1 = DenseGeneral((cfg.caption_channels,), (d,), (None, "embed"), True, **kw)
    self.caption_projection_2 = DenseGeneral((d,), (d,), ("mlp", "embed"), True, **kw)
    self.caption_norm = RMSNorm(d, 1e-5, **kw)
    self.layers = build_layers(SanaBlock, cfg.num_layers, cfg, scan=cfg.scan_layers, remat=cfg.remat, shared=3)
    self.scale_shift_table = self.param("scale_shift_table", nn.with_logical_partitioning(
        nn.initializers.normal(d ** -0.5), (None, "embed")), (2, d), jnp.dtype(cfg.param_dtype))
    self.norm_out = LayerNorm(d, 1e-6, use_bias=False, use_scale=False, **kw)
    self.proj_out = DenseGeneral((d,), (p * p * cfg.out_channels,), ("embed", None), True, **kw)

  def check_inputs(self, x: jax.Array, caption: jax.Array, caption_mask: jax.Array | None) -> None:
    cfg, p = self.cfg, self.cfg.patch_size
    if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
      raise ValueError(f"SanaTransformer: latents {x.shape} must be [b H W {cfg.in_channels}] (config in_channels)")
    if x.shape[1] % p or x.shape[2] % p:
      raise ValueError(f"SanaTransformer: latent size {x.shape[1:3]} is not a multiple of the patch size {p}")
    if caption.ndim != 3 or caption.shape[0] != x.shape[0] or caption.shape[-1] != cfg.caption_channels:
      raise ValueError(f"SanaTransformer: caption {caption.shape} must be [{x.shape[0]} l {cfg.caption_channels}]")
    if caption_mask is not None and caption_mask.shape != caption.shape[:2]:
      raise ValueError(f"SanaTransformer: caption_mask {caption_mask.shape} must be {caption.shape[:2]}")

  def __call__(self, x: jax.Array, caption: jax.Array, timestep: jax.Array, caption_mask: jax.Array | None = None,
               guidance: jax.Array | None = None) -> jax.Array:
    """As diffusers' forward (NHWC): `timestep` is what the pipeline passes (the scheduler's timestep times
    cfg.timestep_scale); `guidance` [b] only for guidance_embeds models. A caption with no valid token gets
    no cross-attention output (diffusers' -10000 bias would average every padded token instead)."""
    cfg = self.cfg
    self.check_inputs(x, caption, caption_mask)
    if cfg.guidance_embeds != (guidance is not None):
      raise ValueError(f"SanaTransformer: guidance is {'required' if cfg.guidance_embeds else 'not taken'} "
                       f"(config guidance_embeds={cfg.guidance_embeds})")
    dtype, p, b = jnp.dtype(cfg.dtype), cfg.patch_size, x.shape[0]
    h = self.patch_embed(nn.with_logical_constraint(x.astype(dtype), ACT[:3] + ("act_channels",)))
    if cfg.interpolation_scale is not None:
      pos = sincos_pos_embed(h.shape[1], h.shape[2], cfg.inner_dim, cfg.sample_size // p, cfg.interpolation_scale)
      h = h + jnp.asarray(pos, dtype).reshape(h.shape[1:])
    t6, emb = self.time_embed(jnp.broadcast_to(timestep, (b,)),
                              None if guidance is None else jnp.broadcast_to(guidance, (b,)))
    c = self.caption_projection_2(jax.nn.gelu(self.caption_projection_1(caption.astype(dtype)), approximate=True))
    c = nn.with_logical_constraint(self.caption_norm(c), ("act_batch", "act_length", "act_embed"))
    mask = None if caption_mask is None else caption_mask.astype(jnp.int32)
    h, _, _ = run_layers(self.layers, nn.with_logical_constraint(h, ACT), None, t6, c, mask)
    mod = self.scale_shift_table.astype(emb.dtype)[None] + emb[:, None]      # [b 2 d]: shift, scale
    out = self.proj_out(modulate(self.norm_out(h), mod[:, 0, None, None], mod[:, 1, None, None]))
    return rearrange(out, "b h w (p q c) -> b (h p) (w q) c", p=p, q=p).astype(jnp.float32)
