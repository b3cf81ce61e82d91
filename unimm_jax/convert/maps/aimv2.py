"""HF AIMv2 vision tower (Aimv2VisionModel, or the vision half of Aimv2Model) -> unimm_jax.models.aimv2.

Keys are read without the `vision_model.` prefix of full image-text checkpoints; their text tower and
projections are not ours. Blocks are models/qwen_vit.VisionBlock (norm1 / attn / norm2 / mlp).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from unimm_jax.convert import transforms as T
from unimm_jax.convert.family import Family
from unimm_jax.models import aimv2
from unimm_jax.models.aimv2 import Aimv2VisionConfig

_L = r"encoder\.layers\.(\d+)\."
RULES = (
    (r"embeddings\.patch_embed\.weight", "patch_embed/kernel", T.conv2d),   # OIHW -> (p p c d)
    (r"embeddings\.patch_embed\.bias", "patch_embed/bias", T.identity),
    (r"embeddings\.rms_norm\.weight", "patch_norm/scale", T.identity),
    (r"embeddings\.position_embedding\.weight", "position_embedding", T.identity),
    (_L + r"attention\.([qkv])_proj\.weight", r"layers_\1/attn/\2_proj/kernel", T.to_heads),
    (_L + r"attention\.([qkv])_proj\.bias", r"layers_\1/attn/\2_proj/bias", T.to_heads),
    (_L + r"attention\.out_proj\.weight", r"layers_\1/attn/o_proj/kernel", T.from_heads),
    (_L + r"attention\.out_proj\.bias", r"layers_\1/attn/o_proj/bias", T.identity),
    (_L + r"ffn\.(gate|up|down)_proj\.weight", r"layers_\1/mlp/\2_proj/kernel", T.transpose),
    (_L + r"ffn\.(gate|up|down)_proj\.bias", r"layers_\1/mlp/\2_proj/bias", T.identity),
    (_L + r"rms_norm([12])\.weight", r"layers_\1/norm\2/scale", T.identity),
    (r"rms_norm\.weight", "norm/scale", T.identity),
    (r"head\.cls_token", "head/cls_token", T.identity),
    (r"head\.([kv])_proj\.weight", r"head/\1_proj/kernel", T.to_heads),
    (r"head\.([kv])_proj\.bias", r"head/\1_proj/bias", T.to_heads),
    (r"head\.output_proj\.weight", "head/output_proj/kernel", T.from_heads),
    (r"head\.output_proj\.bias", "head/output_proj/bias", T.identity),
)
# Full Aimv2Model checkpoints: the text tower, the projections and the contrastive temperature are not ours.
IGNORE_TEXT = (r"text_model\..*", r"visual_projection\..*", r"text_projection\..*", r"logit_scale")


def ignore(cfg: Aimv2VisionConfig) -> tuple[str, ...]:
  return IGNORE_TEXT + (() if cfg.use_head else (r"head\..*",))


def hf_config(cfg: Aimv2VisionConfig) -> dict[str, Any]:
  if cfg.posemb_resize != "none" or cfg.rope or cfg.window_size:
    raise ValueError("Aimv2VisionConfig with NaViT options (rope, windows, posemb_resize) has no "
                     "Aimv2VisionModel config.json")
  return {"architectures": ["Aimv2VisionModel"], "model_type": "aimv2_vision_model", "hidden_size": cfg.embed,
          "intermediate_size": cfg.mlp, "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.heads,
          "num_channels": cfg.channels, "image_size": cfg.image_size, "patch_size": cfg.patch,
          "hidden_act": cfg.act, "rms_norm_eps": cfg.norm_eps, "qkv_bias": cfg.qkv_bias, "mlp_bias": cfg.mlp_bias,
          "use_head": cfg.use_head, "is_native": cfg.posemb == "sincos", "torch_dtype": cfg.param_dtype}


FAMILY = Family(
    name="aimv2", hf_model_types=aimv2.MODEL_TYPES,
    config_cls=Aimv2VisionConfig, config_from_hf=aimv2.config_from_hf, module=aimv2.Aimv2VisionModel,
    example_inputs=lambda cfg: (jnp.zeros((1, cfg.grid * cfg.patch, cfg.grid * cfg.patch, cfg.channels)),),
    rules=lambda cfg: RULES, ignore=ignore,
    key_prefixes=lambda model_type: {"vision_model.": ""} if model_type == "aimv2" else {},
    hf_config=hf_config, reads_text=False)
