"""AIMv2 vision encoder, at fixed resolution (Aimv2VisionModel) and as Ovis-U1's NaViT variant (configuration).

Paper: Multimodal Autoregressive Pre-training of Large Vision Encoders (arXiv 2411.14402). Reference:
transformers models/aimv2/modeling_aimv2.py (Aimv2VisionModel); the NaViT options follow Ovis-U1's remote
modeling_aimv2.py as summarised in shared/reference/ovis_u1.md (no pip reference exists for them).
Shapes: b batch, r packed rows, t tokens, d embed, g position-table side, p patch, c channels.

Patch embedding (a stride-p conv with bias = a dense layer over (py, px, c) patches) -> RMSNorm -> + positions
-> pre-RMSNorm SwiGLU blocks (models/qwen_vit.VisionBlock) -> RMSNorm, and optionally the attention-pooling head
(a learned query, no query projection, over all tokens). Positions (`posemb`): "learned" table of
(image_size / p)^2 entries, "sincos" (is_native checkpoints: 2D sin-cos of the patch grid).

Ovis-U1 (packed rows, as Qwen2.5-VL's tower; data/qwen_vl.pack_vision with temporal patch 1):
  rope        2D RoPE over (row, column), as Qwen2.5-VL (qwen_vit.vision_rope_angles);
  window_size windows of that many pixels (window_size / patch / merge merge groups a side) in every block but
              fullatt_blocks, which attend over whole frames;
  posemb_resize  the learned table resized per image to its grid: "two_dim" bicubic over the table's grid,
              "one_dim" linear over the flattened table (both align_corners=False, as torch's F.interpolate);
              "none": the table must fit the grid.
Which values Ovis-U1's config.json holds is UNVERIFIED (ovis_u1.md); their math is tested against torch's
F.interpolate and against this model's own fixed-resolution path, not against Ovis-U1's code.
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
import numpy as np
from einops import rearrange

from unimm_jax import kernels
from unimm_jax.layers import DenseGeneral, RMSNorm
from unimm_jax.layers.stack import build_layers, check_remat
from unimm_jax.models.config import DictConfig
from unimm_jax.models.qwen_vit import VisionBlock, VisionBlockConfig, check_windows, run_blocks, vision_rope_angles
from unimm_jax.models.siglip import interpolation_weights

MODEL_TYPES = ("aimv2_vision_model", "aimv2")
POSEMBS = ("learned", "sincos")
POSEMB_RESIZES = ("none", "one_dim", "two_dim")


@dataclasses.dataclass(frozen=True)
class Aimv2VisionConfig(DictConfig):
  embed: int = 1024
  depth: int = 24
  heads: int = 8
  mlp: int = 2816
  patch: int = 14
  channels: int = 3
  image_size: int = 224               # the learned table covers (image_size / patch)^2 positions
  norm_eps: float = 1e-5
  qkv_bias: bool = False              # q/k/v and out projections
  mlp_bias: bool = False
  act: str = "silu"
  use_head: bool = True               # attention-pooling head -> pooler_output
  posemb: str = "learned"             # learned | sincos (is_native)
  # NaViT (Ovis-U1) options, for packed rows
  posemb_resize: str = "none"         # none | one_dim | two_dim
  rope: bool = False                  # 2D RoPE over (row, column)
  rope_theta: float = 10000.0
  window_size: int = 0                # pixels a window side; 0 = every block attends over whole frames
  merge: int = 2                      # merge group side: the window unit (and pack_vision's merge)
  fullatt_blocks: tuple[int, ...] = ()
  # Runtime choices: they change speed and memory, never the numbers.
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = False
  remat: str = "none"
  attention_impl: str = "auto"

  def __post_init__(self):
    if self.embed % self.heads:
      raise ValueError(f"Aimv2VisionConfig: embed {self.embed} is not a multiple of heads {self.heads}")
    if self.posemb not in POSEMBS:
      raise ValueError(f"Aimv2VisionConfig.posemb {self.posemb!r} is not one of {POSEMBS}")
    if self.posemb_resize not in POSEMB_RESIZES:
      raise ValueError(f"Aimv2VisionConfig.posemb_resize {self.posemb_resize!r} is not one of {POSEMB_RESIZES}")
    if self.posemb == "sincos" and (self.embed % 4 or self.posemb_resize != "none"):
      raise ValueError("Aimv2VisionConfig: sincos positions need embed % 4 == 0 and posemb_resize 'none'")
    if self.rope and self.head_dim % 4:
      raise ValueError(f"Aimv2VisionConfig: 2D RoPE needs head_dim % 4 == 0, got {self.head_dim}")
    check_windows(self.window_size, self.patch, self.merge, self.fullatt_blocks, self.depth, "Aimv2VisionConfig")
    check_remat(self.remat, "Aimv2VisionConfig")

  @property
  def head_dim(self) -> int:
    return self.embed // self.heads

  @property
  def grid(self) -> int:
    return self.image_size // self.patch

  @property
  def window(self) -> int:
    """Merge groups a window side (pack_vision's `window`; 0 = none)."""
    return self.window_size // self.patch // self.merge

  def block(self) -> VisionBlockConfig:
    return VisionBlockConfig(self.embed, self.heads, self.mlp, self.norm_eps, self.qkv_bias, self.qkv_bias,
                             self.mlp_bias, self.act, self.dtype, self.param_dtype, self.attention_impl)

  @classmethod
  def large_patch14(cls, image_size: int = 224, **kw) -> "Aimv2VisionConfig":
    """apple/aimv2-large-patch14-{224,336,448}: width 1024, depth 24, 8 heads, MLP 2816 (HF config.json)."""
    return cls(image_size=image_size, **kw)

  @classmethod
  def tiny(cls, **kw) -> "Aimv2VisionConfig":
    return cls(**{**dict(embed=32, depth=2, heads=4, mlp=48, patch=4, image_size=16), **kw})


def config_from_hf(hf: Mapping[str, Any] | Any) -> Aimv2VisionConfig:
  """HF AIMv2 vision config (or a full Aimv2Config) -> Aimv2VisionConfig."""
  d = hf if isinstance(hf, Mapping) else hf.to_dict()
  if d.get("model_type") not in MODEL_TYPES:
    raise ValueError(f"unsupported model_type {d.get('model_type')!r}; supported: {MODEL_TYPES}")
  if d["model_type"] == "aimv2":
    d = d.get("vision_config") or {}
  for name in ("patch_size", "image_size"):
    if not isinstance(d.get(name, 14), int):
      raise NotImplementedError(f"aimv2: non-square {name} {d[name]} is not supported")
  return Aimv2VisionConfig(
      embed=d.get("hidden_size", 1024), depth=d.get("num_hidden_layers", 24), heads=d.get("num_attention_heads", 8),
      mlp=d.get("intermediate_size", 2816), patch=d.get("patch_size", 14), channels=d.get("num_channels", 3),
      image_size=d.get("image_size", 224), norm_eps=float(d.get("rms_norm_eps", 1e-5)),
      qkv_bias=bool(d.get("qkv_bias", False)), mlp_bias=bool(d.get("mlp_bias", False)),
      act=d.get("hidden_act", "silu"), use_head=bool(d.get("use_head", True)),
      posemb="sincos" if d.get("is_native") else "learned")


def sincos_2d(rows: jax.Array, cols: jax.Array, embed: int, temperature: float = 10000.0) -> jax.Array:
  """AIMv2's native 2D sin-cos positions: [...] rows, cols -> [... d] laid out (sin_w, cos_w, sin_h, cos_h) (the
  layout it was trained with; transformers' build_2d_sinusoidal_position_embedding then its halves swapped).
  NumPy inputs are computed in float64 as transformers does; traced ones in float32."""
  xp = np if isinstance(rows, np.ndarray) else jnp
  dt = np.float64 if xp is np else jnp.float32
  omega = 1.0 / temperature ** (xp.arange(embed // 4, dtype=dt) / (embed // 4))
  h, w = rows.astype(dt)[..., None] * omega, cols.astype(dt)[..., None] * omega
  return xp.concatenate([xp.sin(w), xp.cos(w), xp.sin(h), xp.cos(h)], axis=-1).astype(np.float32)


class AttentionPoolingHead(nn.Module):
  """A learned query (no projection) attends over projected keys/values of every token: [b t d] -> [b d]."""

  cfg: Aimv2VisionConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.cfg
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    h, e = cfg.heads, cfg.head_dim
    cls_token = self.param("cls_token", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                     (None, None, "embed")),
                           (1, 1, cfg.embed), jnp.dtype(cfg.param_dtype))
    proj = functools.partial(DenseGeneral, (cfg.embed,), (h, e), ("embed", "heads", "head_dim"), cfg.qkv_bias, **kw)
    k, v = proj(name="k_proj")(x), proj(name="v_proj")(x)
    q = jnp.broadcast_to(cls_token.astype(kw["dtype"]).reshape(1, 1, h, e), (x.shape[0], 1, h, e))
    out = kernels.attention(q, k, v, impl=cfg.attention_impl)[:, 0]
    return DenseGeneral((h, e), (cfg.embed,), ("heads", "head_dim", "embed"), True, name="output_proj", **kw)(out)


@flax.struct.dataclass
class Aimv2Output:
  last_hidden_state: jax.Array        # [b t d] / [r t d] after the final RMSNorm
  pooler_output: jax.Array | None     # [b d] from the head (fixed resolution only)
  hidden_states: tuple | None         # depth + 1 entries: the embeddings, then each block (before the final norm)


class Aimv2VisionModel(nn.Module):
  """Pixels [b H W c] (fixed resolution) or packed patch rows (NaViT) -> tokens (module docstring)."""

  cfg: Aimv2VisionConfig

  def setup(self):
    cfg = self.cfg
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    self.patch_embed = DenseGeneral((cfg.patch, cfg.patch, cfg.channels), (cfg.embed,),
                                    (None, None, None, "embed"), True, **kw)
    self.patch_norm = RMSNorm(cfg.embed, cfg.norm_eps, **kw)
    if cfg.posemb == "learned":
      self.position_embedding = self.param(
          "position_embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
          (cfg.grid ** 2, cfg.embed), jnp.dtype(cfg.param_dtype))
    self.layers = build_layers(VisionBlock, cfg.depth, cfg.block(), scan=cfg.scan_layers, remat=cfg.remat, shared=3)
    self.norm = RMSNorm(cfg.embed, cfg.norm_eps, **kw)
    if cfg.use_head:
      self.head = AttentionPoolingHead(cfg)

  def _positions(self, rows: jax.Array, cols: jax.Array, sizes: jax.Array) -> jax.Array:
    """Position embeddings of patches at (rows, cols) of frames of sizes [... 2] -> [... d] (fp32)."""
    cfg = self.cfg
    if cfg.posemb == "sincos":
      return sincos_2d(rows, cols, cfg.embed)
    table = self.position_embedding.astype(jnp.float32)
    if cfg.posemb_resize == "none":   # the flat index, as transformers' position_ids
      return jnp.take(table, rows * sizes[..., 1] + cols, axis=0)
    if cfg.posemb_resize == "one_dim":   # F.interpolate(linear) of the flattened table to h*w entries
      n = sizes[..., 0] * sizes[..., 1]
      w = interpolation_weights(rows * sizes[..., 1] + cols, n, cfg.grid ** 2, "linear")
    else:                                # two_dim: bicubic over the (g, g) table to (h, w)
      wy = interpolation_weights(rows, sizes[..., 0], cfg.grid, "bicubic")
      wx = interpolation_weights(cols, sizes[..., 1], cfg.grid, "bicubic")
      w = (wy[..., :, None] * wx[..., None, :]).reshape(*wy.shape[:-1], -1)
    return jnp.einsum("...k,kd->...d", w, table, precision=jax.lax.Precision.HIGHEST)

  def __call__(self, pixels: jax.Array | None = None, *, patches: jax.Array | None = None,
               positions: jax.Array | None = None, frame_sizes: jax.Array | None = None,
               frame_ids: jax.Array | None = None, window_ids: jax.Array | None = None,
               return_hidden_states: bool = False) -> Aimv2Output:
    """pixels [b H W c] (H, W multiples of the patch; a learned table must cover the grid), or packed rows:
    patches [r t (c p p)] (each flattened (c, py, px), Qwen2-VL order), positions / frame_sizes [r t 2],
    frame_ids / window_ids [r t] (data/qwen_vl.pack_vision; window_ids may be None without windows)."""
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    if (pixels is None) == (patches is None):
      raise ValueError("Aimv2VisionModel: pass exactly one of pixels and patches")
    if pixels is not None:
      b, height, width, _ = pixels.shape
      gh, gw = height // cfg.patch, width // cfg.patch
      if not gh or not gw or height % cfg.patch or width % cfg.patch:
        raise ValueError(f"Aimv2VisionModel: pixels {pixels.shape} are not a positive multiple of the patch "
                         f"({cfg.patch}) on each side")
      if cfg.posemb == "learned" and cfg.posemb_resize == "none" and gh * gw != cfg.grid ** 2:
        raise ValueError(f"Aimv2VisionModel: a {gh}x{gw} patch grid for a position table of {cfg.grid}x{cfg.grid} "
                         f"(image_size {cfg.image_size}); set posemb_resize to resize it")
      cubes = rearrange(pixels.astype(dtype), "b (h p) (w q) c -> b (h w) p q c", p=cfg.patch, q=cfg.patch)
      rows, cols = np.divmod(np.arange(gh * gw), gw)
      pos = self._positions(rows, cols, np.broadcast_to(np.array([gh, gw]), (gh * gw, 2)))[None]
      frame_ids = window_ids = None   # one image per row: no segments
      angles = (vision_rope_angles(jnp.asarray(np.stack([rows, cols], -1))[None], cfg.head_dim, cfg.rope_theta)
                if cfg.rope else None)
    else:
      if cfg.use_head:
        raise ValueError("Aimv2VisionModel: the attention-pooling head pools fixed-resolution pixels; packed rows "
                         "need use_head=False")
      if positions is None or frame_ids is None or (cfg.posemb == "learned" and frame_sizes is None):
        raise ValueError("Aimv2VisionModel: packed patches need positions, frame_ids (and frame_sizes for a "
                         "learned position table) from data/qwen_vl.pack_vision")
      cubes = rearrange(patches.astype(dtype), "r t (c p q) -> r t p q c", c=cfg.channels, p=cfg.patch)
      pos = self._positions(positions[..., 0], positions[..., 1], frame_sizes)
      pos = jnp.where(frame_ids[..., None] > 0, pos, 0)
      angles = vision_rope_angles(positions, cfg.head_dim, cfg.rope_theta) if cfg.rope else None
    x = (self.patch_norm(self.patch_embed(cubes)) + pos).astype(dtype)
    x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
    full = tuple(not cfg.window or i in cfg.fullatt_blocks for i in range(cfg.depth))
    x_in = x
    x, hidden = run_blocks(self.layers, x, full, cfg.scan_layers, angles, frame_ids, window_ids,
                           hidden_states=return_hidden_states)
    x = self.norm(x)
    return Aimv2Output(last_hidden_state=x, pooler_output=self.head(x) if cfg.use_head and pixels is not None
                       else None, hidden_states=(x_in, *hidden) if return_hidden_states else None)
