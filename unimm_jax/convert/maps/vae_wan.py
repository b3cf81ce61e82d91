"""Wan VAE -> unimm_jax.models.vae_wan: diffusers AutoencoderKLWan naming (RULES) and the original
release naming of `Wan2.1_VAE.pth` / `Wan2.2_VAE.pth` (`original_rules`, Wan-Video/Wan2.1
wan/modules/vae.py and Wan-Video/Wan2.2 wan/modules/vae2_2.py).

Original -> ours: residual.{0,2,3,6} = norm1, conv1, norm2, conv2; shortcut = conv_shortcut;
middle.{0,1,2} = resnets_0, attentions_0, resnets_1; head.{0,2} = norm_out, conv_out; top-level
conv1 / conv2 = quant_conv / post_quant_conv; in a down/up block the entry after the resnets is the
resampler (as diffusers' scripts/convert_wan_to_diffusers.py::convert_vae / convert_vae_22 map them).
"""

import jax.numpy as jnp

from unimm_jax.convert import engine
from unimm_jax.convert import transforms as T
from unimm_jax.convert.family import DIFFUSERS_WEIGHTS, Family, Reference, abstract_params
from unimm_jax.models import vae_wan

GAMMA3, GAMMA2 = T.trailing_ones(3), T.trailing_ones(2)   # RMS_norm gammas [c 1 1 1] / attention [c 1 1]


def _conv(src: str, dst: str, t: T.Transform = T.conv3d) -> tuple:
  """weight / bias rules of one convolution: src regex prefix -> dst path prefix."""
  return ((src + r"\.weight", dst + "/kernel", t), (src + r"\.bias", dst + "/bias", T.identity))


def _resnet(src: str, dst: str) -> tuple:
  """diffusers WanResidualBlock at src -> ResidualBlock at dst."""
  return (*_conv(src + r"\.(conv1|conv2|conv_shortcut)", dst + r"/\N"),
          (src + r"\.(norm1|norm2)\.gamma", dst + r"/\N/scale", GAMMA3))


def _number(rules: tuple, n: int) -> tuple:
  """Replaces the placeholder \\N in targets by the back-reference of the rule's last group (n-th)."""
  return tuple((s, d.replace(r"\N", rf"\{n}"), t) for s, d, t in rules)


def _attention(src: str, dst: str) -> tuple:
  return (*_conv(src + r"\.(to_qkv|proj)", dst + r"/\2", T.conv2d),
          (src + r"\.norm\.gamma", dst + "/norm/scale", GAMMA2))


RULES = (
    *_conv(r"(encoder|decoder)\.(conv_in|conv_out)", r"\1/\2"),
    (r"(encoder|decoder)\.norm_out\.gamma", r"\1/norm_out/scale", GAMMA3),
    *_conv(r"(quant_conv|post_quant_conv)", r"\1"),
    *_number(_resnet(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)", r"\1/mid_block/resnets_\2"), 3),
    *_attention(r"(encoder|decoder)\.mid_block\.attentions\.0", r"\1/mid_block/attentions_0"),
    # Wan 2.2 (is_residual): nested blocks.
    *_number(_resnet(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)", r"encoder/down_blocks_\1/resnets_\2"), 3),
    *_conv(r"encoder\.down_blocks\.(\d+)\.downsampler\.resample\.1", r"encoder/down_blocks_\1/downsampler/resample",
           T.conv2d),
    *_conv(r"encoder\.down_blocks\.(\d+)\.downsampler\.time_conv", r"encoder/down_blocks_\1/downsampler/time_conv"),
    *_number(_resnet(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)", r"decoder/up_blocks_\1/resnets_\2"), 3),
    *_conv(r"decoder\.up_blocks\.(\d+)\.upsampler\.resample\.1", r"decoder/up_blocks_\1/upsampler/resample",
           T.conv2d),
    *_conv(r"decoder\.up_blocks\.(\d+)\.upsampler\.time_conv", r"decoder/up_blocks_\1/upsampler/time_conv"),
    # Wan 2.1: the encoder is one flat list of resnets and resamplers; decoder resamplers are upsamplers.0.
    *_number(_resnet(r"encoder\.down_blocks\.(\d+)", r"encoder/down_blocks_\1"), 2),
    *_conv(r"encoder\.down_blocks\.(\d+)\.resample\.1", r"encoder/down_blocks_\1/resample", T.conv2d),
    *_conv(r"encoder\.down_blocks\.(\d+)\.time_conv", r"encoder/down_blocks_\1/time_conv"),
    *_conv(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.resample\.1", r"decoder/up_blocks_\1/upsamplers_0/resample",
           T.conv2d),
    *_conv(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.time_conv", r"decoder/up_blocks_\1/upsamplers_0/time_conv"),
)
# Nothing to ignore: every tensor of a diffusers AutoencoderKLWan state dict has a rule.
IGNORE = ()


def _original_resnet(src: str, dst: str) -> tuple:
  """Original ResidualBlock (nn.Sequential `residual` + `shortcut`) at src -> ResidualBlock at dst."""
  return (*_conv(src + r"\.residual\.2", dst + "/conv1"), *_conv(src + r"\.residual\.6", dst + "/conv2"),
          *_conv(src + r"\.shortcut", dst + "/conv_shortcut"),
          (src + r"\.residual\.0\.gamma", dst + "/norm1/scale", GAMMA3),
          (src + r"\.residual\.3\.gamma", dst + "/norm2/scale", GAMMA3))


def _original_shared() -> tuple:
  """Convs in / out, heads, middle blocks and quant convs: named alike in Wan 2.1 and 2.2."""
  return (
      *_conv(r"(encoder|decoder)\.conv1", r"\1/conv_in"),
      *_conv(r"(encoder|decoder)\.head\.2", r"\1/conv_out"),
      (r"(encoder|decoder)\.head\.0\.gamma", r"\1/norm_out/scale", GAMMA3),
      *_conv(r"conv1", "quant_conv"), *_conv(r"conv2", "post_quant_conv"),
      *_original_resnet(r"(encoder|decoder)\.middle\.0", r"\1/mid_block/resnets_0"),
      *_original_resnet(r"(encoder|decoder)\.middle\.2", r"\1/mid_block/resnets_1"),
      *_attention(r"(encoder|decoder)\.middle\.1", r"\1/mid_block/attentions_0"),
  )


def _original_wan21(num_res_blocks: int, num_blocks: int) -> tuple:
  """Wan 2.1 (wan/modules/vae.py): the encoder's flat list keeps its indices; the decoder's flat list of
  num_res_blocks + 1 resnets and one resampler per block (none after the last) is regrouped, entry
  k * (num_res_blocks + 2) + j, as diffusers' convert_wan_to_diffusers.py::convert_vae does."""
  per = num_res_blocks + 2
  decoder = []
  for k in range(num_blocks):
    for j in range(num_res_blocks + 1):
      decoder += _original_resnet(rf"decoder\.upsamples\.{k * per + j}", f"decoder/up_blocks_{k}/resnets_{j}")
    if k < num_blocks - 1:
      src, dst = rf"decoder\.upsamples\.{k * per + num_res_blocks + 1}", f"decoder/up_blocks_{k}/upsamplers_0"
      decoder += [*_conv(src + r"\.resample\.1", dst + "/resample", T.conv2d), *_conv(src + r"\.time_conv", dst + "/time_conv")]
  return (
      *_original_resnet(r"encoder\.downsamples\.(\d+)", r"encoder/down_blocks_\1"),
      *_conv(r"encoder\.downsamples\.(\d+)\.resample\.1", r"encoder/down_blocks_\1/resample", T.conv2d),
      *_conv(r"encoder\.downsamples\.(\d+)\.time_conv", r"encoder/down_blocks_\1/time_conv"),
      *decoder,
  )


def _original_wan22(num_res_blocks: int) -> tuple:
  """Wan 2.2 (wan/modules/vae2_2.py): nested blocks; the resampler's index in each block is num_res_blocks
  (encoder) / num_res_blocks + 1 (decoder), written literally so the table also exports."""
  enc_rs, dec_rs = num_res_blocks, num_res_blocks + 1
  return (
      *_original_resnet(r"encoder\.downsamples\.(\d+)\.downsamples\.(\d+)", r"encoder/down_blocks_\1/resnets_\2"),
      *_conv(rf"encoder\.downsamples\.(\d+)\.downsamples\.{enc_rs}\.resample\.1",
             r"encoder/down_blocks_\1/downsampler/resample", T.conv2d),
      *_conv(rf"encoder\.downsamples\.(\d+)\.downsamples\.{enc_rs}\.time_conv",
             r"encoder/down_blocks_\1/downsampler/time_conv"),
      *_original_resnet(r"decoder\.upsamples\.(\d+)\.upsamples\.(\d+)", r"decoder/up_blocks_\1/resnets_\2"),
      *_conv(rf"decoder\.upsamples\.(\d+)\.upsamples\.{dec_rs}\.resample\.1",
             r"decoder/up_blocks_\1/upsampler/resample", T.conv2d),
      *_conv(rf"decoder\.upsamples\.(\d+)\.upsamples\.{dec_rs}\.time_conv",
             r"decoder/up_blocks_\1/upsampler/time_conv"),
  )


def original_rules(cfg) -> tuple:
  """Rules for an original release state dict (`Wan2.1_VAE.pth` / `Wan2.2_VAE.pth`) of a WanVAEConfig."""
  if cfg.is_residual:
    return (*_original_shared(), *_original_wan22(cfg.num_res_blocks))
  return (*_original_shared(), *_original_wan21(cfg.num_res_blocks, len(cfg.dim_mult)))


# example: 5 frames, so the streamed (cached) chunk path builds its params too
FAMILY = Family(
    name="vae_wan", hf_model_types=("AutoencoderKLWan",), config_cls=vae_wan.WanVAEConfig,
    config_from_hf=vae_wan.config_from_diffusers, module=vae_wan.WanVAE,
    example_inputs=lambda cfg: (jnp.zeros((1, 5, cfg.spatial_downscale, cfg.spatial_downscale,
                                           cfg.in_channels // cfg.patch ** 2)),),
    rules=lambda cfg: RULES, hf_config=vae_wan.diffusers_config, weights_file=DIFFUSERS_WEIGHTS,
    reference=Reference(flag="wan_vae", help="preset (wan2.1, wan2.2) of an original Wan VAE .pth given as --src",
                        convert="unimm_jax.convert.original:convert_wan_vae_cli"))


def original_part(cfg: vae_wan.WanVAEConfig, required: bool = True) -> engine.Part:
  """The original release's state dict (`Wan2.x_VAE.pth`, or TUNA's `vae.model.*`) as a conversion part."""
  return engine.Part(original_rules(cfg), engine.flatten(abstract_params(FAMILY, cfg)), required=required)
