"""Wan 2.1 / 2.2 video VAE: causal 3D convolutions, streamed over frame chunks with a feature cache.

Reference: diffusers models/autoencoders/autoencoder_kl_wan.py (AutoencoderKLWan); the original release
is Wan-Video/Wan2.2 wan/modules/vae2_2.py (Wan2.2_VAE.pth, as TUNA loads it) and wan/modules/vae2_1.py.
Wan 2.1: z 16, 8x spatial, 4x temporal. Wan 2.2: z 48, 2x2 patchify + 8x = 16x spatial, 4x temporal,
residual down/up blocks whose shortcuts average (AvgDown3D) or duplicate (DupUp3D) pixels.

Every op is per frame or causal in time, so a video is encoded as its first frame, then chunks of 4
frames (decoded one latent frame at a time), each conv reading the previous chunk's last frames from
a cache. The cache is a pytree of fixed-shape arrays carried through `nn.scan`; images are 1 frame.
Shapes: b batch, t frames, h w rows and columns, c channels, z latent channels; videos NTHWC in [-1, 1].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange, repeat

from unimm_jax import kernels
from unimm_jax.layers import CausalConv3D, Conv, L2Norm
from unimm_jax.models import tiling
from unimm_jax.models.codec import DiagonalGaussian, LatentNorm
from unimm_jax.models.config import DictConfig

ACT = ("act_batch", "act_frames", "act_height", "act_width", "act_channels")
Cache = dict[str, Any]

WAN21_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
              -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
             1.6382, 1.1253, 2.8251, 1.916)
WAN22_MEAN = (-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813,
              0.0891, 0.157, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108,
              -0.2158, 0.2502, -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.123, -0.0313,
              -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.052, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573,
              -0.0548, -0.1681, -0.0667)
WAN22_STD = (0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.499, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
             0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
             0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
             0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.06, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744)


@dataclasses.dataclass(frozen=True)
class WanVAEConfig(DictConfig):
  """Fields and defaults of diffusers' AutoencoderKLWan config (Wan 2.1), plus runtime choices."""

  base_dim: int = 96
  decoder_base_dim: int | None = None
  z_dim: int = 16
  dim_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  temperal_downsample: tuple[bool, ...] = (False, True, True)   # (sic) diffusers' spelling
  latents_mean: tuple[float, ...] = WAN21_MEAN
  latents_std: tuple[float, ...] = WAN21_STD
  is_residual: bool = False       # Wan 2.2: residual down/up blocks
  in_channels: int = 3
  out_channels: int = 3
  patch_size: int | None = None   # Wan 2.2: 2 (pixels are 2x2-patchified into 12 channels)
  scale_factor_temporal: int = 4
  scale_factor_spatial: int = 8
  tile_sample_min_size: int = 256     # diffusers' tiling defaults (pixels of the patchified input)
  tile_sample_stride: int = 192
  dtype: str = "float32"
  param_dtype: str = "float32"
  # a TUNA's vae/ converted before 0.2 recorded latent_shift="std"; that is TunaConfig.latent_stats now
  RETIRED_FIELDS: ClassVar[tuple[str, ...]] = ("latent_shift",)

  def __post_init__(self):
    if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
      raise ValueError(f"WanVAEConfig: latents_mean/std need {self.z_dim} entries")
    if len(self.temperal_downsample) != len(self.dim_mult) - 1:
      raise ValueError(f"WanVAEConfig: temperal_downsample needs {len(self.dim_mult) - 1} entries")

  @property
  def patch(self) -> int:
    return self.patch_size or 1

  # the latent codec interface (models/codec.py)
  @property
  def latent_channels(self) -> int:
    return self.z_dim

  @property
  def spatial_downscale(self) -> int:
    return self.scale_factor_spatial

  @property
  def temporal_downscale(self) -> int:
    return self.scale_factor_temporal

  def latent_norm(self) -> LatentNorm:
    return LatentNorm(self.latents_mean, self.latents_std)



PRESETS = {
    "wan2.1": dict(),
    "wan2.2": dict(base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, in_channels=12,
                   out_channels=12, patch_size=2, scale_factor_spatial=16, latents_mean=WAN22_MEAN,
                   latents_std=WAN22_STD),
}


def preset(name: str, **overrides) -> WanVAEConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown Wan VAE preset {name!r}; known: {sorted(PRESETS)}")
  return WanVAEConfig(**{**PRESETS[name], **overrides})


def config_from_diffusers(d: Mapping[str, Any]) -> WanVAEConfig:
  """diffusers AutoencoderKLWan config.json (dict) -> WanVAEConfig."""
  if d.get("attn_scales"):
    raise NotImplementedError(f"AutoencoderKLWan: attn_scales {d['attn_scales']} not supported (only [])")
  if d.get("dropout", 0.0):
    raise NotImplementedError("AutoencoderKLWan: dropout > 0 is a training option this module does not build")
  skip = {"tile_sample_min_size", "tile_sample_stride", "dtype", "param_dtype"}
  fields = {f.name for f in dataclasses.fields(WanVAEConfig)} - skip
  return WanVAEConfig.from_dict({k: d[k] for k in fields if k in d})


def diffusers_config(cfg: WanVAEConfig) -> dict[str, Any]:
  skip = ("tile_sample_min_size", "tile_sample_stride", "dtype", "param_dtype")
  return {"_class_name": "AutoencoderKLWan", "attn_scales": [], "dropout": 0.0,
          **{k: v for k, v in cfg.to_dict().items() if k not in skip}}


def _tail(x: jax.Array, prev: jax.Array | None, n: int) -> jax.Array:
  """Last n frames of the stream (prev, x); zeros stand in for frames before the first."""
  if prev is None:
    prev = jnp.zeros((x.shape[0], n, *x.shape[2:]), x.dtype)
  return jnp.concatenate([prev.astype(x.dtype), x], axis=1)[:, -n:]


def _causal(conv: nn.Module, x: jax.Array, cache: Cache | None, new: Cache) -> jax.Array:
  """A 3-tap causal conv on one chunk: context from the cache (zeros at the start), cache <- stream tail."""
  prev = None if cache is None else cache[conv.name]
  new[conv.name] = _tail(x, prev, 2)
  return conv(x, prev)


def _per_frame(fn, x: jax.Array) -> jax.Array:
  b = x.shape[0]
  y = fn(rearrange(x, "b t h w c -> (b t) h w c"))
  return rearrange(y, "(b t) h w c -> b t h w c", b=b)


class ResidualBlock(nn.Module):
  """WanResidualBlock: shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x)))))), causal 3x3x3 convs."""

  features: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, cache: Cache | None) -> tuple[jax.Array, Cache]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    new: Cache = {}
    h = x
    if x.shape[-1] != self.features:
      h = CausalConv3D(self.features, (1, 1, 1), name="conv_shortcut", **kw)(x)
    y = nn.silu(L2Norm(x.shape[-1], name="norm1", **kw)(x))
    y = _causal(CausalConv3D(self.features, name="conv1", **kw), y, cache, new)
    y = nn.silu(L2Norm(self.features, name="norm2", **kw)(y))
    y = _causal(CausalConv3D(self.features, name="conv2", **kw), y, cache, new)
    return nn.with_logical_constraint(y + h.astype(y.dtype), ACT), new


class AttentionBlock(nn.Module):
  """WanAttentionBlock: per frame, x + proj(attention(to_qkv(norm(x)))), one head over h*w."""

  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c = x.shape[-1]

    def attend(f: jax.Array) -> jax.Array:   # [n h w c]
      qkv = Conv(3 * c, (1, 1), name="to_qkv", **kw)(L2Norm(c, name="norm", **kw)(f))
      q, k, v = (rearrange(a, "n h w c -> n (h w) 1 c") for a in jnp.split(qkv, 3, axis=-1))
      o = rearrange(kernels.attention(q, k, v), "n (h w) 1 c -> n h w c", h=f.shape[1])
      return Conv(c, (1, 1), name="proj", **kw)(o)

    return x + _per_frame(attend, x).astype(x.dtype)


class MidBlock(nn.Module):
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, cache: Cache | None) -> tuple[jax.Array, Cache]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c, new = x.shape[-1], {}
    x = _run(ResidualBlock(c, name="resnets_0", **kw), x, cache, new)
    x = AttentionBlock(name="attentions_0", **kw)(x)
    return _run(ResidualBlock(c, name="resnets_1", **kw), x, cache, new), new


def _sub(cache: Cache | None, key: str) -> Cache | None:
  return None if cache is None else cache[key]


def _run(block: nn.Module, x: jax.Array, cache: Cache | None, new: Cache) -> jax.Array:
  """Runs a streaming block on its part of the cache and records its new part under its name."""
  x, new[block.name] = block(x, _sub(cache, block.name))
  return x


class Resample(nn.Module):
  """WanResample. down: pad (0, 1), 3x3 stride-2 conv per frame (+ stride-2 time_conv over frames);
  up: nearest 2x and 3x3 conv per frame (upsample3d first doubles frames with a causal time_conv)."""

  features: int           # output channels of the spatial conv
  mode: str               # downsample2d | downsample3d | upsample2d | upsample3d
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, cache: Cache | None) -> tuple[jax.Array, Cache]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c, new = x.shape[-1], {}
    if self.mode == "upsample3d":
      conv = CausalConv3D(2 * c, (3, 1, 1), name="time_conv", **kw)
      if cache is None:   # first chunk: frame 0 is not doubled, and the stream restarts after it
        new["time_conv"] = jnp.zeros((x.shape[0], 2, *x.shape[2:]), x.dtype)
      else:
        x = rearrange(_causal(conv, x, cache, new), "b t h w (two c) -> b (t two) h w c", two=2)
    if self.mode.startswith("up"):
      x = _per_frame(Conv(self.features, (3, 3), upsample=True, name="resample", **kw), x)  # nearest 2x, conv
    else:
      conv = Conv(self.features, (3, 3), (2, 2), ((0, 1), (0, 1)), name="resample", **kw)
      x = _per_frame(conv, x)
    if self.mode == "downsample3d":
      time_conv = Conv(c, (3, 1, 1), (2, 1, 1), ((0, 0),) * 3, name="time_conv", **kw)
      new["time_conv"] = x[:, -1:]
      if cache is not None:   # the first chunk's frame passes through; later pairs are merged
        x = time_conv(jnp.concatenate([cache["time_conv"].astype(x.dtype), x], axis=1))
    return x, new


def avg_down(x: jax.Array, out: int, ft: int, fs: int) -> jax.Array:
  """AvgDown3D: fold ft x fs x fs pixels into channels (front-padding time), average groups down to `out`."""
  pad = (-x.shape[1]) % ft
  x = jnp.pad(x, ((0, 0), (pad, 0), (0, 0), (0, 0), (0, 0)))
  x = rearrange(x, "b (t ft) (h fh) (w fw) c -> b t h w (c ft fh fw)", ft=ft, fh=fs, fw=fs)
  return rearrange(x, "b t h w (o g) -> b t h w o g", o=out).mean(-1)


def dup_up(x: jax.Array, out: int, ft: int, fs: int, first_chunk: bool) -> jax.Array:
  """DupUp3D: repeat channels, unfold them into ft x fs x fs pixels; the first chunk drops ft - 1 frames."""
  x = repeat(x, "b t h w c -> b t h w (c r)", r=out * ft * fs * fs // x.shape[-1])
  x = rearrange(x, "b t h w (o ft fh fw) -> b (t ft) (h fh) (w fw) o", ft=ft, fh=fs, fw=fs)
  return x[:, ft - 1:] if first_chunk else x


class DownBlock(nn.Module):
  """WanResidualDownBlock (Wan 2.2): resnets + downsampler, plus an AvgDown3D shortcut."""

  features: int
  num_res_blocks: int
  temporal: bool
  down: bool
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, cache: Cache | None) -> tuple[jax.Array, Cache]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    short, new = avg_down(x, self.features, 2 if self.temporal else 1, 2 if self.down else 1), {}
    for j in range(self.num_res_blocks):
      x = _run(ResidualBlock(self.features, name=f"resnets_{j}", **kw), x, cache, new)
    if self.down:
      mode = "downsample3d" if self.temporal else "downsample2d"
      x = _run(Resample(self.features, mode, name="downsampler", **kw), x, cache, new)
    return x + short.astype(x.dtype), new


class UpBlock(nn.Module):
  """WanUpBlock (2.1: resnets + upsamplers_0 halving channels) / WanResidualUpBlock (2.2: resnets +
  upsampler, plus a DupUp3D shortcut)."""

  features: int
  num_res_blocks: int
  mode: str | None        # upsample2d | upsample3d | None
  residual: bool
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, cache: Cache | None) -> tuple[jax.Array, Cache]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x_in, new = x, {}
    for j in range(self.num_res_blocks + 1):
      x = _run(ResidualBlock(self.features, name=f"resnets_{j}", **kw), x, cache, new)
    if self.mode is not None:
      name = "upsampler" if self.residual else "upsamplers_0"
      out = self.features if self.residual else self.features // 2
      x = _run(Resample(out, self.mode, name=name, **kw), x, cache, new)
      if self.residual:
        ft = 2 if self.mode == "upsample3d" else 1
        x = x + dup_up(x_in, self.features, ft, 2, first_chunk=cache is None).astype(x.dtype)
    return x, new


class Encoder(nn.Module):
  """WanEncoder3d on one chunk: [b t h w c_in] -> [b t' h/8 w/8 2z], and the chunk's cache."""

  cfg: WanVAEConfig

  @nn.compact
  def __call__(self, x: jax.Array, cache: Cache | None) -> tuple[jax.Array, Cache]:
    cfg, kw, new = self.cfg, _kw(self.cfg), {}
    dims = [cfg.base_dim * u for u in (1, *cfg.dim_mult)]
    x = _causal(CausalConv3D(dims[0], name="conv_in", **kw), x, cache, new)
    k, last = 0, len(cfg.dim_mult) - 1
    for i, d_out in enumerate(dims[1:]):
      if cfg.is_residual:
        temporal = cfg.temperal_downsample[i] if i != last else False
        blk = DownBlock(d_out, cfg.num_res_blocks, temporal, i != last, name=f"down_blocks_{i}", **kw)
        x = _run(blk, x, cache, new)
        continue
      for _ in range(cfg.num_res_blocks):   # Wan 2.1 keeps one flat list of resnets and resamplers
        x, k = _run(ResidualBlock(d_out, name=f"down_blocks_{k}", **kw), x, cache, new), k + 1
      if i != last:
        mode = "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"
        x, k = _run(Resample(d_out, mode, name=f"down_blocks_{k}", **kw), x, cache, new), k + 1
    x = _run(MidBlock(name="mid_block", **kw), x, cache, new)
    x = nn.silu(L2Norm(dims[-1], name="norm_out", **kw)(x))
    x = _causal(CausalConv3D(2 * cfg.z_dim, name="conv_out", **kw), x, cache, new)
    return x, new


class Decoder(nn.Module):
  """WanDecoder3d on one latent frame: [b 1 h w z] -> [b t' h*8 w*8 c_out] (t' = 1 for the first frame, else 4)."""

  cfg: WanVAEConfig

  @nn.compact
  def __call__(self, x: jax.Array, cache: Cache | None) -> tuple[jax.Array, Cache]:
    cfg, kw, new = self.cfg, _kw(self.cfg), {}
    dim = cfg.decoder_base_dim or cfg.base_dim
    dims = [dim * u for u in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
    up_t = cfg.temperal_downsample[::-1]
    x = _causal(CausalConv3D(dims[0], name="conv_in", **kw), x, cache, new)
    x = _run(MidBlock(name="mid_block", **kw), x, cache, new)
    last = len(cfg.dim_mult) - 1
    for i, d_out in enumerate(dims[1:]):
      mode = None if i == last else ("upsample3d" if up_t[i] else "upsample2d")
      x = _run(UpBlock(d_out, cfg.num_res_blocks, mode, cfg.is_residual, name=f"up_blocks_{i}", **kw), x, cache, new)
    x = nn.silu(L2Norm(dims[-1], name="norm_out", **kw)(x))
    x = _causal(CausalConv3D(cfg.out_channels, name="conv_out", **kw), x, cache, new)
    return x, new


def _kw(cfg: WanVAEConfig) -> dict[str, Any]:
  return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


def stream(module: nn.Module, x: jax.Array, first: int, chunk: int) -> jax.Array:
  """Runs module(chunk, cache) over x [b t ...]: the first `first` frames without a cache, then
  `chunk`-frame chunks under nn.scan with the cache as carry; returns the outputs joined on t."""
  y, cache = module(x[:, :first], None)
  if x.shape[1] == first:
    return y
  chunks = rearrange(x[:, first:], "b (n f) ... -> n b f ...", f=chunk)
  step = nn.scan(lambda mdl, c, xs: mdl(xs, c)[::-1], variable_broadcast="params", split_rngs={"params": False})
  _, ys = step(module, cache, chunks)
  return jnp.concatenate([y, rearrange(ys, "n b f ... -> b (n f) ...")], axis=1)


class WanVAE(nn.Module):
  """encode: video [b t H W 3] -> posterior over [b 1+(t-1)/4 H/s W/s z]; decode: the inverse (clamped)."""

  cfg: WanVAEConfig

  def setup(self):
    cfg, kw = self.cfg, _kw(self.cfg)
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg)
    self.quant_conv = CausalConv3D(2 * cfg.z_dim, (1, 1, 1), **kw)
    self.post_quant_conv = CausalConv3D(cfg.z_dim, (1, 1, 1), **kw)

  def _check(self, x: jax.Array, what: str) -> None:
    cfg = self.cfg
    c, f = (cfg.in_channels // cfg.patch ** 2, cfg.scale_factor_spatial) if what == "video" else (cfg.z_dim, 1)
    if x.ndim != 5 or x.shape[-1] != c or x.shape[2] % f or x.shape[3] % f:
      raise ValueError(f"WanVAE: {what} {x.shape} must be [b t h w {c}] with h, w multiples of {f}")
    if what == "video" and (x.shape[1] - 1) % cfg.scale_factor_temporal:
      # diffusers silently drops the frames past the last whole chunk; we refuse instead.
      raise ValueError(f"WanVAE: {x.shape[1]} frames; need 1 + {cfg.scale_factor_temporal}k")

  def _patchify(self, x: jax.Array) -> jax.Array:
    p = self.cfg.patch
    return rearrange(x, "b t (h q) (w r) c -> b t h w (c r q)", q=p, r=p) if p > 1 else x

  def _unpatchify(self, x: jax.Array) -> jax.Array:
    p = self.cfg.patch
    return rearrange(x, "b t h w (c r q) -> b t (h q) (w r) c", q=p, r=p) if p > 1 else x

  def encode(self, x: jax.Array) -> DiagonalGaussian:
    """[b t H W 3] in [-1, 1] (t = 1 + 4k; images t = 1) -> posterior, first frame then 4-frame chunks."""
    self._check(x, "video")
    x = nn.with_logical_constraint(self._patchify(x), ACT)
    moments = self.quant_conv(stream(self.encoder, x, 1, self.cfg.scale_factor_temporal))
    return DiagonalGaussian.from_moments(moments.astype(jnp.float32))

  def decode(self, z: jax.Array) -> jax.Array:
    """[b t h w z] -> [b 1+4(t-1) h*s w*s 3] in [-1, 1], one latent frame per step."""
    self._check(z, "latent")
    x = stream(self.decoder, self.post_quant_conv(nn.with_logical_constraint(z, ACT)), 1, 1)
    return jnp.clip(self._unpatchify(x).astype(jnp.float32), -1.0, 1.0)

  def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    post = self.encode(x)
    return self.decode(post.mode() if rng is None else post.sample(rng))

  def tiled_encode(self, x: jax.Array) -> DiagonalGaussian:
    """encode() over overlapping spatial tiles (diffusers `tiled_encode`), each tile streamed over frames."""
    cfg = self.cfg
    self._check(x, "video")
    x = self._patchify(x)
    ratio = cfg.scale_factor_spatial // cfg.patch
    tile, stride = cfg.tile_sample_min_size, cfg.tile_sample_stride
    grid = tiling.map_tiles(self.encoder, lambda enc, t: stream(enc, t, 1, cfg.scale_factor_temporal), x,
                            (tile, tile), (stride, stride))
    blend = tile // ratio - stride // ratio
    out_hw = (x.shape[2] // ratio, x.shape[3] // ratio)
    # quant_conv is pointwise affine, so applying it after the convex blend equals diffusers' per-tile order.
    moments = self.quant_conv(tiling.blend_grid(grid, (blend, blend), (stride // ratio,) * 2, out_hw))
    return DiagonalGaussian.from_moments(moments.astype(jnp.float32))

  def tiled_decode(self, z: jax.Array) -> jax.Array:
    """decode() over overlapping latent tiles (diffusers `tiled_decode`)."""
    cfg = self.cfg
    self._check(z, "latent")
    s, p = cfg.scale_factor_spatial, cfg.patch
    tile, stride = cfg.tile_sample_min_size // s, cfg.tile_sample_stride // s
    grid = tiling.map_tiles(self.decoder, lambda dec, t: stream(dec, t, 1, 1), self.post_quant_conv(z),
                            (tile, tile), (stride, stride))
    blend = cfg.tile_sample_min_size // p - cfg.tile_sample_stride // p
    out_hw = (z.shape[2] * s // p, z.shape[3] * s // p)
    x = tiling.blend_grid(grid, (blend, blend), (cfg.tile_sample_stride // p,) * 2, out_hw)
    return jnp.clip(self._unpatchify(x).astype(jnp.float32), -1.0, 1.0)

  def normalize(self, z: jax.Array) -> jax.Array:
    """Posterior latents -> diffusion latents: (z - mean) / std per channel (cfg.latent_norm())."""
    return self.cfg.latent_norm().apply(z)

  def denormalize(self, z: jax.Array) -> jax.Array:
    return self.cfg.latent_norm().invert(z)
