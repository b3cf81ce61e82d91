"""SigLIP / SigLIP2 vision transformer, fixed resolution and NaFlex, with packed (NaViT) batches.

Papers: SigLIP (arXiv 2303.15343), SigLIP 2 (arXiv 2502.14786), NaViT (arXiv 2307.06304).
Reference: transformers models/siglip/modeling_siglip.py (SiglipVisionModel) and
models/siglip2/modeling_siglip2.py (Siglip2VisionModel); big_vision models/vit.py (MAP head).
Shapes: b batch, t tokens, n images per row, d embed, h heads, e head_dim, f mlp, p patch,
c channels, g|G position-table side (rows, columns).

A stride-p patch conv equals a dense layer over flattened (py, px, c) patches, so both SigLIP's
conv stem and SigLIP2's linear stem are one kernel [p p c d] (conv HWIO layout); TUNA's 1x1 conv
over 48-channel VAE latents is the same stem with p=1, c=48. Two input forms:
  pixels [b H W c]                           fixed resolution, one image per row;
  patches [b t (p p c)] + spatial_shapes     NaFlex / packed rows: `segment_ids` [b t] (1..n, 0 =
                                             padding) and `positions` [b t] (row-major patch index
                                             within its image) place each token in its image.
The learned position table is resized per image (SigLIP: bicubic, SigLIP2: antialiased bilinear,
both align_corners=False, as transformers does).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from einops import rearrange

from unimm_jax.layers import MLP, Attention, DenseGeneral, LayerNorm
from unimm_jax.layers.block import PreLNBlock
from unimm_jax.layers.stack import build_layers, run_layers
from unimm_jax.models.config import EncoderConfig

MODEL_TYPES = ("siglip_vision_model", "siglip", "siglip2_vision_model", "siglip2")
POSEMB_RESIZE = ("bicubic", "bilinear_antialias")


@dataclasses.dataclass(frozen=True)
class SiglipVisionConfig(EncoderConfig):
  embed: int = 768
  mlp: int = 3072
  depth: int = 12
  heads: int = 12
  patch: int = 16
  channels: int = 3
  posemb_grid: int = 14               # side of the learned position table: image_size // patch (SigLIP),
                                      # sqrt(num_patches) (SigLIP2)
  posemb_resize: str = "bicubic"      # SigLIP interpolate_pos_encoding; SigLIP2: "bilinear_antialias"
  norm_eps: float = 1e-6
  act: str = "gelu_pytorch_tanh"
  post_layernorm: bool = True
  use_head: bool = True               # MAP (multihead attention pooling) head -> pooler_output
  feature_layer: int | None = None    # stop after hidden_states[feature_layer] (HF indexing, -2 = output of
                                      # the second-to-last layer); later layers are not built. None: all.
  # Runtime choices: they change speed and memory, never the numbers.
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = False
  remat: str = "none"                 # none | full | dots
  attention_impl: str = "auto"

  def __post_init__(self):
    if self.posemb_resize not in POSEMB_RESIZE:
      raise ValueError(f"SiglipVisionConfig.posemb_resize {self.posemb_resize!r} is not one of {POSEMB_RESIZE}")
    self.check_encoder()

  @classmethod
  def so400m(cls, patch: int = 14, image_size: int = 384, **kw) -> "SiglipVisionConfig":
    """SoViT-400m (arXiv 2305.13035, table 1): width 1152, depth 27, MLP 4304, 16 heads."""
    return cls(embed=1152, mlp=4304, depth=27, heads=16, patch=patch, posemb_grid=image_size // patch, **kw)

  @classmethod
  def tiny(cls, **kw) -> "SiglipVisionConfig":
    return cls(**{**dict(embed=64, mlp=96, depth=2, heads=4, patch=4, posemb_grid=4), **kw})


def config_from_hf(hf: Mapping[str, Any] | Any) -> SiglipVisionConfig:
  """HF SigLIP / SigLIP2 config (vision or full model; dict or PretrainedConfig) -> SiglipVisionConfig."""
  d = hf if isinstance(hf, Mapping) else hf.to_dict()
  model_type = d.get("model_type")
  if model_type not in MODEL_TYPES:
    raise ValueError(f"unsupported model_type {model_type!r}; supported: {MODEL_TYPES}")
  if model_type in ("siglip", "siglip2"):  # full image-text model: the vision tower's config
    d = d.get("vision_config") or {}
  patch = d.get("patch_size", 16)
  if not isinstance(patch, int):
    raise NotImplementedError(f"{model_type}: non-square patch_size {patch} is not supported")
  if model_type.startswith("siglip2"):
    num_patches = d.get("num_patches", 256)
    grid, resize = math.isqrt(num_patches), "bilinear_antialias"
    if grid * grid != num_patches:
      raise ValueError(f"{model_type}: num_patches {num_patches} is not a square number")
  else:
    image_size = d.get("image_size", 224)
    if not isinstance(image_size, int):
      raise NotImplementedError(f"{model_type}: non-square image_size {image_size} is not supported")
    grid, resize = image_size // patch, "bicubic"
  return SiglipVisionConfig(
      embed=d.get("hidden_size", 768), mlp=d.get("intermediate_size", 3072), depth=d.get("num_hidden_layers", 12),
      heads=d.get("num_attention_heads", 12), patch=patch, channels=d.get("num_channels", 3), posemb_grid=grid,
      posemb_resize=resize, norm_eps=float(d.get("layer_norm_eps", 1e-6)), act=d.get("hidden_act", "gelu_pytorch_tanh"),
      use_head=bool(d.get("vision_use_head", True)))


# ----------------------------------------------------------------------------------------------
# Position-table resizing, exactly as torch's F.interpolate(align_corners=False).
# ----------------------------------------------------------------------------------------------

def _cubic_near(x: jax.Array, a: float) -> jax.Array:  # |x| <= 1
  return ((a + 2) * x - (a + 3)) * x * x + 1


def _cubic_far(x: jax.Array, a: float) -> jax.Array:   # 1 < |x| < 2
  return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a


def interpolation_weights(index: jax.Array, out_size: jax.Array, in_size: int, method: str) -> jax.Array:
  """Weights [..., in_size] that make output sample `index` of `out_size` from `in_size` input samples.

  index and out_size are integer arrays of one shape (they may be traced: NaFlex sizes are data).
  "bicubic": torch upsample_bicubic2d (Keys a = -0.75, border samples repeated, no antialias).
  "bilinear_antialias": torch's antialiased bilinear (triangle filter widened by the downscale
  factor, weights renormalised over the input), which is plain bilinear when upsampling.
  "linear": torch's plain (bi)linear, no antialias (sample positions below 0 clamp to 0).
  """
  i = jnp.asarray(index, jnp.float32)[..., None]
  scale = in_size / jnp.asarray(out_size, jnp.float32)[..., None]
  j = jnp.arange(in_size, dtype=jnp.float32)
  if method == "bilinear_antialias":
    center = scale * (i + 0.5)
    stretch = jnp.maximum(scale, 1.0)
    w = jnp.maximum(0.0, 1.0 - jnp.abs(j + 0.5 - center) / stretch)
    return w / jnp.sum(w, axis=-1, keepdims=True)
  if method == "linear":
    src = jnp.maximum(scale * (i + 0.5) - 0.5, 0.0)
    base = jnp.floor(src)
    t = src - base
    return (1 - t) * (base == j) + t * (jnp.minimum(base + 1, in_size - 1) == j)
  if method == "bicubic":
    src = scale * (i + 0.5) - 0.5
    base = jnp.floor(src)
    t = src - base
    a = -0.75
    taps = (_cubic_far(t + 1, a), _cubic_near(t, a), _cubic_near(1 - t, a), _cubic_far(2 - t, a))
    return sum(c * (jnp.clip(base - 1 + m, 0, in_size - 1) == j) for m, c in enumerate(taps))
  raise ValueError(f"interpolation_weights: unknown method {method!r}; choose from {(*POSEMB_RESIZE, 'linear')}")


def resize_position_embeddings(table: jax.Array, size: tuple[int, int], method: str) -> jax.Array:
  """[g G d] learned position table -> [h w d] for an h x w patch grid (fp32).

  The same grid is returned unchanged. SigLIP and TUNA use "bicubic"; SigLIP2 NaFlex
  "bilinear_antialias" (transformers' Siglip2VisionEmbeddings.resize_positional_embeddings).
  """
  h, w = size
  table = table.astype(jnp.float32)
  if (h, w) == table.shape[:2]:
    return table
  wy = interpolation_weights(jnp.arange(h), jnp.full((h,), h), table.shape[0], method)
  wx = interpolation_weights(jnp.arange(w), jnp.full((w,), w), table.shape[1], method)
  return jnp.einsum("yi,xj,ijd->yxd", wy, wx, table, precision=jax.lax.Precision.HIGHEST)


def position_embeddings_at(table: jax.Array, yx: jax.Array, hw: jax.Array, method: str) -> jax.Array:
  """Per-token resized positions: table [g G d], yx / hw [... 2] (row, col) and its image's grid -> [... d].

  Equals resize_position_embeddings(table, hw, method)[y, x] for every token, with hw varying per
  token, so images of different sizes share one jitted call.
  """
  wy = interpolation_weights(yx[..., 0], hw[..., 0], table.shape[0], method)
  wx = interpolation_weights(yx[..., 1], hw[..., 1], table.shape[1], method)
  # Outer product first ([... g*G], small), then one matmul: never a [... g G d] intermediate.
  w = (wy[..., :, None] * wx[..., None, :]).reshape(*wy.shape[:-1], -1)
  flat = table.astype(jnp.float32).reshape(-1, table.shape[-1])
  return jnp.einsum("...k,kd->...d", w, flat, precision=jax.lax.Precision.HIGHEST)


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------

@flax.struct.dataclass
class VisionOutput:
  last_hidden_state: jax.Array        # [b t d], after post_layernorm when built; padding tokens are 0
  pooler_output: jax.Array | None     # MAP head: [b d] for pixels, [b n d] (one per image) for patches
  hidden_states: tuple | None         # num_layers + 1 entries [b t d] (embeddings, then each layer), as HF


class MAPHead(nn.Module):
  """Multihead attention pooling: a learned probe per image attends over that image's tokens.

  x [b t d], q_segment_ids [b n] (image id of each probe), kv_segment_ids [b t] -> [b n d].
  """

  cfg: SiglipVisionConfig

  @nn.compact
  def __call__(self, x: jax.Array, q_segment_ids: jax.Array, kv_segment_ids: jax.Array | None) -> jax.Array:
    cfg = self.cfg
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    probe = self.param("probe", nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, "embed")),
                       (1, 1, cfg.embed), jnp.dtype(cfg.param_dtype))
    q_in = jnp.broadcast_to(probe.astype(kw["dtype"]), (x.shape[0], q_segment_ids.shape[1], cfg.embed))
    # torch nn.MultiheadAttention: q/k/v/out projections with biases, probes attending over the tokens
    h, _ = Attention(cfg.embed, cfg.heads, cfg.heads, cfg.head_dim, qkv_bias=True, o_bias=True,
                     impl=cfg.attention_impl, name="attention", **kw)(
                         q_in, kv=x, segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
    return h + MLP(cfg.embed, cfg.mlp, cfg.act, name="mlp", **kw)(
        LayerNorm(cfg.embed, cfg.norm_eps, name="layernorm", **kw)(h))


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------

class VisionTransformer(nn.Module):
  """SigLIP / SigLIP2 vision tower. `stem` (optional) builds the patch embedding: called with
  name="patch_embedding", it maps patches [b t p p c] to [b t d]; the default is the dense
  [p p c d] kernel with bias."""

  cfg: SiglipVisionConfig
  stem: Callable[..., nn.Module] | None = None

  def setup(self):
    cfg = self.cfg
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    stem = self.stem or functools.partial(
        DenseGeneral, (cfg.patch, cfg.patch, cfg.channels), (cfg.embed,), (None, None, None, "embed"), True, **kw)
    self.patch_embedding = stem(name="patch_embedding")
    self.position_embedding = self.param(
        "position_embedding",
        nn.with_logical_partitioning(nn.initializers.normal(cfg.embed ** -0.5), (None, "embed")),
        (cfg.posemb_grid ** 2, cfg.embed), jnp.dtype(cfg.param_dtype))
    self.layers = build_layers(
        PreLNBlock, cfg.num_layers, cfg.embed, cfg.heads, cfg.mlp, cfg.act, cfg.norm_eps, impl=cfg.attention_impl,
        scan=cfg.scan_layers, remat=cfg.remat, shared=1, **kw)
    if cfg.post_layernorm:
      self.post_layernorm = LayerNorm(cfg.embed, cfg.norm_eps, **kw)
    if cfg.use_head:
      self.head = MAPHead(cfg)

  def __call__(
      self,
      pixels: jax.Array | None = None,
      *,
      patches: jax.Array | None = None,
      spatial_shapes: jax.Array | None = None,
      segment_ids: jax.Array | None = None,
      positions: jax.Array | None = None,
      return_hidden_states: bool = False,
  ) -> VisionOutput:
    """Encodes pixels [b H W c] (a trailing part smaller than a patch is dropped), or patches [b t (p p c)] with
    spatial_shapes [b n 2] (patch rows, cols of image i+1 of the row; (0, 0) = no image); segment_ids [b t]
    (default: every token belongs to image 1) and positions [b t] (default: arange(t)).
    """
    cfg = self.cfg
    table = self.position_embedding.reshape(cfg.posemb_grid, cfg.posemb_grid, cfg.embed)
    if (pixels is None) == (patches is None):
      raise ValueError("VisionTransformer: pass exactly one of pixels and patches")
    if pixels is not None:
      if any(a is not None for a in (spatial_shapes, segment_ids, positions)):
        raise ValueError("VisionTransformer: spatial_shapes / segment_ids / positions go with patches, not pixels")
      gh, gw = pixels.shape[1] // cfg.patch, pixels.shape[2] // cfg.patch
      if not gh or not gw:
        raise ValueError(f"VisionTransformer: pixels {pixels.shape} are smaller than one patch ({cfg.patch})")
      # As the stride-p "valid" conv: rows/cols that do not fill a patch are dropped (so400m/14 at 384px).
      pixels = pixels[:, : gh * cfg.patch, : gw * cfg.patch]
      patches = rearrange(pixels, "b (h p) (w q) c -> b (h w) (p q c)", p=cfg.patch, q=cfg.patch)
      pos = resize_position_embeddings(table, (gh, gw), cfg.posemb_resize).reshape(1, gh * gw, cfg.embed)
    else:
      if spatial_shapes is None or spatial_shapes.ndim != 3 or spatial_shapes.shape[-1] != 2:
        raise ValueError(f"VisionTransformer: patches need spatial_shapes [b n 2], got "
                         f"{None if spatial_shapes is None else spatial_shapes.shape}")
      b, t, _ = patches.shape
      if segment_ids is None:
        segment_ids = jnp.ones((b, t), jnp.int32)
      if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t), (b, t))
      valid = (segment_ids > 0)[..., None]
      image = jnp.clip(segment_ids - 1, 0, spatial_shapes.shape[1] - 1)
      hw = jnp.maximum(jnp.take_along_axis(spatial_shapes, image[..., None], axis=1), 1)  # [b t 2]
      yx = jnp.stack([positions // hw[..., 1], positions % hw[..., 1]], axis=-1)
      yx = jnp.where(valid, yx, 0)  # padding sits outside any grid: park it at (0, 0)
      pos = position_embeddings_at(table, yx, hw, cfg.posemb_resize)
    patches = patches.reshape(*patches.shape[:2], cfg.patch, cfg.patch, -1).astype(jnp.dtype(cfg.dtype))
    x = (self.patch_embedding(patches) + pos).astype(jnp.dtype(cfg.dtype))
    if segment_ids is not None:  # padding never enters attention, but 0 * inf would: keep it finite
      x = jnp.where(segment_ids[..., None] > 0, x, 0).astype(x.dtype)
    x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))

    x_in = x
    x, hidden, _ = run_layers(self.layers, x, None, segment_ids, hidden_states=return_hidden_states)
    if cfg.post_layernorm:
      x = self.post_layernorm(x)
    if segment_ids is not None:
      x = jnp.where(segment_ids[..., None] > 0, x, 0).astype(x.dtype)
    pooled = None
    if cfg.use_head:
      if segment_ids is None:  # fixed resolution: one probe over every token
        pooled = self.head(x, jnp.ones((x.shape[0], 1), jnp.int32), None)[:, 0]
      else:                    # one probe per image slot of the row; empty slots pool to 0
        n = spatial_shapes.shape[1]
        probes = jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.int32), (x.shape[0], n))
        present = jnp.prod(spatial_shapes, axis=-1)[..., None] > 0
        pooled = jnp.where(present, self.head(x, probes, segment_ids), 0)
    return VisionOutput(last_hidden_state=x, pooler_output=pooled,
                        hidden_states=(x_in, *hidden) if return_hidden_states else None)
