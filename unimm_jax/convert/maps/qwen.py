"""HF Qwen2 / Qwen2.5 / Qwen3 / Qwen2.5-VL text -> unimm_jax.models.qwen (loop layout)."""

from unimm_jax.convert import transforms as T

_L = r"model\.layers\.(\d+)\."
RULES = (
    (r"model\.embed_tokens\.weight", "embed_tokens/embedding", T.identity),
    (_L + r"self_attn\.([qkv])_proj\.weight", r"layers_\1/self_attn/\2_proj/kernel", T.to_heads),
    (_L + r"self_attn\.([qkv])_proj\.bias", r"layers_\1/self_attn/\2_proj/bias", T.to_heads),
    (_L + r"self_attn\.o_proj\.weight", r"layers_\1/self_attn/o_proj/kernel", T.from_heads),
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


def hf_prefix_for(model_type_in_file: str) -> dict[str, str]:
  """Key prefixes to strip so other layouts of the same decoder read through RULES.

  Qwen2.5-VL checkpoints store the decoder as `model.language_model.*` (transformers >= 4.52) or
  `model.*` (older); both become `model.*`.
  """
  if model_type_in_file == "qwen2_5_vl":
    return {"model.language_model.": "model."}
  return {}
