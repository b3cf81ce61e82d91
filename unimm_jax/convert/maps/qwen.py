"""HF Qwen2 / Qwen2.5 / Qwen3 -> unimm_jax.models.qwen (loop layout); also the text decoder of a Qwen2.5-VL
checkpoint, when asked for by name (`unimm_jax.load(dir, family="qwen")`; the whole model is maps/qwen_vl.py)."""

from typing import Any

import jax.numpy as jnp

from unimm_jax.convert import transforms as T
from unimm_jax.convert.errors import ConversionError
from unimm_jax.convert.family import Family
from unimm_jax.models import qwen

_L = r"model\.layers\.(\d+)\."
RULES = (
    (r"model\.embed_tokens\.weight", "embed_tokens/embedding", T.identity),
    (_L + r"self_attn\.([qkv])_proj\.weight", r"layers_\1/self_attn/\2_proj/kernel", T.to_heads),
    (_L + r"self_attn\.([qkv])_proj\.bias", r"layers_\1/self_attn/\2_proj/bias", T.to_heads),
    (_L + r"self_attn\.o_proj\.weight", r"layers_\1/self_attn/o_proj/kernel", T.from_heads),
    (_L + r"self_attn\.o_proj\.bias", r"layers_\1/self_attn/o_proj/bias", T.identity),  # Qwen3 attention_bias
    (_L + r"self_attn\.([qk])_norm\.weight", r"layers_\1/self_attn/\2_norm/scale", T.identity),
    (_L + r"mlp\.(gate|up|down)_proj\.weight", r"layers_\1/mlp/\2_proj/kernel", T.transpose),
    (_L + r"(input_layernorm|post_attention_layernorm)\.weight", r"layers_\1/\2/scale", T.identity),
    (r"model\.norm\.weight", "norm/scale", T.identity),
    (r"lm_head\.weight", "lm_head/kernel", T.transpose),
)
# Non-persistent RoPE buffers that old .bin checkpoints still carry.
IGNORE = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"model\.rotary_emb\.inv_freq")
# With tied embeddings HF state dicts repeat the table as lm_head.weight; the model has no lm_head.
IGNORE_TIED = IGNORE + (r"lm_head\.weight",)
# The vision tower of a Qwen2.5-VL checkpoint read for its text decoder only (5.x and legacy names).
IGNORE_VISION = (r"model\.visual\..*", r"visual\..*")


def ignore(cfg: qwen.QwenConfig) -> tuple[str, ...]:
  return ((IGNORE_TIED if cfg.tie_embeddings else IGNORE)
          + (IGNORE_VISION if cfg.model_type == "qwen2_5_vl_text" else ()))


def hf_prefix_for(model_type_in_file: str) -> dict[str, str]:
  """Key prefixes to strip so other layouts of the same decoder read through RULES.

  Qwen2.5-VL checkpoints store the decoder as `model.language_model.*` (transformers >= 4.52) or
  `model.*` (older); both become `model.*`.
  """
  if model_type_in_file == "qwen2_5_vl":
    return {"model.language_model.": "model."}
  return {}


def hf_config(cfg: qwen.QwenConfig) -> dict[str, Any]:
  """QwenConfig -> config.json of Qwen2ForCausalLM / Qwen3ForCausalLM."""
  if cfg.model_type == "qwen2_5_vl_text":
    raise ConversionError("a Qwen2.5-VL text decoder alone has no Hugging Face form; export the whole model "
                          "(convert the directory with family qwen_vl, the default)")
  arch = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[cfg.model_type]
  return {
      "architectures": [arch], "model_type": cfg.model_type, "vocab_size": cfg.vocab, "hidden_size": cfg.embed,
      "intermediate_size": cfg.mlp, "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.heads,
      "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "hidden_act": cfg.act,
      "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_embeddings,
      "attention_bias": cfg.qkv_bias, "max_position_embeddings": 32768, "torch_dtype": cfg.param_dtype,
  }


FAMILY = Family(
    name="qwen", hf_model_types=("qwen2", "qwen3", "qwen2_5_vl_text"), part_of=("qwen2_5_vl",),
    config_cls=qwen.QwenConfig, config_from_hf=qwen.config_from_hf, module=qwen.Qwen,
    example_inputs=lambda cfg: (jnp.zeros((1, 1), jnp.int32),), rules=lambda cfg: RULES, ignore=ignore,
    key_prefixes=hf_prefix_for, hf_config=hf_config)
