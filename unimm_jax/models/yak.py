"""Ovis-U1's image decoder "Yak": an MMDiT-X (FLUX-derived) conditioned through a 2-block token refiner with a
CLS token.

Reference: the remote code of AIDC-AI/Ovis-U1-3B, modeling_yak.py (YakTransformer, DoubleStreamXBlock,
SingleStreamBlock, SingleTokenRefiner, LastLayer), as pinned and described in shared/fixtures/ovis_u1/README.md
(4.3, 4.4). Shapes: b batch, n image tokens (noise tokens, then condition tokens for edit), T text tokens,
c packed latent channels, k LLM condition width (2 x the LLM width), d width = h e.

  txt, cls = refiner(condition)                 (gate-only AdaLN blocks driven by the mean of ALL tokens)
  vec      = time_in(timestep features of 1000 t) + vector_in(cls)
  double blocks: models/flux.DoubleStreamBlock with image_self_attention (the third modulation)
  single blocks: models/flux.SingleStreamBlock
  final:   shift, scale = adaLN(vec) (shift first) -> Linear((1 + scale) LN(img) + shift)
Positions are FLUX ids (t, row, col): text 0, noise tokens (0, y, x), edit-condition tokens (1, y, x).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from unimm_jax.layers import MLP, Attention, DenseGeneral, LayerNorm
from unimm_jax.layers.modulation import AdaLNModulation, TimestepEmbedder, modulate
from unimm_jax.layers.rope import rope_angles_axes
from unimm_jax.layers.stack import build_layers, run_layers
from unimm_jax.models.config import DictConfig
from unimm_jax.models.flux import ACT, DoubleStreamBlock, SingleStreamBlock

MODEL_TYPE = "yak"


@dataclasses.dataclass(frozen=True)
class YakConfig(DictConfig):
  """Defaults are the released Ovis-U1-3B decoder (README 3.1: 1.127 B parameters)."""

  in_channels: int = 16             # a 2x2 patch of the 4-channel SDXL latent
  out_channels: int = 16
  hidden: int = 1536
  heads: int = 12
  depth: int = 6                    # double blocks
  single_depth: int = 12
  mlp_ratio: float = 4.0            # double and single blocks; the refiner's MLP ratio is fixed at 4
  context_dim: int = 4096           # cat(hidden_states[-1], hidden_states[-2]) of the LLM
  vec_in_dim: int = 1536            # vector_in's input: the refiner's CLS (width hidden)
  axes_dims: tuple[int, ...] = (16, 56, 56)
  rope_theta: float = 10000.0
  refiner_depth: int = 2
  norm_eps: float = 1e-6
  # the sampler's schedule (YakModel.get_schedule)
  timestep_shift: bool = True
  base_shift: float = 0.5
  max_shift: float = 1.15
  # Runtime choices: they change speed and memory, never the numbers.
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_impl: str = "auto"

  def __post_init__(self):
    if self.hidden % self.heads or self.hidden % (2 * self.heads):
      raise ValueError(f"YakConfig: hidden {self.hidden} must split into heads {self.heads} and 2 x heads")
    if sum(self.axes_dims) != self.head_dim or any(a % 2 for a in self.axes_dims):
      raise ValueError(f"YakConfig: axes_dims {self.axes_dims} must be even and sum to head_dim {self.head_dim}")
    if self.vec_in_dim != self.hidden:
      raise ValueError(f"YakConfig: vec_in_dim {self.vec_in_dim} must equal hidden {self.hidden} (vector_in reads "
                       "the refiner's CLS token)")

  @property
  def head_dim(self) -> int:
    return self.hidden // self.heads

  @property
  def mlp(self) -> int:
    return int(self.hidden * self.mlp_ratio)

  def forward_flops(self, n: int, t: int, refiner: bool = True, image_attention: bool = True) -> float:
    """Forward FLOPs (2 per multiply-add) of the matmuls and attention for n image and t text tokens: per double
    block each stream's qkv + proj + MLP and the joint attention over n + t, and the image self-attention (qkv +
    proj, attention over n); per single block qkv + MLP in, attention + MLP out; the condition's input projection
    and the refiner (blocks of qkv + proj + a ratio-4 MLP over 1 + t tokens). refiner / image_attention False:
    the same stack without them (FLUX of this size, the cost anchor of scripts/bench_ovis.py)."""
    d, mlp, total = self.hidden, self.mlp, n + t
    out = self.depth * (2 * total * (4 * d * d + 2 * d * mlp) + 2 * total * total * d)
    out += self.single_depth * (total * (3 * d * d + d * mlp + (d + mlp) * d) + 2 * total * total * d)
    out += t * self.context_dim * d
    if image_attention:
      out += self.depth * (n * 4 * d * d + 2 * n * n * d)
    if refiner:
      r = t + 1
      out += self.refiner_depth * (r * 12 * d * d + 2 * r * r * d)
    return 2.0 * out

  @classmethod
  def tiny(cls, **kw) -> "YakConfig":
    """The public fixture set's sizes."""
    return cls(**{**dict(hidden=64, heads=2, depth=2, single_depth=2, context_dim=128, vec_in_dim=64,
                         axes_dims=(8, 12, 12)), **kw})


def config_from_hf(d: Mapping[str, Any]) -> YakConfig:
  """visual_generator_config (YakConfig of the remote code) -> YakConfig."""
  if d.get("guidance_embed"):
    raise NotImplementedError("yak: guidance_embed=True (a distilled-guidance input) is not supported")
  if not d.get("qkv_bias", True):
    raise NotImplementedError("yak: qkv_bias=False is not supported (the FLUX blocks have biased q/k/v)")
  if d.get("txt_type", "refiner") != "refiner":
    raise NotImplementedError(f"yak: txt_type {d['txt_type']!r} (only the refiner)")
  return YakConfig(
      in_channels=d.get("in_channels", 16), out_channels=d.get("out_channels", 16), hidden=d["hidden_size"],
      heads=d["num_heads"], depth=d["depth"], single_depth=d["depth_single_blocks"],
      mlp_ratio=float(d.get("mlp_ratio", 4.0)), context_dim=d["context_in_dim"], vec_in_dim=d["vec_in_dim"],
      axes_dims=tuple(d["axes_dim"]), rope_theta=float(d.get("theta", 10000)),
      timestep_shift=bool(d.get("timestep_shift", True)), base_shift=float(d.get("base_shift", 0.5)),
      max_shift=float(d.get("max_shift", 1.15)))


class RefinerBlock(nn.Module):
  """IndividualTokenRefinerBlock: gate-only AdaLN (g_msa, g_mlp from c), biased self-attention without norm or
  RoPE, SiLU MLP of ratio 4: (x [b 1+T d], None, c [b d], segment_ids [b 1+T] or None) -> (x, None). The
  original has no mask; segment_ids only keep the padding of a batch of unequal prompts out."""

  features: int
  heads: int
  eps: float = 1e-6
  impl: str = "auto"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, own, c, segment_ids=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d = self.features
    gate_msa, gate_mlp = (g[:, None] for g in AdaLNModulation(d, 2, name="modulation", **kw)(c))
    attn, _ = Attention(d, self.heads, self.heads, d // self.heads, qkv_bias=True, o_bias=True, impl=self.impl,
                        name="attn", **kw)(LayerNorm(d, self.eps, name="norm1", **kw)(x), segment_ids=segment_ids)
    x = x + gate_msa * attn
    x = x + gate_mlp * MLP(d, 4 * d, "silu", name="mlp", **kw)(LayerNorm(d, self.eps, name="norm2", **kw)(x))
    return nn.with_logical_constraint(x, ACT), None


class TokenRefiner(nn.Module):
  """SingleTokenRefiner with a CLS token: condition [b T k] (+ mask [b T], 1 = token, 0 = padding) ->
  (tokens [b T d], cls [b d])."""

  cfg: YakConfig

  @nn.compact
  def __call__(self, txt: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    cfg = self.cfg
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    d = cfg.hidden
    # the original passes no mask: the mean runs over every position it is given (a batch of one prompt); the
    # mask keeps a padded batch equal to one call per prompt
    if mask is None:
      pooled, segments = jnp.mean(txt, axis=1), None
    else:
      w = mask.astype(txt.dtype)[..., None]
      pooled = jnp.sum(txt * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1)
      segments = jnp.concatenate([jnp.ones_like(mask[:, :1]), mask], axis=1).astype(jnp.int32)
    c = MLP(cfg.context_dim, d, "silu", out_features=d, name="c_embedder", **kw)(pooled)
    x = DenseGeneral((cfg.context_dim,), (d,), (None, "embed"), True, name="input_embedder", **kw)(txt)
    cls = self.param("cls_token", nn.with_logical_partitioning(nn.initializers.normal(1e-6), (None, None, "embed")),
                     (1, 1, d), kw["param_dtype"])
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, d)), x], axis=1)
    blocks = build_layers(RefinerBlock, cfg.refiner_depth, d, 2 * cfg.heads, cfg.norm_eps, cfg.attention_impl,
                          kw["dtype"], kw["param_dtype"], scan=False, shared=2, name="blocks")
    x, _, _ = run_layers(blocks, x, None, c, segments)
    return x[:, 1:], x[:, 0]


class YakTransformer(nn.Module):
  """Packed latent tokens (+ edit-condition tokens) and the LLM condition -> velocity of the noise tokens."""

  cfg: YakConfig

  def setup(self):
    cfg = self.cfg
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    d = cfg.hidden
    self.img_in = DenseGeneral((cfg.in_channels,), (d,), (None, "embed"), True, **kw)
    self.time_in = TimestepEmbedder(d, **kw)
    self.vector_in = MLP(cfg.vec_in_dim, d, "silu", out_features=d, **kw)
    self.txt_in = TokenRefiner(cfg)
    block = (d, cfg.heads, cfg.head_dim, cfg.mlp, cfg.norm_eps, cfg.attention_impl, kw["dtype"], kw["param_dtype"])
    self.double_blocks = build_layers(DoubleStreamBlock, cfg.depth, *block, True, scan=False, shared=3,
                                      name="double_blocks")
    self.single_blocks = build_layers(SingleStreamBlock, cfg.single_depth, *block, scan=False, shared=3,
                                      name="single_blocks")
    self.final_modulation = AdaLNModulation(d, 2, **kw)     # (shift, scale): shift first, unlike diffusers FLUX
    self.final_norm = LayerNorm(d, cfg.norm_eps, use_bias=False, use_scale=False, **kw)
    self.final_linear = DenseGeneral((d,), (cfg.out_channels,), ("embed", None), True, **kw)

  def __call__(self, img: jax.Array, img_ids: jax.Array, txt: jax.Array, timesteps: jax.Array,
               cond: jax.Array | None = None, cond_ids: jax.Array | None = None,
               txt_mask: jax.Array | None = None) -> jax.Array:
    """img [b n c] noisy packed latents with img_ids [n 3]; txt [b T k] the LLM condition; timesteps [b] flow
    time (1 = noise); cond [b m c] / cond_ids [m 3] edit-condition tokens; txt_mask [b T] (1 = token, 0 =
    padding) for a batch of conditions of unequal lengths -> velocity [b n out_channels]."""
    cfg = self.cfg
    if img.ndim != 3 or img.shape[-1] != cfg.in_channels or img_ids.shape != (img.shape[1], 3):
      raise ValueError(f"YakTransformer: img {img.shape} / img_ids {img_ids.shape} must be [b n {cfg.in_channels}] "
                       f"/ [n 3]")
    if txt.ndim != 3 or txt.shape[-1] != cfg.context_dim or txt.shape[0] != img.shape[0]:
      raise ValueError(f"YakTransformer: txt {txt.shape} must be [{img.shape[0]} T {cfg.context_dim}]")
    if txt_mask is not None and txt_mask.shape != txt.shape[:2]:
      raise ValueError(f"YakTransformer: txt_mask {txt_mask.shape} must be {txt.shape[:2]} (txt's [b T])")
    if (cond is None) != (cond_ids is None):
      raise ValueError("YakTransformer: cond and cond_ids go together")
    n = img.shape[1]
    if cond is not None:
      if cond.shape[0] != img.shape[0] or cond.shape[-1] != cfg.in_channels or cond_ids.shape != (cond.shape[1], 3):
        raise ValueError(f"YakTransformer: cond {cond.shape} / cond_ids {cond_ids.shape} must be "
                         f"[{img.shape[0]} m {cfg.in_channels}] / [m 3]")
      img, img_ids = jnp.concatenate([img, cond.astype(img.dtype)], 1), jnp.concatenate([img_ids, cond_ids])
    x = nn.with_logical_constraint(self.img_in(img), ACT)
    txt, cls = self.txt_in(txt, txt_mask)
    # text ids are all 0, so padding anywhere in the text changes no position; the mask keeps it out of attention
    seg = None if txt_mask is None else jnp.concatenate(
        [txt_mask.astype(jnp.int32), jnp.ones(img.shape[:2], jnp.int32)], axis=1)
    vec = self.time_in(timesteps.astype(jnp.float32) * 1000) + self.vector_in(cls)
    angles = rope_angles_axes(jnp.concatenate([jnp.zeros((txt.shape[1], 3), img_ids.dtype), img_ids]),
                              cfg.axes_dims, cfg.rope_theta)[None]
    (x, txt), _, _ = run_layers(self.double_blocks, (x, txt), None, vec, angles, seg)
    x, _, _ = run_layers(self.single_blocks, jnp.concatenate([txt, x], axis=1), None, vec, angles, seg)
    x = x[:, txt.shape[1]:]
    shift, scale = self.final_modulation(vec)
    return self.final_linear(modulate(self.final_norm(x), shift[:, None], scale[:, None]))[:, :n]
