"""AIDC-AI/Ovis-U1-3B (remote code, saved by its save_pretrained) -> unimm_jax.models.ovis_u1.

Release names (shared/fixtures/ovis_u1/README.md 3.2): `llm.model.*` is Qwen3 (maps/qwen.py; `llm.lm_head` is
tied and not stored), `visual_tokenizer.backbone.{preprocessor,trunk}.*` the AIMv2 NaViT (our
models/qwen_vit.VisionBlock: fused qkv split in three, fc1/fc3/fc2 = gate/up/down), `visual_tokenizer.head.{0,1}`
the Linear + LayerNorm head, `vte.weight` the visual vocabulary. `post_trunk_norm` is converted although the
tokenizer path skips it, so export writes the checkpoint back whole.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from unimm_jax.convert import transforms as T
from unimm_jax.convert.engine import prefixed
from unimm_jax.convert.family import Family
from unimm_jax.convert.maps import qwen as qwen_map
from unimm_jax.models import ovis_u1
from unimm_jax.models.ovis_u1 import OvisU1Config
from unimm_jax.sampling.vlm import expand_placeholders

_B = r"trunk\.blocks\.(\d+)\."
AIMV2_RULES = (
    (r"preprocessor\.patchifier\.proj\.weight", "patch_embed/kernel", T.conv2d),   # OIHW -> (p p c d)
    (r"preprocessor\.patchifier\.proj\.bias", "patch_embed/bias", T.identity),
    (r"preprocessor\.patchifier\.norm\.weight", "patch_norm/scale", T.identity),
    (r"preprocessor\.pos_embed", "position_embedding", T.drop_batch_axis),
    (_B + r"norm_([12])\.weight", r"layers_\1/norm\2/scale", T.identity),
    *((_B + r"attn\.qkv\.weight", rf"layers_\1/attn/{n}_proj/kernel", T.part(i, 3, T.to_heads))
      for i, n in enumerate("qkv")),
    (_B + r"attn\.proj\.weight", r"layers_\1/attn/o_proj/kernel", T.from_heads),
    (_B + r"mlp\.fc1\.weight", r"layers_\1/mlp/gate_proj/kernel", T.transpose),
    (_B + r"mlp\.fc3\.weight", r"layers_\1/mlp/up_proj/kernel", T.transpose),
    (_B + r"mlp\.fc2\.weight", r"layers_\1/mlp/down_proj/kernel", T.transpose),
    (r"trunk\.post_trunk_norm\.weight", "norm/scale", T.identity),
)
TOKENIZER_RULES = prefixed(AIMV2_RULES, r"backbone\.", "backbone/") + (
    (r"head\.0\.weight", "head/kernel", T.transpose),
    (r"head\.1\.weight", "head_norm/scale", T.identity),
    (r"head\.1\.bias", "head_norm/bias", T.identity),
)
RULES = (prefixed(qwen_map.RULES, r"llm\.", "llm/") + prefixed(TOKENIZER_RULES, r"visual_tokenizer\.", "visual_tokenizer/")
         + ((r"vte\.weight", "vte", T.identity),))
# The image decoder (Yak MMDiT-X + refiner + SDXL VAE) is read by the generation half, not by this map yet.
IGNORE_GENERATOR = (r"visual_generator\..*",)


def ignore(cfg: OvisU1Config) -> tuple[str, ...]:
  llm = tuple(r"llm\." + p for p in (qwen_map.IGNORE_TIED if cfg.llm.tie_embeddings else qwen_map.IGNORE))
  return llm + IGNORE_GENERATOR


def hf_config(cfg: OvisU1Config) -> dict[str, Any]:
  """OvisU1Config -> the release's nested config.json (used when the converted source's is unknown)."""
  v = cfg.vision
  backbone = {"model_type": "aimv2", "architectures": ["AIMv2Model"], "hidden_size": v.embed,
              "num_hidden_layers": v.depth, "num_attention_heads": v.heads, "intermediate_size": v.mlp,
              "patch_size": v.patch, "num_channels": v.channels, "image_size": v.image_size,
              "rms_norm_eps": v.norm_eps, "qkv_bias": v.qkv_bias, "use_bias": v.mlp_bias,
              "preserve_original_pe": True, "interpolate_pe_method": v.posemb_resize, "disable_rope": False,
              "temporal_patch_size": 1, "hidden_stride": v.merge,
              "window_size": v.window_size or 112,
              "fullatt_block_indexes": list(v.fullatt_blocks) if v.window_size else None}
  tokenizer = {"model_type": "aimv2_visual_tokenizer", "vocab_size": cfg.visual_vocab,
               "tokenize_function": "softmax", "tau": 1.0, "hidden_stride": v.merge, "backbone_config": backbone}
  return {"architectures": ["OvisU1"], "model_type": ovis_u1.MODEL_TYPE,
          "auto_map": {"AutoConfig": "configuration_ovis_u1.OvisU1Config",
                       "AutoModelForCausalLM": "modeling_ovis_u1.OvisU1"},
          "llm_config": qwen_map.hf_config(cfg.llm), "visual_tokenizer_config": tokenizer,
          "hidden_size": cfg.llm.embed, "conversation_formatter_class": "Qwen3ConversationFormatter",
          "multimodal_max_length": 4496, "torch_dtype": cfg.param_dtype}


def example_inputs(cfg: OvisU1Config) -> tuple:
  """One image of one merge group behind its placeholder: builds every parameter."""
  m = cfg.merge_tokens
  grid = (1, cfg.vision.merge, cfg.vision.merge)
  vision, counts = ovis_u1.prepare_vision(np.zeros((m, cfg.vision.channels * cfg.vision.patch ** 2)), [grid], cfg)
  ids = expand_placeholders(ovis_u1.IMAGE_PLACEHOLDER, ovis_u1.IMAGE_ATOM_ID, counts, "example_inputs")
  return jnp.asarray([ids], jnp.int32), vision


FAMILY = Family(
    name="ovis_u1", hf_model_types=(ovis_u1.MODEL_TYPE,), config_cls=OvisU1Config,
    config_from_hf=ovis_u1.config_from_hf, module=ovis_u1.OvisU1, example_inputs=example_inputs,
    rules=lambda cfg: RULES, ignore=ignore, hf_config=hf_config)
