"""InternViT: the vision tower of InternVL (InternViT-300M-448px in InternVL3-1B / 2B / 8B).

Papers: InternVL (arXiv 2312.14238), InternVL 2.5 (arXiv 2412.05271), InternVL3 (arXiv 2504.10479).
Reference: transformers models/internvl/modeling_internvl.py (InternVLVisionModel); the original release's
remote code OpenGVLab/InternVL internvl_chat/internvl/model/internvl_chat/modeling_intern_vit.py
(InternVisionModel). Both compute the same function; only their parameter names differ (convert/maps/internvl.py).
Shapes: n tiles (images), H W pixels, c channels, p patch, t = 1 + (H/p)(W/p) tokens (class token first),
d embed, h heads, e head_dim, f mlp, g side of the learned position grid.

A ViT with a class token and a learned position table (bicubically resized to the tile's patch grid, as both
references do); pre-norm blocks whose two residual branches are scaled per channel by learned layer-scale
vectors (ls1 / ls2, transformers' lambda_1 / lambda_2): x + ls1 * attn(norm1(x)), x + ls2 * mlp(norm2(x)).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

from unimm_jax.layers import MLP, Attention, DenseGeneral, LayerNorm, RMSNorm
from unimm_jax.layers.stack import build_layers, run_layers
from unimm_jax.models.config import EncoderConfig
from unimm_jax.models.siglip import VisionOutput, resize_position_embeddings

NORMS = ("layer_norm", "rms_norm")


@dataclasses.dataclass(frozen=True)
class InternViTConfig(EncoderConfig):
  embed: int = 1024
  mlp: int = 4096
  depth: int = 24
  heads: int = 16
  patch: int = 14
  posemb_grid: int = 32               # side of the learned position table: image_size // patch (448 / 14)
  channels: int = 3
  qkv_bias: bool = True
  norm: str = "layer_norm"            # InternViT-300M: layer_norm; InternViT-6B: rms_norm
  norm_eps: float = 1e-6
  act: str = "gelu"
  feature_layer: int | None = None    # stop after hidden_states[feature_layer] (HF indexing; -1 = all layers);
                                      # later layers are not built. None: all.
  # Runtime choices: they change speed and memory, never the numbers.
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = False
  remat: str = "none"                 # none | full | dots
  attention_impl: str = "auto"

  def __post_init__(self):
    if self.norm not in NORMS:
      raise ValueError(f"InternViTConfig.norm {self.norm!r} is not one of {NORMS}")
    self.check_encoder()

  @classmethod
  def internvit_300m(cls, **kw) -> "InternViTConfig":
    """InternViT-300M-448px (the vision_config of OpenGVLab/InternVL3-1B and -2B: width 1024, 24 layers, 16 heads,
    MLP 4096, patch 14 at 448 px, LayerNorm eps 1e-6, biased qkv, GELU)."""
    return cls(**kw)

  @classmethod
  def tiny(cls, **kw) -> "InternViTConfig":
    return cls(**{**dict(embed=64, mlp=96, depth=2, heads=4, patch=7, posemb_grid=4), **kw})


def config_from_hf(hf: Mapping[str, Any] | Any) -> InternViTConfig:
  """The vision_config of a transformers `internvl` config (model_type internvl_vision) or of the original
  release's `internvl_chat` config (InternVisionConfig; dict or PretrainedConfig) -> InternViTConfig."""
  d = hf if isinstance(hf, Mapping) else hf.to_dict()
  original = "qkv_bias" in d or "qk_normalization" in d   # InternVisionConfig names
  where = f"vision_config ({'InternVisionConfig' if original else 'InternVLVisionConfig'})"
  if d.get("use_qk_norm") or d.get("qk_normalization"):
    raise NotImplementedError(f"{where}: q/k normalisation over the full width (InternViT-6B) is not supported")
  if not d.get("use_absolute_position_embeddings", True):
    raise NotImplementedError(f"{where}: use_absolute_position_embeddings=False is not supported")
  if not d.get("use_mean_pooling", True):
    raise NotImplementedError(f"{where}: use_mean_pooling=False (a final LayerNorm) is not supported")
  patch, image = d.get("patch_size", 14), d.get("image_size", 448)
  patch = patch if isinstance(patch, int) else tuple(patch)
  image = image if isinstance(image, int) else tuple(image)
  if not isinstance(patch, int):
    if patch[0] != patch[1]:
      raise NotImplementedError(f"{where}: non-square patch_size {patch} is not supported")
    patch = patch[0]
  if not isinstance(image, int):
    if image[0] != image[1]:
      raise NotImplementedError(f"{where}: non-square image_size {image} is not supported")
    image = image[0]
  return InternViTConfig(
      embed=d.get("hidden_size", 1024), mlp=d.get("intermediate_size", 4096), depth=d.get("num_hidden_layers", 24),
      heads=d.get("num_attention_heads", 16), patch=patch, posemb_grid=image // patch,
      channels=d.get("num_channels", 3), qkv_bias=bool(d.get("qkv_bias" if original else "attention_bias", True)),
      norm=d.get("norm_type", "layer_norm"), norm_eps=float(d.get("layer_norm_eps", 1e-6)),
      act=d.get("hidden_act", "gelu"))


class EncoderLayer(nn.Module):
  """x + ls1 * attn(norm1(x)); x + ls2 * mlp(norm2(x))."""

  cfg: InternViTConfig

  @nn.compact
  def __call__(self, x: jax.Array, own: None, segment_ids: jax.Array | None) -> tuple[jax.Array, None]:
    cfg = self.cfg
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    norm = functools.partial(LayerNorm if cfg.norm == "layer_norm" else RMSNorm, cfg.embed, cfg.norm_eps, **kw)
    scale = lambda name: self.param(  # noqa: E731
        name, nn.with_logical_partitioning(nn.initializers.constant(0.1), ("norm",)), (cfg.embed,),
        jnp.dtype(cfg.param_dtype)).astype(kw["dtype"])
    h, _ = Attention(cfg.embed, cfg.heads, cfg.heads, cfg.head_dim, qkv_bias=cfg.qkv_bias, o_bias=True,
                     impl=cfg.attention_impl, name="attn", **kw)(norm(name="norm1")(x), segment_ids=segment_ids)
    x = x + scale("ls1") * h
    x = x + scale("ls2") * MLP(cfg.embed, cfg.mlp, cfg.act, name="mlp", **kw)(norm(name="norm2")(x))
    x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
    return x, own


class InternViT(nn.Module):
  """pixels [n H W c] (tiles; H, W multiples of the patch) -> VisionOutput with last_hidden_state [n t d]
  (class token first) and, if asked, hidden_states (num_layers + 1 entries [n t d], embeddings first, as HF)."""

  cfg: InternViTConfig

  def setup(self):
    cfg = self.cfg
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    # a stride-p conv is a dense layer over (py, px, c)-flattened patches: one kernel [p p c d] (HWIO)
    self.patch_embedding = DenseGeneral((cfg.patch, cfg.patch, cfg.channels), (cfg.embed,),
                                        (None, None, None, "embed"), True, **kw)
    init = nn.initializers.normal(0.02)
    self.class_embedding = self.param(
        "class_embedding", nn.with_logical_partitioning(init, (None, None, "embed")), (1, 1, cfg.embed),
        jnp.dtype(cfg.param_dtype))
    self.position_embedding = self.param(   # row 0: the class token's; then the g x g grid, row-major
        "position_embedding", nn.with_logical_partitioning(init, (None, None, "embed")),
        (1, cfg.posemb_grid ** 2 + 1, cfg.embed), jnp.dtype(cfg.param_dtype))
    self.layers = build_layers(EncoderLayer, cfg.num_layers, cfg, scan=cfg.scan_layers, remat=cfg.remat, shared=1)

  def __call__(self, pixels: jax.Array, *, return_hidden_states: bool = False) -> VisionOutput:
    cfg = self.cfg
    n, height, width, _ = pixels.shape
    gh, gw = height // cfg.patch, width // cfg.patch
    if not gh or not gw or (gh * cfg.patch, gw * cfg.patch) != (height, width):
      raise ValueError(f"InternViT: pixels {pixels.shape} are not a whole number (>= 1) of {cfg.patch}-pixel "
                       f"patches per side")
    patches = rearrange(pixels.astype(jnp.dtype(cfg.dtype)), "n (h p) (w q) c -> n (h w) p q c", p=cfg.patch,
                        q=cfg.patch)
    table = self.position_embedding[0, 1:].reshape(cfg.posemb_grid, cfg.posemb_grid, cfg.embed)
    grid = resize_position_embeddings(table, (gh, gw), "bicubic").reshape(1, gh * gw, cfg.embed)
    tokens = self.patch_embedding(patches) + grid.astype(jnp.dtype(cfg.dtype))
    cls = (self.class_embedding + self.position_embedding[:, :1]).astype(tokens.dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, cfg.embed)), tokens], axis=1)
    x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
    x_in = x
    x, hidden, _ = run_layers(self.layers, x, None, None, hidden_states=return_hidden_states)
    return VisionOutput(last_hidden_state=x, pooler_output=None,
                        hidden_states=(x_in, *hidden) if return_hidden_states else None)
