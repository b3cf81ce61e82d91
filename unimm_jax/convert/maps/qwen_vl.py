"""HF Qwen2.5-VL -> unimm_jax.models.qwen_vl (loop layout), and its vision tower alone -> models.qwen_vit.

The rules read the names checkpoints are saved with: `visual.*` (the tower), `model.*` (the text decoder, the
Qwen map of maps/qwen.py) and `lm_head.weight` -- what the Hub releases hold and what transformers 5.x
save_pretrained still writes. transformers 5.x names the same tensors `model.visual.*` /
`model.language_model.*` in memory (its state_dict, and checkpoints saved from it by other tools); those are
renamed on import (`Family.legacy_keys`), so export writes the saved-file names. The fused `attn.qkv`
projection [3d, d] is split into q/k/v by three `part` rules.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from unimm_jax import checkpoint
from unimm_jax.convert import transforms as T
from unimm_jax.convert.engine import prefixed
from unimm_jax.convert.family import Family
from unimm_jax.convert.maps import qwen as qwen_map
from unimm_jax.models import qwen_vit, qwen_vl

_B = r"blocks\.(\d+)\."
VISION_RULES = (
    (r"patch_embed\.proj\.weight", "patch_embed/kernel", T.conv3d),   # OIDHW -> (tp p p c d)
    (_B + r"(norm[12])\.weight", r"blocks_\1/\2/scale", T.identity),
    *((_B + r"attn\.qkv\.weight", rf"blocks_\1/attn/{n}_proj/kernel", T.part(i, 3, T.to_heads))
      for i, n in enumerate("qkv")),
    *((_B + r"attn\.qkv\.bias", rf"blocks_\1/attn/{n}_proj/bias", T.part(i, 3, T.to_heads))
      for i, n in enumerate("qkv")),
    (_B + r"attn\.proj\.weight", r"blocks_\1/attn/o_proj/kernel", T.from_heads),
    (_B + r"attn\.proj\.bias", r"blocks_\1/attn/o_proj/bias", T.identity),
    (_B + r"mlp\.(gate|up|down)_proj\.weight", r"blocks_\1/mlp/\2_proj/kernel", T.transpose),
    (_B + r"mlp\.(gate|up|down)_proj\.bias", r"blocks_\1/mlp/\2_proj/bias", T.identity),
    (r"merger\.ln_q\.weight", "merger/ln_q/scale", T.identity),
    (r"merger\.mlp\.([02])\.weight", r"merger/mlp_\1/kernel", T.transpose),
    (r"merger\.mlp\.([02])\.bias", r"merger/mlp_\1/bias", T.identity),
)
RULES = prefixed(VISION_RULES, r"visual\.", "visual/") + prefixed(qwen_map.RULES, "", "language_model/")
# transformers 5.x in-memory names -> the saved names above (import only)
LEGACY_KEYS = ((r"^model\.visual\.", "visual."), (r"^model\.language_model\.", "model."))


def ignore(cfg: qwen_vl.QwenVLConfig) -> tuple[str, ...]:
  return qwen_map.IGNORE_TIED if cfg.text.tie_embeddings else qwen_map.IGNORE


def vision_hf_config(cfg: qwen_vit.QwenVisionConfig) -> dict[str, Any]:
  return {"model_type": "qwen2_5_vl_vision", "depth": cfg.depth, "hidden_size": cfg.embed,
          "intermediate_size": cfg.mlp, "num_heads": cfg.heads, "out_hidden_size": cfg.out_embed,
          "patch_size": cfg.patch, "temporal_patch_size": cfg.temporal_patch, "spatial_merge_size": cfg.merge,
          "window_size": cfg.window_size, "fullatt_block_indexes": list(cfg.fullatt_blocks),
          "in_channels": cfg.channels, "hidden_act": cfg.act,
          "rope_parameters": {"rope_type": "axial", "rope_theta": cfg.rope_theta}}


def hf_config(cfg: qwen_vl.QwenVLConfig) -> dict[str, Any]:
  """QwenVLConfig -> config.json of Qwen2_5_VLForConditionalGeneration (used when the source's is unknown)."""
  t = cfg.text
  text = {"model_type": "qwen2_5_vl_text", "vocab_size": t.vocab, "hidden_size": t.embed,
          "intermediate_size": t.mlp, "num_hidden_layers": t.depth, "num_attention_heads": t.heads,
          "num_key_value_heads": t.kv_heads, "hidden_act": t.act, "rms_norm_eps": t.norm_eps,
          "tie_word_embeddings": t.tie_embeddings, "max_position_embeddings": 128000,
          "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta,
                              "mrope_section": list(t.mrope_sections)}}
  return {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
          "text_config": text, "vision_config": {**vision_hf_config(cfg.vision),
                                                 "tokens_per_second": cfg.tokens_per_second},
          "image_token_id": cfg.image_token_id, "video_token_id": cfg.video_token_id,
          "vision_start_token_id": cfg.vision_start_token_id, "vision_end_token_id": cfg.vision_end_token_id,
          "tie_word_embeddings": t.tie_embeddings, "torch_dtype": cfg.param_dtype}


def example_vision_inputs(cfg: qwen_vit.QwenVisionConfig) -> tuple:
  """One merge group of one frame: builds every parameter."""
  n = cfg.merge ** 2
  return (jnp.zeros((1, n, cfg.patch_dim), jnp.float32), jnp.zeros((1, n, 2), jnp.int32),
          jnp.ones((1, n), jnp.int32), jnp.ones((1, n), jnp.int32))


def example_inputs(cfg: qwen_vl.QwenVLConfig) -> tuple:
  """One image of one merge group behind its placeholder tokens."""
  vision = qwen_vl.VisionInputs(*example_vision_inputs(cfg.vision), jnp.zeros((1,), jnp.int32),
                                jnp.zeros((0,), jnp.int32))
  return jnp.full((1, 1), cfg.image_token_id, jnp.int32), vision


def stack_layers(params: dict, cfg: qwen_vl.QwenVLConfig) -> dict:
  """Loop -> scan layout of both towers (visual/blocks_i, language_model/layers_i)."""
  return {**params, "visual": checkpoint.stack_layers(params["visual"], cfg.vision.depth, "blocks"),
          "language_model": checkpoint.stack_layers(params["language_model"], cfg.text.depth)}


FAMILY = Family(
    name="qwen_vl", hf_model_types=("qwen2_5_vl",), config_cls=qwen_vl.QwenVLConfig,
    config_from_hf=qwen_vl.config_from_hf, module=qwen_vl.QwenVL,
    example_inputs=example_inputs, rules=lambda cfg: RULES, ignore=ignore, legacy_keys=LEGACY_KEYS, hf_config=hf_config,
    pipeline="unimm_jax.sampling.qwen_vl:load", stack_layers=stack_layers)


# The tower alone (Qwen2_5_VisionTransformerPretrainedModel.save_pretrained; Ming-Lite-Uni's qwen2_5_vit/).
FAMILY_VIT = Family(
    name="qwen_vit", hf_model_types=("qwen2_5_vl_vision",), config_cls=qwen_vit.QwenVisionConfig,
    config_from_hf=qwen_vit.config_from_hf, module=qwen_vit.QwenVisionTransformer, example_inputs=example_vision_inputs,
    rules=lambda cfg: VISION_RULES, hf_config=vision_hf_config, reads_text=False,
    stack_layers=lambda params, cfg: checkpoint.stack_layers(params, cfg.depth, "blocks"))
