"""diffusers AutoencoderKL -> unimm_jax.models.vae_kl."""

import jax.numpy as jnp

from unimm_jax.convert import transforms as T
from unimm_jax.convert.family import DIFFUSERS_WEIGHTS, Family
from unimm_jax.models import vae_kl

RULES = (
    # Convolutions: OIHW -> HWIO; biases as they are.
    (r"(encoder|decoder)\.(conv_in|conv_out)\.weight", r"\1/\2/kernel", T.conv2d),
    (r"(encoder|decoder)\.(conv_in|conv_out)\.bias", r"\1/\2/bias", T.identity),
    (r"(quant_conv|post_quant_conv)\.weight", r"\1/kernel", T.conv2d),
    (r"(quant_conv|post_quant_conv)\.bias", r"\1/bias", T.identity),
    (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(conv1|conv2|conv_shortcut)\.weight",
     r"encoder/down_blocks_\1/resnets_\2/\3/kernel", T.conv2d),
    (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(conv1|conv2|conv_shortcut)\.bias",
     r"encoder/down_blocks_\1/resnets_\2/\3/bias", T.identity),
    (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(conv1|conv2|conv_shortcut)\.weight",
     r"decoder/up_blocks_\1/resnets_\2/\3/kernel", T.conv2d),
    (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(conv1|conv2|conv_shortcut)\.bias",
     r"decoder/up_blocks_\1/resnets_\2/\3/bias", T.identity),
    (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(conv1|conv2)\.weight",
     r"\1/mid_block/resnets_\2/\3/kernel", T.conv2d),
    (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(conv1|conv2)\.bias",
     r"\1/mid_block/resnets_\2/\3/bias", T.identity),
    (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.weight",
     r"encoder/down_blocks_\1/downsamplers_0/conv/kernel", T.conv2d),
    (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.bias",
     r"encoder/down_blocks_\1/downsamplers_0/conv/bias", T.identity),
    (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.weight", r"decoder/up_blocks_\1/upsamplers_0/conv/kernel",
     T.conv2d),
    (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.bias", r"decoder/up_blocks_\1/upsamplers_0/conv/bias",
     T.identity),
    # GroupNorms: weight -> scale.
    (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(norm1|norm2)\.weight",
     r"encoder/down_blocks_\1/resnets_\2/\3/scale", T.identity),
    (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(norm1|norm2)\.bias",
     r"encoder/down_blocks_\1/resnets_\2/\3/bias", T.identity),
    (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(norm1|norm2)\.weight",
     r"decoder/up_blocks_\1/resnets_\2/\3/scale", T.identity),
    (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(norm1|norm2)\.bias",
     r"decoder/up_blocks_\1/resnets_\2/\3/bias", T.identity),
    (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(norm1|norm2)\.weight",
     r"\1/mid_block/resnets_\2/\3/scale", T.identity),
    (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(norm1|norm2)\.bias",
     r"\1/mid_block/resnets_\2/\3/bias", T.identity),
    (r"(encoder|decoder)\.conv_norm_out\.weight", r"\1/conv_norm_out/scale", T.identity),
    (r"(encoder|decoder)\.conv_norm_out\.bias", r"\1/conv_norm_out/bias", T.identity),
    # Mid-block attention: group_norm, Linear q/k/v/out -> one-head DenseGeneral kernels.
    (r"(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.weight",
     r"\1/mid_block/attentions_0/group_norm/scale", T.identity),
    (r"(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.bias",
     r"\1/mid_block/attentions_0/group_norm/bias", T.identity),
    (r"(encoder|decoder)\.mid_block\.attentions\.0\.to_([qkv])\.weight",
     r"\1/mid_block/attentions_0/attn/\2_proj/kernel", T.to_heads),
    (r"(encoder|decoder)\.mid_block\.attentions\.0\.to_([qkv])\.bias",
     r"\1/mid_block/attentions_0/attn/\2_proj/bias", T.to_heads),
    (r"(encoder|decoder)\.mid_block\.attentions\.0\.to_out\.0\.weight",
     r"\1/mid_block/attentions_0/attn/o_proj/kernel", T.from_heads),
    (r"(encoder|decoder)\.mid_block\.attentions\.0\.to_out\.0\.bias",
     r"\1/mid_block/attentions_0/attn/o_proj/bias", T.identity),
)
# Checkpoints saved before diffusers 0.14 name the mid-block attention query/key/value/proj_attn; diffusers
# renames them on load (`_convert_deprecated_attention_blocks`), and so do we.
LEGACY = (
    (r"(mid_block\.attentions\.0)\.query\.", r"\1.to_q."),
    (r"(mid_block\.attentions\.0)\.key\.", r"\1.to_k."),
    (r"(mid_block\.attentions\.0)\.value\.", r"\1.to_v."),
    (r"(mid_block\.attentions\.0)\.proj_attn\.", r"\1.to_out.0."),
)
# Nothing to ignore: every tensor of a diffusers AutoencoderKL state dict has a rule.
IGNORE = ()

# diffusers models name their class (`_class_name`) instead of a model_type
FAMILY = Family(
    name="vae_kl", hf_model_types=("AutoencoderKL",), config_cls=vae_kl.AutoencoderKLConfig,
    config_from_hf=vae_kl.config_from_diffusers, module=vae_kl.AutoencoderKL,
    example_inputs=lambda cfg: (jnp.zeros((1, cfg.spatial_downscale, cfg.spatial_downscale, cfg.in_channels)),),
    rules=lambda cfg: RULES, hf_config=vae_kl.diffusers_config, weights_file=DIFFUSERS_WEIGHTS, legacy_keys=LEGACY)
