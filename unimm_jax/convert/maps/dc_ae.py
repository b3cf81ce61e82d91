"""diffusers AutoencoderDC -> unimm_jax.models.dc_ae.

diffusers' stages are nn.Sequential (`down_blocks.{i}.{j}`); ours are flat submodules `down_blocks_{i}_{j}`.
"""

from __future__ import annotations

import jax.numpy as jnp

from unimm_jax.convert import transforms as T
from unimm_jax.convert.family import DIFFUSERS_WEIGHTS, Family
from unimm_jax.models import dc_ae

RULES = (
    (r"(encoder|decoder)\.(conv_in|conv_out)\.weight", r"\1/\2/kernel", T.conv2d),
    (r"(encoder|decoder)\.(conv_in|conv_out)\.bias", r"\1/\2/bias", T.identity),
    (r"decoder\.norm_out\.weight", "decoder/norm_out/scale", T.identity),
    (r"decoder\.norm_out\.bias", "decoder/norm_out/bias", T.identity),
    # ResBlock, and the down / up samplers' conv
    (r"(encoder)\.down_blocks\.(\d+)\.(\d+)\.(conv1|conv2|conv)\.weight", r"\1/down_blocks_\2_\3/\4/kernel", T.conv2d),
    (r"(decoder)\.up_blocks\.(\d+)\.(\d+)\.(conv1|conv2|conv)\.weight", r"\1/up_blocks_\2_\3/\4/kernel", T.conv2d),
    (r"(encoder)\.down_blocks\.(\d+)\.(\d+)\.(conv1|conv)\.bias", r"\1/down_blocks_\2_\3/\4/bias", T.identity),
    (r"(decoder)\.up_blocks\.(\d+)\.(\d+)\.(conv1|conv)\.bias", r"\1/up_blocks_\2_\3/\4/bias", T.identity),
)
# Block internals are the same on both sides: one table, instantiated for encoder / decoder.
_INNER = (
    (r"norm\.weight", "norm/scale", T.identity),
    (r"norm\.bias", "norm/bias", T.identity),
    (r"attn\.to_([qkv])\.weight", r"attn/to_\4/kernel", T.transpose),
    (r"attn\.to_qkv_multiscale\.(\d+)\.(proj_in|proj_out)\.weight", r"attn/to_qkv_multiscale_\4_\5/kernel", T.conv2d),
    (r"attn\.to_out\.weight", "attn/to_out/kernel", T.transpose),
    (r"attn\.norm_out\.weight", "attn/norm_out/scale", T.identity),
    (r"attn\.norm_out\.bias", "attn/norm_out/bias", T.identity),
    (r"conv_out\.(conv_inverted|conv_point)\.weight", r"conv_out/\4/kernel", T.pointwise),
    (r"conv_out\.(conv_inverted|conv_depth)\.bias", r"conv_out/\4/bias", T.identity),
    (r"conv_out\.conv_depth\.weight", "conv_out/conv_depth/kernel", T.conv2d),
    (r"conv_out\.norm\.weight", "conv_out/norm/scale", T.identity),
    (r"conv_out\.norm\.bias", "conv_out/norm/bias", T.identity),
)
RULES += tuple((rf"({side})\.{kind}_blocks\.(\d+)\.(\d+)\." + src, rf"\1/{kind}_blocks_\2_\3/" + dst, t)
               for side, kind in (("encoder", "down"), ("decoder", "up")) for src, dst, t in _INNER)
# Nothing to ignore: every tensor of a diffusers AutoencoderDC state dict has a rule.
IGNORE = ()

FAMILY = Family(
    name="dc_ae", hf_model_types=("AutoencoderDC",), config_cls=dc_ae.AutoencoderDCConfig,
    config_from_hf=dc_ae.config_from_diffusers, module=dc_ae.AutoencoderDC,
    example_inputs=lambda cfg: (jnp.zeros((1, cfg.spatial_downscale, cfg.spatial_downscale, cfg.in_channels)),),
    rules=lambda cfg: RULES, hf_config=dc_ae.diffusers_config, weights_file=DIFFUSERS_WEIGHTS, reads_text=False)
