"""HF CLIP / SigLIP `encoder.layers.{i}` -> a stack of unimm_jax.layers.PreLNBlock (loop layout `layers_{i}`).

The block is shared, so is its key map: the SigLIP and CLIP text maps include it (under their own prefix with
engine.prefixed where the checkpoint nests it).
"""

from unimm_jax.convert import transforms as T

_L = r"encoder\.layers\.(\d+)\."
RULES = (
    (_L + r"(layer_norm[12])\.weight", r"layers_\1/\2/scale", T.identity),
    (_L + r"(layer_norm[12])\.bias", r"layers_\1/\2/bias", T.identity),
    (_L + r"self_attn\.([qkv])_proj\.weight", r"layers_\1/self_attn/\2_proj/kernel", T.to_heads),
    (_L + r"self_attn\.([qkv])_proj\.bias", r"layers_\1/self_attn/\2_proj/bias", T.to_heads),
    (_L + r"self_attn\.out_proj\.weight", r"layers_\1/self_attn/o_proj/kernel", T.from_heads),
    (_L + r"self_attn\.out_proj\.bias", r"layers_\1/self_attn/o_proj/bias", T.identity),
    (_L + r"mlp\.(fc[12])\.weight", r"layers_\1/mlp/\2/kernel", T.transpose),
    (_L + r"mlp\.(fc[12])\.bias", r"layers_\1/mlp/\2/bias", T.identity),
)
