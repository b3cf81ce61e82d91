"""Qwen2.5-VL vision transformer (also Ming-Lite-Uni's image encoder).

Paper: Qwen2.5-VL Technical Report (arXiv 2502.13923), section 2.1. Reference: transformers
models/qwen2_5_vl/modeling_qwen2_5_vl.py (Qwen2_5_VisionTransformerPretrainedModel).
Shapes: r packed rows, t tokens (patches) per row, d embed, h heads, e head_dim, f mlp, m merge,
P = channels * temporal_patch * patch * patch, o out_embed.

A patch is a (temporal_patch x patch x patch) video cube (images repeat their frame); its stride-equal Conv3d is
a dense layer over the cube. Blocks are pre-RMSNorm with SwiGLU and 2D RoPE over the patch's (row, column):
half of each head's rotary frequencies turn with the row, half with the column. Most blocks attend within
windows of window_size pixels (window / patch / merge merge groups a side); the blocks of `fullatt_blocks`
attend over whole frames. The merger RMS-normalises, concatenates each m x m group of patches and maps it
through a GELU MLP to one LLM token.

Inputs are packed rows built on the host by unimm_jax.data.qwen_vl.pack_vision: patches in window order, each
frame and each window one segment (`frame_ids`, `window_ids`: no padding to the longest window or image), and
the (row, column) of every patch. Outputs stay in that order; `VisionPacking.unpack` (or the LLM's gather)
restores the processor order.
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
from einops import rearrange

from unimm_jax.layers import Attention, DenseGeneral, GatedMLP, RMSNorm, activation, apply_rope
from unimm_jax.layers.rope import rope_angles_thw
from unimm_jax.layers.stack import build_layers, check_remat, run_layers
from unimm_jax.models.config import DictConfig


@dataclasses.dataclass(frozen=True)
class VisionBlockConfig:
  """The numbers of one pre-RMSNorm SwiGLU encoder block (Qwen2.5-VL ViT, AIMv2)."""

  embed: int
  heads: int
  mlp: int
  norm_eps: float
  qkv_bias: bool
  o_bias: bool
  mlp_bias: bool
  act: str
  dtype: str
  param_dtype: str
  attention_impl: str


class VisionBlock(nn.Module):
  """x + attn(norm1(x)); x + mlp(norm2(x)), attending within `frame_ids` if this layer is `full` else within
  `window_ids` ([r t] segments; None: no windows; both None: one image per row); `angles` [r t e/2] (2D RoPE)
  or None."""

  cfg: VisionBlockConfig

  @nn.compact
  def __call__(self, x: jax.Array, full: Any, angles: jax.Array | None, frame_ids: jax.Array | None,
               window_ids: jax.Array | None) -> tuple[jax.Array, Any]:
    cfg = self.cfg
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    if window_ids is None:
      segment_ids = frame_ids
    elif isinstance(full, bool):   # the loop layout; under scan `full` is traced
      segment_ids = frame_ids if full else window_ids
    else:
      segment_ids = jnp.where(full, frame_ids, window_ids)
    rope_fn = None if angles is None else functools.partial(apply_rope, angles=angles)
    h = RMSNorm(cfg.embed, cfg.norm_eps, name="norm1", **kw)(x)
    h, _ = Attention(cfg.embed, cfg.heads, cfg.heads, cfg.embed // cfg.heads, qkv_bias=cfg.qkv_bias,
                     o_bias=cfg.o_bias, impl=cfg.attention_impl, name="attn", **kw)(
                         h, rope_fn=rope_fn, segment_ids=segment_ids)
    x = x + h
    h = RMSNorm(cfg.embed, cfg.norm_eps, name="norm2", **kw)(x)
    x = x + GatedMLP(cfg.embed, cfg.mlp, cfg.act, use_bias=cfg.mlp_bias, name="mlp", **kw)(h)
    return nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed")), full


def check_windows(window_size: int, patch: int, merge: int, fullatt_blocks: tuple[int, ...], depth: int,
                  where: str) -> None:
  """Raises unless windows are whole merge groups and the full-attention blocks exist."""
  if window_size % (patch * merge):
    raise ValueError(f"{where}: window_size {window_size} is not a multiple of patch * merge = {patch * merge}")
  if any(not 0 <= i < depth for i in fullatt_blocks):
    raise ValueError(f"{where}: fullatt_blocks {fullatt_blocks} outside depth {depth}")


def vision_rope_angles(positions: jax.Array, head_dim: int, theta: float) -> jax.Array:
  """[r t 2] (row, column) -> [r t e/2]: the first half of the frequencies turn with the row, the second with the
  column, each over head_dim/2 dims (transformers' axial VisionRotaryEmbedding)."""
  return rope_angles_thw(positions, head_dim, theta, split=(1, 1))


def run_blocks(layers, x, full: tuple[bool, ...], scan: bool, *shared, hidden_states: bool = False):
  """run_layers over VisionBlocks, each told whether it attends over frames (`full`) or windows."""
  if scan:
    own = jnp.asarray(full)
  else:
    own = {layer.name: f for layer, f in zip(layers, full)}
  x, hidden, _ = run_layers(layers, x, own, *shared, hidden_states=hidden_states)
  return x, hidden


@dataclasses.dataclass(frozen=True)
class QwenVisionConfig(DictConfig):
  embed: int = 1280
  depth: int = 32
  heads: int = 16
  mlp: int = 3420
  out_embed: int = 3584                  # the LLM's width (Ming-Lite-Uni: 8192, UNVERIFIED)
  patch: int = 14
  temporal_patch: int = 2
  merge: int = 2                         # spatial_merge_size
  window_size: int = 112                 # pixels a window side
  fullatt_blocks: tuple[int, ...] = (7, 15, 23, 31)
  channels: int = 3
  act: str = "silu"
  norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  # Runtime choices: they change speed and memory, never the numbers.
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = False
  remat: str = "none"
  attention_impl: str = "auto"

  def __post_init__(self):
    if self.embed % self.heads or (self.embed // self.heads) % 4:
      raise ValueError(f"QwenVisionConfig: embed {self.embed} / heads {self.heads} must give a head_dim that is a "
                       "multiple of 4 (2D RoPE halves it twice)")
    check_windows(self.window_size, self.patch, self.merge, self.fullatt_blocks, self.depth, "QwenVisionConfig")
    check_remat(self.remat, "QwenVisionConfig")

  @property
  def head_dim(self) -> int:
    return self.embed // self.heads

  @property
  def window(self) -> int:
    """Merge groups a window side (pack_vision's `window`)."""
    return self.window_size // self.patch // self.merge

  @property
  def patch_dim(self) -> int:
    return self.channels * self.temporal_patch * self.patch * self.patch

  def block(self) -> VisionBlockConfig:
    return VisionBlockConfig(self.embed, self.heads, self.mlp, self.norm_eps, True, True, True, self.act, self.dtype,
                             self.param_dtype, self.attention_impl)

  @classmethod
  def qwen2_5_vl(cls, **kw) -> "QwenVisionConfig":
    """The tower of every Qwen2.5-VL size (3B/7B/72B config.json vision_config); out_embed is the LLM's width
    (7B: 3584)."""
    return cls(**kw)

  @classmethod
  def tiny(cls, **kw) -> "QwenVisionConfig":
    return cls(**{**dict(embed=32, depth=3, heads=4, mlp=48, out_embed=64, window_size=56, fullatt_blocks=(1,)),
                  **kw})


def config_from_hf(hf: Mapping[str, Any] | Any) -> QwenVisionConfig:
  """HF Qwen2.5-VL vision config (the vision_config dict, or a full qwen2_5_vl config) -> QwenVisionConfig."""
  d = hf if isinstance(hf, Mapping) else hf.to_dict()
  if d.get("model_type") == "qwen2_5_vl":
    d = d.get("vision_config") or {}
  rope = d.get("rope_parameters") or {}
  if rope.get("rope_type", "axial") != "axial":
    raise NotImplementedError(f"qwen2_5_vl vision: rope type {rope.get('rope_type')!r} is not supported (axial)")
  patch = d.get("patch_size", d.get("spatial_patch_size", 14))
  return QwenVisionConfig(
      embed=d.get("hidden_size", 3584), depth=d.get("depth", 32), heads=d.get("num_heads", 16),
      mlp=d.get("intermediate_size", 3420), out_embed=d.get("out_hidden_size", 3584), patch=patch,
      temporal_patch=d.get("temporal_patch_size", 2), merge=d.get("spatial_merge_size", 2),
      window_size=d.get("window_size", 112), fullatt_blocks=tuple(d.get("fullatt_block_indexes", (7, 15, 23, 31))),
      channels=d.get("in_channels", d.get("in_chans", 3)), act=d.get("hidden_act", "silu"),
      rope_theta=float(rope.get("rope_theta", 10000.0)))


@flax.struct.dataclass
class QwenVisionOutput:
  last_hidden_state: jax.Array        # [r t d] after the last block, in window order (padding rows are 0)
  pooler_output: jax.Array            # [r t/m^2 o] merged tokens, window order
  hidden_states: tuple | None         # depth + 1 entries [r t d]: the patch embeddings, then each block


class PatchMerger(nn.Module):
  """RMSNorm, concatenate each m x m group, Linear-GELU-Linear: [r t d] -> [r t/m^2 o]."""

  cfg: QwenVisionConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.cfg
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    wide = cfg.embed * cfg.merge ** 2
    x = RMSNorm(cfg.embed, 1e-6, name="ln_q", **kw)(x)   # eps fixed in transformers' merger
    x = rearrange(x, "r (n g) d -> r n (g d)", g=cfg.merge ** 2)
    x = DenseGeneral((wide,), (wide,), ("embed", "mlp"), True, name="mlp_0", **kw)(x)
    x = activation("gelu")(x)
    return DenseGeneral((wide,), (cfg.out_embed,), ("mlp", "embed"), True, name="mlp_2", **kw)(x)


class QwenVisionTransformer(nn.Module):
  """Packed patch rows -> merged tokens (module docstring)."""

  cfg: QwenVisionConfig

  def setup(self):
    cfg = self.cfg
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    self.patch_embed = DenseGeneral((cfg.temporal_patch, cfg.patch, cfg.patch, cfg.channels), (cfg.embed,),
                                    (None, None, None, None, "embed"), False, **kw)
    self.blocks = build_layers(VisionBlock, cfg.depth, cfg.block(), scan=cfg.scan_layers, remat=cfg.remat,
                               shared=3, name="blocks")
    self.merger = PatchMerger(cfg)

  def __call__(self, patches: jax.Array, positions: jax.Array, frame_ids: jax.Array, window_ids: jax.Array, *,
               return_hidden_states: bool = False) -> QwenVisionOutput:
    """patches [r t P] (each flattened (c, tp, py, px)), positions [r t 2], frame_ids / window_ids [r t]."""
    cfg = self.cfg
    if patches.ndim != 3 or patches.shape[-1] != cfg.patch_dim:
      raise ValueError(f"QwenVisionTransformer: patches {patches.shape} are not [r t {cfg.patch_dim}] "
                       f"(channels {cfg.channels} x temporal_patch {cfg.temporal_patch} x patch {cfg.patch}^2)")
    if patches.shape[1] % cfg.merge ** 2:
      raise ValueError(f"QwenVisionTransformer: rows of {patches.shape[1]} tokens are not a multiple of merge^2")
    cubes = rearrange(patches.astype(jnp.dtype(cfg.dtype)), "r t (c k p q) -> r t k p q c", c=cfg.channels,
                      k=cfg.temporal_patch, p=cfg.patch)
    x = nn.with_logical_constraint(self.patch_embed(cubes), ("act_batch", "act_length", "act_embed"))
    angles = vision_rope_angles(positions, cfg.head_dim, cfg.rope_theta)
    full = tuple(i in cfg.fullatt_blocks for i in range(cfg.depth))
    x_in = x
    x, hidden = run_blocks(self.blocks, x, full, cfg.scan_layers, angles, frame_ids, window_ids,
                           hidden_states=return_hidden_states)
    return QwenVisionOutput(last_hidden_state=x, pooler_output=self.merger(x),
                            hidden_states=(x_in, *hidden) if return_hidden_states else None)
