"""diffusers SanaTransformer2DModel -> unimm_jax.models.sana (loop layout `layers_{i}`)."""

from __future__ import annotations

import jax.numpy as jnp

from unimm_jax.convert import transforms as T
from unimm_jax.convert.family import DIFFUSERS_WEIGHTS, Family
from unimm_jax.models import sana

_B = r"transformer_blocks\.(\d+)\."


def _timestep_mlp(src: str, dst: str) -> tuple:
  """TimestepEmbedding linear_1 / linear_2 -> TimestepEmbedder mlp_0 / mlp_2."""
  return tuple((rf"{src}\.linear_{i + 1}\.{w}", f"{dst}/mlp_{2 * i}/{k}", t)
               for i in range(2) for w, k, t in (("weight", "kernel", T.transpose), ("bias", "bias", T.identity)))


_COMMON = (
    (r"patch_embed\.proj\.weight", "patch_embed/kernel", T.conv2d),
    (r"patch_embed\.proj\.bias", "patch_embed/bias", T.identity),
    (r"time_embed\.linear\.weight", "time_embed/modulation/linear/kernel", T.transpose),
    (r"time_embed\.linear\.bias", "time_embed/modulation/linear/bias", T.identity),
    (r"caption_projection\.linear_([12])\.weight", r"caption_projection_\1/kernel", T.transpose),
    (r"caption_projection\.linear_([12])\.bias", r"caption_projection_\1/bias", T.identity),
    (r"caption_norm\.weight", "caption_norm/scale", T.identity),
    (_B + r"scale_shift_table", r"layers_\1/scale_shift_table", T.identity),
    (_B + r"(attn[12])\.to_([qkv])\.weight", r"layers_\1/\2/\3_proj/kernel", T.to_heads),
    (_B + r"(attn[12])\.to_([qkv])\.bias", r"layers_\1/\2/\3_proj/bias", T.to_heads),
    (_B + r"(attn[12])\.to_out\.0\.weight", r"layers_\1/\2/o_proj/kernel", T.from_heads),
    (_B + r"(attn[12])\.to_out\.0\.bias", r"layers_\1/\2/o_proj/bias", T.identity),
    (_B + r"(attn[12])\.norm_([qk])\.weight", r"layers_\1/\2/\3_norm/scale", T.identity),
    (_B + r"norm2\.weight", r"layers_\1/norm2/scale", T.identity),
    (_B + r"norm2\.bias", r"layers_\1/norm2/bias", T.identity),
    (_B + r"ff\.(conv_inverted|conv_point)\.weight", r"layers_\1/ff/\2/kernel", T.pointwise),
    (_B + r"ff\.conv_inverted\.bias", r"layers_\1/ff/conv_inverted/bias", T.identity),
    (_B + r"ff\.conv_depth\.weight", r"layers_\1/ff/conv_depth/kernel", T.conv2d),
    (_B + r"ff\.conv_depth\.bias", r"layers_\1/ff/conv_depth/bias", T.identity),
    (r"scale_shift_table", "scale_shift_table", T.identity),
    (r"proj_out\.weight", "proj_out/kernel", T.transpose),
    (r"proj_out\.bias", "proj_out/bias", T.identity),
)
# AdaLayerNormSingle nests the timestep MLP under `emb.`; the guidance-embedding variant (SANA-Sprint) does not.
RULES = _COMMON + _timestep_mlp(r"time_embed\.emb\.timestep_embedder", "time_embed/timestep_embedder")
RULES_GUIDANCE = (_COMMON + _timestep_mlp(r"time_embed\.timestep_embedder", "time_embed/timestep_embedder")
                  + _timestep_mlp(r"time_embed\.guidance_embedder", "time_embed/guidance_embedder"))
# Nothing to ignore: the sincos position table is a non-persistent buffer, never in the state dict.
IGNORE = ()


def example_inputs(cfg: sana.SanaConfig) -> tuple:
  p = cfg.patch_size
  guidance = (jnp.zeros((1,)),) if cfg.guidance_embeds else ()
  return (jnp.zeros((1, p, p, cfg.in_channels)), jnp.zeros((1, 1, cfg.caption_channels)), jnp.zeros((1,)),
          None, *guidance)


FAMILY = Family(
    name="sana", hf_model_types=("SanaTransformer2DModel",), config_cls=sana.SanaConfig,
    config_from_hf=sana.config_from_diffusers, module=sana.SanaTransformer, example_inputs=example_inputs,
    rules=lambda cfg: RULES_GUIDANCE if cfg.guidance_embeds else RULES, hf_config=sana.diffusers_config,
    weights_file=DIFFUSERS_WEIGHTS, reads_text=False)
