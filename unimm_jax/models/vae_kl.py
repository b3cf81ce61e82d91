"""AutoencoderKL: the SD / SDXL (4 latent channels) and FLUX (16) image autoencoder.

Reference: diffusers models/autoencoders/autoencoder_kl.py (AutoencoderKL), vae.py (Encoder, Decoder,
DiagonalGaussianDistribution), resnet.py (ResnetBlock2D), unets/unet_2d_blocks.py (DownEncoderBlock2D,
UpDecoderBlock2D, UNetMidBlock2D); the mid-block attention is diffusers' single-head `Attention` with a
group norm and a residual, run here by the shared `layers.Attention`.
Shapes: b batch, h w rows and columns (pixels or latents), c channels, z latent channels. Images are
NHWC in [-1, 1].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

from unimm_jax.layers import Attention, Conv, GroupNorm
from unimm_jax.models import tiling
from unimm_jax.models.codec import DiagonalGaussian, LatentNorm
from unimm_jax.models.config import DictConfig

ACT = ("act_batch", "act_height", "act_width", "act_channels")


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig(DictConfig):
  """Fields and defaults of diffusers' AutoencoderKL config (only DownEncoderBlock2D / UpDecoderBlock2D, silu)."""

  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int = 32                  # tile edge in pixels for tiled encode/decode
  scaling_factor: float = 0.18215
  shift_factor: float | None = None      # FLUX: latents are (z - shift) * scale
  latents_mean: tuple[float, ...] | None = None   # per-channel statistics some checkpoints carry
  latents_std: tuple[float, ...] | None = None
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  tile_overlap_factor: float = 0.25
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    if any(c % self.norm_num_groups for c in self.block_out_channels):
      raise ValueError(f"AutoencoderKLConfig: block_out_channels {self.block_out_channels} not divisible by "
                       f"norm_num_groups {self.norm_num_groups}")

  @property
  def spatial_downscale(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  temporal_downscale = 1   # an image codec (models/codec.py)

  def latent_norm(self) -> LatentNorm:
    """As the SD / SDXL / FLUX pipelines: per-channel statistics when the checkpoint has them, else shift_factor."""
    if self.latents_mean is not None and self.latents_std is not None:
      return LatentNorm(self.latents_mean, self.latents_std, self.scaling_factor)
    return LatentNorm(self.shift_factor or 0.0, 1.0, self.scaling_factor)


PRESETS = {
    # SD 1.x / 2.x (stabilityai/sd-vae-ft-mse, whose config.json says sample_size 256: the tile edge of tiled
    # encode/decode) and SDXL (Ovis-U1) share the layout; SDXL rescales.
    "sd": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=256),
    "sdxl": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=1024,
                 scaling_factor=0.13025),
    # FLUX.1 (UniWorld): 16 channels, no quant convs, shifted latents.
    "flux": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                 sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                 use_post_quant_conv=False),
    "tiny": dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=32),
}


def preset(name: str, **overrides) -> AutoencoderKLConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown AutoencoderKL preset {name!r}; known: {sorted(PRESETS)}")
  return AutoencoderKLConfig(**{**PRESETS[name], **overrides})


def config_from_diffusers(d: Mapping[str, Any]) -> AutoencoderKLConfig:
  """diffusers config.json (dict) -> AutoencoderKLConfig; raises on layouts this module does not build."""
  for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
    bad = [t for t in d.get(key, [want]) if t != want]
    if bad:
      raise NotImplementedError(f"AutoencoderKL: {key} {bad} not supported (only {want})")
  if d.get("act_fn", "silu") != "silu":
    raise NotImplementedError(f"AutoencoderKL: act_fn {d['act_fn']!r} not supported (only silu)")
  sample = d.get("sample_size", 32)
  fields = {f.name for f in dataclasses.fields(AutoencoderKLConfig)} - {"dtype", "param_dtype", "sample_size"}
  kw = {k: d[k] for k in fields if k in d and d[k] is not None}
  return AutoencoderKLConfig.from_dict({**kw, "sample_size": sample[0] if isinstance(sample, list) else sample})


def diffusers_config(cfg: AutoencoderKLConfig) -> dict[str, Any]:
  """AutoencoderKLConfig -> diffusers config.json."""
  d = {k: v for k, v in cfg.to_dict().items() if k not in ("dtype", "param_dtype", "tile_overlap_factor")}
  n = len(cfg.block_out_channels)
  return {"_class_name": "AutoencoderKL", **d, "down_block_types": ["DownEncoderBlock2D"] * n,
          "up_block_types": ["UpDecoderBlock2D"] * n, "act_fn": "silu"}


class ResnetBlock2D(nn.Module):
  """x + conv2(silu(gn2(conv1(silu(gn1(x)))))), with a 1x1 conv_shortcut when channels change."""

  features: int
  groups: int
  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.silu(GroupNorm(x.shape[-1], self.groups, self.eps, name="norm1", **kw)(x))
    h = Conv(self.features, (3, 3), name="conv1", **kw)(h)
    h = nn.silu(GroupNorm(self.features, self.groups, self.eps, name="norm2", **kw)(h))
    h = Conv(self.features, (3, 3), name="conv2", **kw)(h)
    if x.shape[-1] != self.features:
      x = Conv(self.features, (1, 1), name="conv_shortcut", **kw)(x)
    return nn.with_logical_constraint(x.astype(self.dtype) + h, ACT)


class AttentionBlock(nn.Module):
  """x + attn(group_norm(x)) over the h*w positions, one head of width c."""

  groups: int
  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, h, w, c = x.shape
    t = rearrange(GroupNorm(c, self.groups, self.eps, name="group_norm", **kw)(x), "b h w c -> b (h w) c")
    y, _ = Attention(c, 1, 1, c, qkv_bias=True, o_bias=True, name="attn", **kw)(t)
    return x.astype(self.dtype) + y.reshape(b, h, w, c)


class MidBlock(nn.Module):
  """UNetMidBlock2D: resnet, (attention, resnet)."""

  groups: int
  attention: bool = True
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c = x.shape[-1]
    x = ResnetBlock2D(c, self.groups, name="resnets_0", **kw)(x)
    if self.attention:
      x = AttentionBlock(self.groups, name="attentions_0", **kw)(x)
    return ResnetBlock2D(c, self.groups, name="resnets_1", **kw)(x)


class Resample(nn.Module):
  """`down`: pad (0, 1) right/bottom then 3x3 stride-2 conv; `up`: nearest 2x then 3x3 conv."""

  features: int
  down: bool
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.down:
      return Conv(self.features, (3, 3), (2, 2), ((0, 1), (0, 1)), name="conv", **kw)(x)
    return Conv(self.features, (3, 3), upsample=True, name="conv", **kw)(x)   # nearest 2x, then the conv


class Block(nn.Module):
  """DownEncoderBlock2D / UpDecoderBlock2D: `layers` resnets then an optional resampler."""

  features: int
  layers: int
  groups: int
  resample: str | None   # "down" | "up" | None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for j in range(self.layers):
      x = ResnetBlock2D(self.features, self.groups, name=f"resnets_{j}", **kw)(x)
    if self.resample is not None:
      name = "downsamplers_0" if self.resample == "down" else "upsamplers_0"
      x = Resample(self.features, self.resample == "down", name=name, **kw)(x)
    return x


class Encoder(nn.Module):
  """[b h w 3] -> [b h/f w/f 2z] moments (mean, logvar)."""

  cfg: AutoencoderKLConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg, kw = self.cfg, _kw(self.cfg)
    chans, g = cfg.block_out_channels, cfg.norm_num_groups
    x = Conv(chans[0], (3, 3), name="conv_in", **kw)(x)
    for i, c in enumerate(chans):
      last = i == len(chans) - 1
      x = Block(c, cfg.layers_per_block, g, None if last else "down", name=f"down_blocks_{i}", **kw)(x)
    x = MidBlock(g, cfg.mid_block_add_attention, name="mid_block", **kw)(x)
    x = nn.silu(GroupNorm(chans[-1], g, 1e-6, name="conv_norm_out", **kw)(x))
    return Conv(2 * cfg.latent_channels, (3, 3), name="conv_out", **kw)(x)


class Decoder(nn.Module):
  """[b h w z] -> [b h*f w*f 3]."""

  cfg: AutoencoderKLConfig

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    cfg, kw = self.cfg, _kw(self.cfg)
    chans, g = cfg.block_out_channels[::-1], cfg.norm_num_groups
    x = Conv(chans[0], (3, 3), name="conv_in", **kw)(z)
    x = MidBlock(g, cfg.mid_block_add_attention, name="mid_block", **kw)(x)
    for i, c in enumerate(chans):
      last = i == len(chans) - 1
      x = Block(c, cfg.layers_per_block + 1, g, None if last else "up", name=f"up_blocks_{i}", **kw)(x)
    x = nn.silu(GroupNorm(chans[-1], g, 1e-6, name="conv_norm_out", **kw)(x))
    return Conv(cfg.out_channels, (3, 3), name="conv_out", **kw)(x)


def _kw(cfg: AutoencoderKLConfig) -> dict[str, Any]:
  return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


class AutoencoderKL(nn.Module):
  """encode: image -> DiagonalGaussian over latents; decode: latents -> image; tiled_* for large images."""

  cfg: AutoencoderKLConfig

  def setup(self):
    cfg, kw = self.cfg, _kw(self.cfg)
    z = cfg.latent_channels
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg)
    if cfg.use_quant_conv:
      self.quant_conv = Conv(2 * z, (1, 1), **kw)
    if cfg.use_post_quant_conv:
      self.post_quant_conv = Conv(z, (1, 1), **kw)

  def _check(self, x: jax.Array, channels: int, what: str) -> None:
    f = self.cfg.spatial_downscale if what == "image" else 1
    if x.ndim != 4 or x.shape[-1] != channels or x.shape[1] % f or x.shape[2] % f:
      raise ValueError(f"AutoencoderKL: {what} {x.shape} must be [b h w {channels}] with h, w multiples of {f}")

  def encode(self, x: jax.Array) -> DiagonalGaussian:
    """[b h w 3] in [-1, 1] -> posterior over [b h/f w/f z]."""
    self._check(x, self.cfg.in_channels, "image")
    moments = self.encoder(nn.with_logical_constraint(x, ACT))
    if self.cfg.use_quant_conv:
      moments = self.quant_conv(moments)
    return DiagonalGaussian.from_moments(moments.astype(jnp.float32))

  def decode(self, z: jax.Array) -> jax.Array:
    """[b h w z] -> [b h*f w*f 3] (not clamped, as diffusers)."""
    self._check(z, self.cfg.latent_channels, "latent")
    if self.cfg.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(nn.with_logical_constraint(z, ACT)).astype(jnp.float32)

  def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """Reconstruction: decode(posterior sample if rng is given, else its mean)."""
    post = self.encode(x)
    return self.decode(post.mode() if rng is None else post.sample(rng))

  def tiled_encode(self, x: jax.Array) -> DiagonalGaussian:
    """encode() in overlapping tiles of cfg.sample_size pixels (diffusers `_tiled_encode`)."""
    cfg = self.cfg
    self._check(x, cfg.in_channels, "image")
    tile_px, tile_lat = cfg.sample_size, cfg.sample_size // cfg.spatial_downscale
    blend = int(tile_lat * cfg.tile_overlap_factor)
    stride = int(tile_px * (1 - cfg.tile_overlap_factor))
    grid = tiling.map_tiles(self.encoder, lambda enc, t: enc(t), x, (tile_px, tile_px), (stride, stride))
    out_hw = (x.shape[1] // cfg.spatial_downscale, x.shape[2] // cfg.spatial_downscale)
    # quant_conv is a 1x1 affine map and blending a convex combination, so it commutes with the blend.
    moments = tiling.blend_grid(grid, (blend, blend), (tile_lat - blend,) * 2, out_hw)
    if cfg.use_quant_conv:
      moments = self.quant_conv(moments)
    return DiagonalGaussian.from_moments(moments.astype(jnp.float32))

  def tiled_decode(self, z: jax.Array) -> jax.Array:
    """decode() in overlapping latent tiles of cfg.sample_size / f (diffusers `tiled_decode`)."""
    cfg = self.cfg
    self._check(z, cfg.latent_channels, "latent")
    tile_px, tile_lat = cfg.sample_size, cfg.sample_size // cfg.spatial_downscale
    blend = int(tile_px * cfg.tile_overlap_factor)
    stride = int(tile_lat * (1 - cfg.tile_overlap_factor))
    if cfg.use_post_quant_conv:
      z = self.post_quant_conv(z)   # 1x1: the same per tile or on the whole latent
    grid = tiling.map_tiles(self.decoder, lambda dec, t: dec(t), z, (tile_lat, tile_lat), (stride, stride))
    out_hw = (z.shape[1] * cfg.spatial_downscale, z.shape[2] * cfg.spatial_downscale)
    return tiling.blend_grid(grid, (blend, blend), (tile_px - blend,) * 2, out_hw).astype(jnp.float32)

  def normalize(self, z: jax.Array) -> jax.Array:
    """Posterior latents -> the diffusion model's latents (cfg.latent_norm())."""
    return self.cfg.latent_norm().apply(z)

  def denormalize(self, z: jax.Array) -> jax.Array:
    """Inverse of normalize."""
    return self.cfg.latent_norm().invert(z)
