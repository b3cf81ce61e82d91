"""HF T5EncoderModel / T5ForConditionalGeneration -> unimm_jax.models.t5 (the encoder, loop layout).

Only block 0 holds `relative_attention_bias` (shared by every layer): a table in any other block (umT5) matches
no rule and is reported. The feed-forward is wi_0 (gated by the activation), wi_1, wo in v1.1 (gated) and wi, wo
in v1.0.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from unimm_jax.convert import transforms as T
from unimm_jax.convert.errors import ConversionError
from unimm_jax.convert.family import Family
from unimm_jax.models import t5

_B = r"encoder\.block\.(\d+)\."
_COMMON = (
    (r"shared\.weight", "shared/embedding", T.identity),
    (r"encoder\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\.weight", "relative_attention_bias",
     T.identity),
    (_B + r"layer\.0\.SelfAttention\.([qkv])\.weight", r"layers_\1/self_attn/\2_proj/kernel", T.to_heads),
    (_B + r"layer\.0\.SelfAttention\.o\.weight", r"layers_\1/self_attn/o_proj/kernel", T.from_heads),
    (_B + r"layer\.0\.layer_norm\.weight", r"layers_\1/attn_layer_norm/scale", T.identity),
    (_B + r"layer\.1\.layer_norm\.weight", r"layers_\1/ff_layer_norm/scale", T.identity),
    (r"encoder\.final_layer_norm\.weight", "final_layer_norm/scale", T.identity),
)
RULES_GATED = _COMMON + (  # v1.1: wo(act(wi_0 x) * wi_1 x)
    (_B + r"layer\.1\.DenseReluDense\.wi_0\.weight", r"layers_\1/mlp/gate_proj/kernel", T.transpose),
    (_B + r"layer\.1\.DenseReluDense\.wi_1\.weight", r"layers_\1/mlp/up_proj/kernel", T.transpose),
    (_B + r"layer\.1\.DenseReluDense\.wo\.weight", r"layers_\1/mlp/down_proj/kernel", T.transpose),
)
RULES_PLAIN = _COMMON + (  # v1.0: wo(act(wi x))
    (_B + r"layer\.1\.DenseReluDense\.wi\.weight", r"layers_\1/mlp/fc1/kernel", T.transpose),
    (_B + r"layer\.1\.DenseReluDense\.wo\.weight", r"layers_\1/mlp/fc2/kernel", T.transpose),
)
IGNORE = (
    r"encoder\.embed_tokens\.weight",   # the encoder's embedding is `shared` itself (T5Stack is given that module)
    r"decoder\..*",                     # T5ForConditionalGeneration / T5Model: the decoder is not ours
    r"lm_head\.weight",                 # ... nor its output head
)


def hf_config(cfg: t5.T5Config) -> dict[str, Any]:
  """T5Config -> config.json of a transformers T5EncoderModel."""
  if cfg.gated and cfg.act == "gelu":
    raise ConversionError("T5Config(gated=True, act='gelu') has no transformers form: its 'gated-gelu' means "
                          "gelu_new (the tanh approximation)")
  proj = "gated-gelu" if cfg.gated and cfg.act == "gelu_new" else ("gated-" if cfg.gated else "") + cfg.act
  return {
      "architectures": ["T5EncoderModel"], "model_type": "t5", "vocab_size": cfg.vocab, "d_model": cfg.embed,
      "d_kv": cfg.head_dim, "d_ff": cfg.mlp, "num_layers": cfg.depth, "num_heads": cfg.heads,
      "relative_attention_num_buckets": cfg.num_buckets, "relative_attention_max_distance": cfg.max_distance,
      "layer_norm_epsilon": cfg.norm_eps, "feed_forward_proj": proj, "is_encoder_decoder": False,
      "torch_dtype": cfg.param_dtype,
  }


FAMILY = Family(
    name="t5", hf_model_types=t5.MODEL_TYPES, config_cls=t5.T5Config, config_from_hf=t5.config_from_hf,
    module=t5.T5EncoderModel, example_inputs=lambda cfg: (jnp.zeros((1, 1), jnp.int32),),
    rules=lambda cfg: RULES_GATED if cfg.gated else RULES_PLAIN, ignore=lambda cfg: IGNORE, hf_config=hf_config)
