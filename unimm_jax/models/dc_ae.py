"""DC-AE: the deep-compression autoencoder of SANA (Chen et al. 2024, arXiv:2410.10733), f32 c32.

Reference: diffusers models/autoencoders/autoencoder_dc.py (AutoencoderDC, Encoder, Decoder, ResBlock,
EfficientViTBlock, DCDownBlock2d, DCUpBlock2d), models/attention_processor.py (SanaMultiscaleLinearAttention,
SanaMultiscaleAttnProcessor2_0).
Shapes: b batch, H W pixels, h w feature map, c channels, z latent channels, g attention groups, e head_dim.
Images are NHWC in [-1, 1]; latents are deterministic (models/codec.py `Deterministic`).

Every resolution change has a parameter-free "space-to-channel" shortcut beside its conv: down, the 2x2
pixel-unshuffled input averaged over channel groups; up, the input's channels repeated then pixel-shuffled;
the encoder's output and the decoder's input have the same kind of shortcut to and from the latent channels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange, reduce, repeat

from unimm_jax.layers import Conv, DenseGeneral, GLUMBConv, RMSNorm, activation, relu_linear_attention
from unimm_jax.models import tiling
from unimm_jax.models.codec import Deterministic, LatentNorm
from unimm_jax.models.config import DictConfig

ACT = ("act_batch", "act_height", "act_width", "act_channels")
BLOCK_TYPES = ("ResBlock", "EfficientViTBlock")
DOWNSAMPLE_TYPES = ("pixel_unshuffle", "conv", "Conv")     # anything but pixel_unshuffle is a stride-2 conv
UPSAMPLE_TYPES = ("pixel_shuffle", "interpolate")
NORM_EPS = 1e-5                                             # diffusers get_normalization("rms_norm")


def _per_level(value: Any, n: int, name: str) -> tuple:
  """A diffusers option given once ("silu") or per level (["silu", ...]) -> a tuple of n (nested lists -> tuples)."""
  if isinstance(value, str):
    return (value,) * n
  out = tuple(tuple(v) if isinstance(v, (list, tuple)) else v for v in value)
  if len(out) != n:
    raise ValueError(f"AutoencoderDCConfig.{name} has {len(out)} entries for {n} levels")
  return out


@dataclasses.dataclass(frozen=True)
class AutoencoderDCConfig(DictConfig):
  """Fields and defaults of diffusers' AutoencoderDC config (rms_norm blocks only), plus the tiling sizes."""

  in_channels: int = 3
  latent_channels: int = 32
  attention_head_dim: int = 32
  encoder_block_types: tuple[str, ...] | str = "ResBlock"
  decoder_block_types: tuple[str, ...] | str = "ResBlock"
  encoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
  decoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
  encoder_layers_per_block: tuple[int, ...] = (2, 2, 2, 3, 3, 3)
  decoder_layers_per_block: tuple[int, ...] = (3, 3, 3, 3, 3, 3)
  encoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,))
  decoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,))
  upsample_block_type: str = "pixel_shuffle"
  downsample_block_type: str = "pixel_unshuffle"
  decoder_norm_types: tuple[str, ...] | str = "rms_norm"
  decoder_act_fns: tuple[str, ...] | str = "silu"
  encoder_out_shortcut: bool = True
  decoder_in_shortcut: bool = True
  decoder_conv_act_fn: str = "relu"
  scaling_factor: float = 1.0
  # diffusers' tiling defaults (AutoencoderDC.__init__, not in config.json): 512 px tiles every 448 px
  tile_sample_size: int = 512
  tile_sample_stride: int = 448
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    n = len(self.encoder_block_out_channels)
    for name in ("encoder_block_types", "decoder_block_types", "encoder_layers_per_block", "decoder_layers_per_block",
                 "encoder_qkv_multiscales", "decoder_qkv_multiscales", "decoder_norm_types", "decoder_act_fns",
                 "encoder_block_out_channels", "decoder_block_out_channels"):
      object.__setattr__(self, name, _per_level(getattr(self, name), n, name))   # normalised, still frozen
    for name, allowed in (("encoder_block_types", BLOCK_TYPES), ("decoder_block_types", BLOCK_TYPES),
                          ("decoder_norm_types", ("rms_norm",))):
      bad = sorted(set(getattr(self, name)) - set(allowed))
      if bad:
        raise NotImplementedError(f"AutoencoderDC: {name} {bad} not supported (supported: {allowed})")
    for name, value, allowed in (("downsample_block_type", self.downsample_block_type, DOWNSAMPLE_TYPES),
                                 ("upsample_block_type", self.upsample_block_type, UPSAMPLE_TYPES)):
      if value not in allowed:
        raise NotImplementedError(f"AutoencoderDC: {name} {value!r} not supported (supported: {allowed})")
    for act in (*self.decoder_act_fns, self.decoder_conv_act_fn):
      activation(act)                         # raises naming an unknown activation
    if min(self.encoder_layers_per_block[0], self.decoder_layers_per_block[0]) == 0:
      raise NotImplementedError("AutoencoderDC: a first level without blocks (the f32c32-in / mix layouts: conv_in "
                                "as a DCDownBlock2d) is not supported; the SANA autoencoders have blocks there")
    if self.tile_sample_size % self.spatial_downscale or self.tile_sample_stride % self.spatial_downscale:
      raise ValueError(f"AutoencoderDCConfig: tiles ({self.tile_sample_size}, stride {self.tile_sample_stride}) "
                       f"must be multiples of the {self.spatial_downscale}x downscale")

  @property
  def spatial_downscale(self) -> int:
    return 2 ** (len(self.encoder_block_out_channels) - 1)

  temporal_downscale = 1   # an image codec (models/codec.py)

  def latent_norm(self) -> LatentNorm:
    """As SanaPipeline: diffusion latent = z * scaling_factor."""
    return LatentNorm(0.0, 1.0, self.scaling_factor)

  # Released sizes. Numbers: diffusers scripts/convert_dcae_to_diffusers.py (get_ae_config "dc-ae-f32c32-sana-1.0")
  # and the transformer-pipeline vae/config.json pinned downstream (EfficientViTBlock names, decoder
  # rms_norm / silu, relu before conv_out, scaling_factor 0.41407). 1.1 is the same network with a fine-tuned
  # decoder (mit-han-lab/efficientvit applications/dc_ae README); NVlabs/Sana's AEConfig pairs it with 0.41407.
  @classmethod
  def sana_1_0(cls, **kw) -> "AutoencoderDCConfig":
    """mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers."""
    vit = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
    return cls(**{**dict(encoder_block_types=vit, decoder_block_types=vit, downsample_block_type="Conv",
                         upsample_block_type="interpolate", scaling_factor=0.41407), **kw})

  @classmethod
  def sana_1_1(cls, **kw) -> "AutoencoderDCConfig":
    """mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers (OpenUni, SANA 1.5)."""
    return cls.sana_1_0(**kw)

  @classmethod
  def tiny(cls, **kw) -> "AutoencoderDCConfig":
    """3 levels (4x), ResBlock then EfficientViT blocks, head_dim 8, 32-px tiles every 24 px."""
    vit = ("ResBlock", "EfficientViTBlock", "EfficientViTBlock")
    return cls(**{**dict(latent_channels=4, attention_head_dim=8, encoder_block_types=vit, decoder_block_types=vit,
                         encoder_block_out_channels=(8, 16, 32), decoder_block_out_channels=(8, 16, 32),
                         encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 2),
                         encoder_qkv_multiscales=((), (5,), (5,)), decoder_qkv_multiscales=((), (5,), (5,)),
                         downsample_block_type="Conv", upsample_block_type="interpolate", scaling_factor=0.41407,
                         tile_sample_size=32, tile_sample_stride=24), **kw})


def config_from_diffusers(d: Mapping[str, Any]) -> AutoencoderDCConfig:
  """diffusers vae/config.json (dict) -> AutoencoderDCConfig."""
  skip = {"dtype", "param_dtype", "tile_sample_size", "tile_sample_stride"}
  fields = {f.name for f in dataclasses.fields(AutoencoderDCConfig)} - skip
  unknown = sorted(k for k in d if not k.startswith("_") and k not in fields)
  if unknown:
    raise NotImplementedError(f"AutoencoderDC: config fields {unknown} are not supported")
  return AutoencoderDCConfig(**{k: d[k] for k in fields if k in d})


def diffusers_config(cfg: AutoencoderDCConfig) -> dict[str, Any]:
  skip = ("dtype", "param_dtype", "tile_sample_size", "tile_sample_stride")
  return {"_class_name": "AutoencoderDC", **{k: v for k, v in cfg.to_dict().items() if k not in skip}}


def _kw(cfg: AutoencoderDCConfig) -> dict[str, Any]:
  return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


def pixel_unshuffle(x: jax.Array) -> jax.Array:
  """torch F.pixel_unshuffle(x, 2) in NHWC: [b 2h 2w c] -> [b h w (c 2 2)]."""
  return rearrange(x, "b (h i) (w j) c -> b h w (c i j)", i=2, j=2)


def pixel_shuffle(x: jax.Array) -> jax.Array:
  """torch F.pixel_shuffle(x, 2) in NHWC: [b h w (c 2 2)] -> [b 2h 2w c]."""
  return rearrange(x, "b h w (c i j) -> b (h i) (w j) c", i=2, j=2)


def channel_mean(x: jax.Array, out: int) -> jax.Array:
  """[b h w (o g)] -> [b h w o]: the mean over each group of consecutive channels (torch unflatten + mean)."""
  return reduce(x, "b h w (o g) -> b h w o", "mean", o=out)


def channel_repeat(x: jax.Array, out: int) -> jax.Array:
  """[b h w c] -> [b h w (c r)]: every channel repeated r = out / c times in place (torch repeat_interleave)."""
  return repeat(x, "b h w c -> b h w (c r)", r=out // x.shape[-1])


class ResBlock(nn.Module):
  """x + norm(conv2(act(conv1(x)))), 3x3 convs (the second without bias), RMSNorm with bias over channels."""

  act: str
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c = x.shape[-1]
    h = activation(self.act)(Conv(c, (3, 3), name="conv1", **kw)(x))
    h = Conv(c, (3, 3), use_bias=False, name="conv2", **kw)(h)
    h = RMSNorm(c, NORM_EPS, use_bias=True, name="norm", **kw)(h)
    return nn.with_logical_constraint(h + x.astype(h.dtype), ACT)


class MultiscaleLinearAttention(nn.Module):
  """EfficientViT's lightweight multi-scale linear attention (LiteMLA), with its residual: [b h w c] -> same.

  q, k, v = to_q/to_k/to_v(x) concatenated ([b h w 3i], i = heads * e, heads = c / e); each multi-scale branch
  aggregates them with a depthwise k x k conv then a grouped 1x1 conv (3 * heads groups). The 3i channels of
  every branch are read as groups of 3e consecutive channels, each group one head's (q, k, v) -- the fused qkv
  conv's layout, so group 0 takes its "q, k, v" from to_q's first three heads. ReLU linear attention per group;
  to_out over all branches, RMSNorm with bias, + x.
  """

  head_dim: int
  kernel_sizes: tuple[int, ...]
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, h, w, c = x.shape
    e = self.head_dim
    heads = c // e
    inner = heads * e
    qkv = jnp.concatenate([DenseGeneral((c,), (inner,), ("embed", "mlp"), name=f"to_{n}", **kw)(x) for n in "qkv"],
                          axis=-1)
    branches = [qkv]
    for i, k in enumerate(self.kernel_sizes):
      y = Conv(3 * inner, (k, k), use_bias=False, groups=3 * inner, name=f"to_qkv_multiscale_{i}_proj_in", **kw)(qkv)
      branches.append(Conv(3 * inner, (1, 1), use_bias=False, groups=3 * heads,
                           name=f"to_qkv_multiscale_{i}_proj_out", **kw)(y))
    groups = rearrange(jnp.concatenate(branches, axis=-1), "b h w (g s e) -> b (h w) g s e", s=3, e=e)
    out = relu_linear_attention(groups[..., 0, :], groups[..., 1, :], groups[..., 2, :])
    out = rearrange(out, "b (h w) g e -> b h w (g e)", h=h)
    out = DenseGeneral((out.shape[-1],), (c,), ("mlp", "embed"), name="to_out", **kw)(out)
    out = RMSNorm(c, NORM_EPS, use_bias=True, name="norm_out", **kw)(out)
    return nn.with_logical_constraint(out + x.astype(out.dtype), ACT)


class EfficientViTBlock(nn.Module):
  """Multi-scale linear attention, then a Mix-FFN (expand 4, RMSNorm, residual) named conv_out."""

  head_dim: int
  kernel_sizes: tuple[int, ...]
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = MultiscaleLinearAttention(self.head_dim, self.kernel_sizes, name="attn", **kw)(x)
    c = x.shape[-1]
    return nn.with_logical_constraint(
        GLUMBConv(c, 4 * c, norm_eps=NORM_EPS, residual=True, name="conv_out", **kw)(x), ACT)


def _block(kind: str, act: str, head_dim: int, scales: tuple[int, ...], name: str, kw: dict) -> nn.Module:
  if kind == "ResBlock":
    return ResBlock(act, name=name, **kw)
  return EfficientViTBlock(head_dim, scales, name=name, **kw)


class DownBlock(nn.Module):
  """2x down: a stride-2 3x3 conv (or a 3x3 conv then pixel-unshuffle) + the unshuffled input's group means."""

  features: int
  pixel_unshuffle: bool
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.pixel_unshuffle:
      y = pixel_unshuffle(Conv(self.features // 4, (3, 3), name="conv", **kw)(x))
    else:
      y = Conv(self.features, (3, 3), (2, 2), ((1, 1), (1, 1)), name="conv", **kw)(x)
    return y + channel_mean(pixel_unshuffle(x), self.features).astype(y.dtype)


class UpBlock(nn.Module):
  """2x up: nearest upsampling then a 3x3 conv (or a 3x3 conv then pixel-shuffle) + the repeated, shuffled input."""

  features: int
  interpolate: bool
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.interpolate:
      y = Conv(self.features, (3, 3), upsample=True, name="conv", **kw)(x)
    else:
      y = pixel_shuffle(Conv(self.features * 4, (3, 3), name="conv", **kw)(x))
    return y + pixel_shuffle(channel_repeat(x, 4 * self.features)).astype(y.dtype)


class Encoder(nn.Module):
  """[b H W 3] -> [b H/f W/f z]."""

  cfg: AutoencoderDCConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg, kw = self.cfg, _kw(self.cfg)
    chans, n = cfg.encoder_block_out_channels, len(cfg.encoder_block_out_channels)
    x = Conv(chans[0], (3, 3), name="conv_in", **kw)(x)
    for i, (c, layers) in enumerate(zip(chans, cfg.encoder_layers_per_block)):
      for j in range(layers):   # the encoder's blocks are always rms_norm / silu
        x = _block(cfg.encoder_block_types[i], "silu", cfg.attention_head_dim, cfg.encoder_qkv_multiscales[i],
                   f"down_blocks_{i}_{j}", kw)(x)
      if i < n - 1 and layers > 0:
        x = DownBlock(chans[i + 1], cfg.downsample_block_type == "pixel_unshuffle", name=f"down_blocks_{i}_{layers}",
                      **kw)(x)
    y = Conv(cfg.latent_channels, (3, 3), name="conv_out", **kw)(x)
    if cfg.encoder_out_shortcut:
      y = y + channel_mean(x, cfg.latent_channels).astype(y.dtype)
    return y


class Decoder(nn.Module):
  """[b h w z] -> [b h*f w*f 3]."""

  cfg: AutoencoderDCConfig

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    cfg, kw = self.cfg, _kw(self.cfg)
    chans, n = cfg.decoder_block_out_channels, len(cfg.decoder_block_out_channels)
    x = Conv(chans[-1], (3, 3), name="conv_in", **kw)(z)
    if cfg.decoder_in_shortcut:
      x = x + channel_repeat(z, chans[-1]).astype(x.dtype)
    for i in reversed(range(n)):
      layers, first = cfg.decoder_layers_per_block[i], 0
      if i < n - 1 and layers > 0:
        x = UpBlock(chans[i], cfg.upsample_block_type == "interpolate", name=f"up_blocks_{i}_0", **kw)(x)
        first = 1
      for j in range(layers):
        x = _block(cfg.decoder_block_types[i], cfg.decoder_act_fns[i], cfg.attention_head_dim,
                   cfg.decoder_qkv_multiscales[i], f"up_blocks_{i}_{first + j}", kw)(x)
    x = RMSNorm(chans[0], NORM_EPS, use_bias=True, name="norm_out", **kw)(x)
    return Conv(cfg.in_channels, (3, 3), name="conv_out", **kw)(activation(cfg.decoder_conv_act_fn)(x))


class AutoencoderDC(nn.Module):
  """encode: image -> Deterministic latents; decode: latents -> image; tiled_* for large images (diffusers tiling)."""

  cfg: AutoencoderDCConfig

  def setup(self):
    self.encoder = Encoder(self.cfg)
    self.decoder = Decoder(self.cfg)

  def _check(self, x: jax.Array, what: str) -> None:
    cfg = self.cfg
    channels, f = (cfg.in_channels, cfg.spatial_downscale) if what == "image" else (cfg.latent_channels, 1)
    if x.ndim != 4 or x.shape[-1] != channels or x.shape[1] % f or x.shape[2] % f:
      raise ValueError(f"AutoencoderDC: {what} {x.shape} must be [b h w {channels}] with h, w multiples of {f}")

  def encode(self, x: jax.Array) -> Deterministic:
    """[b H W 3] in [-1, 1] -> latents [b H/f W/f z] (not yet multiplied by the scaling factor)."""
    self._check(x, "image")
    return Deterministic(self.encoder(nn.with_logical_constraint(x, ACT)).astype(jnp.float32))

  def decode(self, z: jax.Array) -> jax.Array:
    """[b h w z] -> [b h*f w*f 3] (not clamped, as diffusers)."""
    self._check(z, "latent")
    return self.decoder(nn.with_logical_constraint(z, ACT)).astype(jnp.float32)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.decode(self.encode(x).mode())

  def tiled_encode(self, x: jax.Array) -> Deterministic:
    """encode() over cfg.tile_sample_size-px tiles every cfg.tile_sample_stride px (diffusers `tiled_encode`)."""
    cfg = self.cfg
    self._check(x, "image")
    f, tile, stride = cfg.spatial_downscale, cfg.tile_sample_size, cfg.tile_sample_stride
    grid = tiling.map_tiles(self.encoder, lambda enc, t: enc(t), x, (tile, tile), (stride, stride))
    blend = (tile - stride) // f
    out_hw = (x.shape[1] // f, x.shape[2] // f)
    return Deterministic(tiling.blend_grid(grid, (blend, blend), (stride // f,) * 2, out_hw).astype(jnp.float32))

  def tiled_decode(self, z: jax.Array) -> jax.Array:
    """decode() over latent tiles of cfg.tile_sample_size / f every cfg.tile_sample_stride / f (diffusers
    `tiled_decode`): neighbours cross-fade over tile - stride pixels."""
    cfg = self.cfg
    self._check(z, "latent")
    f, tile, stride = cfg.spatial_downscale, cfg.tile_sample_size, cfg.tile_sample_stride
    grid = tiling.map_tiles(self.decoder, lambda dec, t: dec(t), z, (tile // f,) * 2, (stride // f,) * 2)
    blend = tile - stride
    out_hw = (z.shape[1] * f, z.shape[2] * f)
    return tiling.blend_grid(grid, (blend, blend), (stride, stride), out_hw).astype(jnp.float32)

  def normalize(self, z: jax.Array) -> jax.Array:
    """Encoder latents -> the diffusion model's latents (cfg.latent_norm())."""
    return self.cfg.latent_norm().apply(z)

  def denormalize(self, z: jax.Array) -> jax.Array:
    """Inverse of normalize."""
    return self.cfg.latent_norm().invert(z)
