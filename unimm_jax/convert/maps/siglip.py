"""HF SigLIP / SigLIP2 vision towers -> unimm_jax.models.siglip (loop layout).

Keys are read without the `vision_model.` prefix (hub checkpoints of SiglipVisionModel and every
full SiglipModel / Siglip2Model have it; transformers >= 5 saves vision models without it).
The MAP head's torch nn.MultiheadAttention stores q, k, v fused in in_proj_weight [3d, d] /
in_proj_bias [3d]; three `part` rules split it.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from unimm_jax.convert import transforms as T
from unimm_jax.convert.family import Family
from unimm_jax.convert.maps import pre_ln
from unimm_jax.models import siglip
from unimm_jax.models.siglip import SiglipVisionConfig

_QKV = ("q", "k", "v")
_COMMON = (
    (r"embeddings\.patch_embedding\.bias", "patch_embedding/bias", T.identity),
    (r"embeddings\.position_embedding\.weight", "position_embedding", T.identity),
    *pre_ln.RULES,
    (r"post_layernorm\.weight", "post_layernorm/scale", T.identity),
    (r"post_layernorm\.bias", "post_layernorm/bias", T.identity),
    (r"head\.probe", "head/probe", T.identity),
    *((r"head\.attention\.in_proj_weight", f"head/attention/{n}_proj/kernel", T.part(i, 3, T.to_heads))
      for i, n in enumerate(_QKV)),
    *((r"head\.attention\.in_proj_bias", f"head/attention/{n}_proj/bias", T.part(i, 3, T.to_heads))
      for i, n in enumerate(_QKV)),
    (r"head\.attention\.out_proj\.weight", "head/attention/o_proj/kernel", T.from_heads),
    (r"head\.attention\.out_proj\.bias", "head/attention/o_proj/bias", T.identity),
    (r"head\.layernorm\.weight", "head/layernorm/scale", T.identity),
    (r"head\.layernorm\.bias", "head/layernorm/bias", T.identity),
    (r"head\.mlp\.(fc[12])\.weight", r"head/mlp/\1/kernel", T.transpose),
    (r"head\.mlp\.(fc[12])\.bias", r"head/mlp/\1/bias", T.identity),
)
# SigLIP: Conv2d(c, d, p, stride=p) weight [d c p p]; SigLIP2: Linear(p*p*c, d) weight [d p*p*c].
RULES_SIGLIP = ((r"embeddings\.patch_embedding\.weight", "patch_embedding/kernel", T.conv2d), *_COMMON)
RULES_SIGLIP2 = ((r"embeddings\.patch_embedding\.weight", "patch_embedding/kernel", T.patch_linear), *_COMMON)

# Full image-text checkpoints: the text tower and the contrastive logit scale/bias are not ours.
IGNORE_TEXT = (r"text_model\..*", r"logit_scale", r"logit_bias")


def ignore(cfg: SiglipVisionConfig) -> tuple[str, ...]:
  """IGNORE for a config: the text tower, plus what a truncated tower does not build.

  feature_layer drops layers num_layers..depth-1; post_layernorm=False / use_head=False drop those.
  """
  dropped = tuple(rf"encoder\.layers\.{i}\..*" for i in range(cfg.num_layers, cfg.depth))
  if not cfg.post_layernorm:
    dropped += (r"post_layernorm\..*",)
  if not cfg.use_head:
    dropped += (r"head\..*",)
  return IGNORE_TEXT + dropped


def hf_prefix_for(model_type_in_file: str) -> dict[str, str]:
  """Strips `vision_model.` (present in full models and pre-v5 vision checkpoints)."""
  del model_type_in_file  # every SigLIP layout names the vision tower the same way
  return {"vision_model.": ""}


def _family(version: int) -> Family:
  """SigLIP (conv stem, bicubic table resize) or SigLIP2 (linear stem, NaFlex): one module, two maps."""
  name = "siglip" if version == 1 else "siglip2"

  def hf_config(cfg: SiglipVisionConfig) -> dict[str, Any]:
    d = {"hidden_size": cfg.embed, "intermediate_size": cfg.mlp, "num_hidden_layers": cfg.depth,
         "num_attention_heads": cfg.heads, "num_channels": cfg.channels, "patch_size": cfg.patch,
         "hidden_act": cfg.act, "layer_norm_eps": cfg.norm_eps, "vision_use_head": cfg.use_head,
         "torch_dtype": cfg.param_dtype}
    if version == 2:
      return {"architectures": ["Siglip2VisionModel"], "model_type": "siglip2_vision_model",
              "num_patches": cfg.posemb_grid ** 2, **d}
    return {"architectures": ["SiglipVisionModel"], "model_type": "siglip_vision_model",
            "image_size": cfg.posemb_grid * cfg.patch, **d}

  rules = RULES_SIGLIP if version == 1 else RULES_SIGLIP2
  return Family(
      name=name, hf_model_types=(f"{name}_vision_model", name), config_cls=SiglipVisionConfig,
      config_from_hf=siglip.config_from_hf, module=siglip.VisionTransformer,
      example_inputs=lambda cfg: (jnp.zeros((1, cfg.patch, cfg.patch, cfg.channels), jnp.float32),),  # 1 patch
      rules=lambda cfg: rules, ignore=ignore, key_prefixes=hf_prefix_for, hf_config=hf_config, reads_text=False)


FAMILY_SIGLIP, FAMILY_SIGLIP2 = _family(1), _family(2)
