"""Ming-Lite-Uni release directory -> unimm_jax.models.ming (loop layout); its DiT and VAE are their own families.

The release has no top-level config.json: each part is a directory read through its own key map, joined here under
the directory's name as a key prefix (`convert/ming.py` builds that source):
  qwen2_5_vit.*  the Qwen2.5 ViT (maps/qwen_vl.VISION_RULES) -> visual/
  qwen2_5_llm.*  the M-RoPE Qwen2 LLM (maps/qwen.RULES)       -> llm/
  connector.*    a stock Qwen2ForCausalLM (maps/qwen.RULES)   -> connector/ (its embeddings and lm_head, never
                 read, are ignored)
  mlp.*          mlp/model.safetensors: linear_proj.{0,2}, proj_in, proj_out, query_tokens_dict.<s>x<s>, and the
                 SANA-side MLP mlp.{fc1,layer_norm1,fc2,layer_norm2}
transformer/ (SANA, maps/sana.py) and vae/ (DC-AE, maps/dc_ae.py) are converted as they are, beside it.
"""

import jax.numpy as jnp

from unimm_jax.convert import transforms as T
from unimm_jax.convert.engine import prefixed
from unimm_jax.convert.family import Family, Reference
from unimm_jax.convert.maps import qwen as qwen_map
from unimm_jax.convert.maps import qwen_vl as qwen_vl_map
from unimm_jax.models import ming, qwen_vl

PARTS = ("qwen2_5_vit", "qwen2_5_llm", "connector", "mlp")
MLP_RULES = (
    (r"linear_proj\.([02])\.weight", r"linear_proj_\1/kernel", T.transpose),
    (r"linear_proj\.([02])\.bias", r"linear_proj_\1/bias", T.identity),
    (r"(proj_in|proj_out)\.weight", r"\1/kernel", T.transpose),
    (r"(proj_in|proj_out)\.bias", r"\1/bias", T.identity),
    (r"query_tokens_dict\.(\d+x\d+)", r"query_tokens_\1", T.identity),
    (r"mlp\.(fc[12])\.weight", r"mlp/\1/kernel", T.transpose),
    (r"mlp\.(fc[12])\.bias", r"mlp/\1/bias", T.identity),
    (r"mlp\.(layer_norm[12])\.weight", r"mlp/\1/scale", T.identity),
    (r"mlp\.(layer_norm[12])\.bias", r"mlp/\1/bias", T.identity),
)
RULES = (prefixed(qwen_vl_map.VISION_RULES, r"qwen2_5_vit\.", "visual/")
         + prefixed(qwen_map.RULES, r"qwen2_5_llm\.", "llm/")
         + prefixed(qwen_map.RULES, r"connector\.", "connector/")
         + prefixed(MLP_RULES, r"mlp\.", ""))
# The connector runs on proj_in's output: its token embeddings and lm_head are never read.
IGNORE = (tuple(rf"(qwen2_5_llm|connector)\.{p}" for p in qwen_map.IGNORE)
          + (r"connector\.model\.embed_tokens\.weight", r"connector\.lm_head\.weight"))


def example_inputs(cfg: ming.MingConfig) -> tuple:
  """One image of one merge group, then the query blocks: builds every parameter."""
  vision = qwen_vl.VisionInputs(*qwen_vl_map.example_vision_inputs(cfg.vision), jnp.zeros((1,), jnp.int32),
                                jnp.zeros((0,), jnp.int32))
  ids = jnp.asarray([[cfg.image_token_id, *ming.query_block(cfg)]], jnp.int32)
  return ids, jnp.zeros((*ids.shape, 3), jnp.int32), jnp.zeros((1, cfg.queries), jnp.int32), vision


FAMILY = Family(
    name="ming", config_cls=ming.MingConfig, module=ming.Ming, example_inputs=example_inputs,
    rules=lambda cfg: RULES, ignore=lambda cfg: IGNORE, pipeline="unimm_jax.sampling.ming:load",
    reference=Reference(
        flag="ming", help="released Ming-Lite-Uni directory (qwen2_5_vit/ qwen2_5_llm/ connector/ mlp/ transformer/ "
        "vae/ scheduler/); with --dst", convert="unimm_jax.convert.ming:convert_cli"))
