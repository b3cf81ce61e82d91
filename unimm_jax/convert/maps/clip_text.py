"""HF CLIPTextModel / CLIPTextModelWithProjection -> unimm_jax.models.clip_text (loop layout).

The rules read the tower under `text_model.`, as every hub checkpoint (transformers < 5) and
CLIPTextModelWithProjection store it, and export writes it so; transformers >= 5 saves a CLIPTextModel without
the prefix, which LEGACY adds on import (transformers loads either). The projection is `text_projection.weight`.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from unimm_jax.convert import engine
from unimm_jax.convert import transforms as T
from unimm_jax.convert.family import Family
from unimm_jax.convert.maps import pre_ln
from unimm_jax.models import clip_text

RULES = (
    (r"text_model\.embeddings\.token_embedding\.weight", "token_embedding/embedding", T.identity),
    (r"text_model\.embeddings\.position_embedding\.weight", "position_embedding", T.identity),
    *engine.prefixed(pre_ln.RULES, r"text_model\.", ""),
    (r"text_model\.final_layer_norm\.weight", "final_layer_norm/scale", T.identity),
    (r"text_model\.final_layer_norm\.bias", "final_layer_norm/bias", T.identity),
)
RULES_PROJECTION = RULES + ((r"text_projection\.weight", "text_projection/kernel", T.transpose),)
LEGACY = ((r"^(embeddings|encoder|final_layer_norm)\.", r"text_model.\1."),)
# The position_ids buffer, persistent in checkpoints written before transformers 4.31; arange(77) by definition.
IGNORE = (r"text_model\.embeddings\.position_ids",)


def hf_config(cfg: clip_text.CLIPTextConfig) -> dict[str, Any]:
  """CLIPTextConfig -> config.json of a transformers CLIPTextModel (WithProjection)."""
  return {
      "architectures": ["CLIPTextModelWithProjection" if cfg.with_projection else "CLIPTextModel"],
      "model_type": "clip_text_model", "vocab_size": cfg.vocab, "hidden_size": cfg.embed,
      "intermediate_size": cfg.mlp, "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.heads,
      "max_position_embeddings": cfg.max_positions, "layer_norm_eps": cfg.norm_eps, "hidden_act": cfg.act,
      "eos_token_id": cfg.eos_token_id, "projection_dim": cfg.projection_dim, "torch_dtype": cfg.param_dtype,
  }


FAMILY = Family(
    name="clip_text", hf_model_types=clip_text.MODEL_TYPES, config_cls=clip_text.CLIPTextConfig,
    config_from_hf=clip_text.config_from_hf, module=clip_text.CLIPTextModel,
    example_inputs=lambda cfg: (jnp.zeros((1, 1), jnp.int32),),
    rules=lambda cfg: RULES_PROJECTION if cfg.with_projection else RULES, ignore=lambda cfg: IGNORE,
    hf_config=hf_config, legacy_keys=LEGACY)
