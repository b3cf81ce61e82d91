"""AIDC-AI/Ovis-U1-3B (remote code, saved by its save_pretrained) -> unimm_jax.models.ovis_u1.

Release names (shared/fixtures/ovis_u1/README.md 3.2): `llm.model.*` is Qwen3 (maps/qwen.py; `llm.lm_head` is
tied and not stored), `visual_tokenizer.backbone.{preprocessor,trunk}.*` the AIMv2 NaViT (our
models/qwen_vit.VisionBlock: fused qkv split in three, fc1/fc3/fc2 = gate/up/down), `visual_tokenizer.head.{0,1}`
the Linear + LayerNorm head, `vte.weight` the visual vocabulary, `visual_generator.backbone.*` the Yak decoder
(models/yak.py on the FLUX blocks: fused qkv split in three, single blocks' linear1 = [q; k; v; mlp] split
unevenly) and `visual_generator.vae.*` diffusers' AutoencoderKL (maps/vae_kl.py). `post_trunk_norm` is
converted although the tokenizer path skips it, so export writes the checkpoint back whole.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from unimm_jax.convert import transforms as T
from unimm_jax.convert.engine import prefixed
from unimm_jax.convert.family import Family
from unimm_jax.convert.maps import qwen as qwen_map
from unimm_jax.convert.maps import vae_kl as vae_map
from unimm_jax.models import ovis_u1, vae_kl
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
_DB = r"double_blocks\.(\d+)\."
_SB = r"single_blocks\.(\d+)\."
_RB = r"txt_in\.individual_token_refiner\.blocks\.(\d+)\."


def _linear(src: str, dst: str) -> tuple:
  return ((src + r"\.weight", dst + "/kernel", T.transpose), (src + r"\.bias", dst + "/bias", T.identity))


def _qkv(src: str, dst: str, q_name: str = "{}_proj") -> tuple:
  """A fused [3 h e, d] qkv Linear -> q/k/v [d h e] (+ biases [h e])."""
  return tuple(rule for i, n in enumerate("qkv") for rule in (
      (src + r"\.weight", f"{dst}/{q_name.format(n)}/kernel", T.part(i, 3, T.to_heads)),
      (src + r"\.bias", f"{dst}/{q_name.format(n)}/bias", T.part(i, 3, T.to_heads))))


def _proj(src: str, dst: str) -> tuple:
  return ((src + r"\.weight", dst + "/kernel", T.from_heads), (src + r"\.bias", dst + "/bias", T.identity))


# Yak (modeling_yak.py names) -> models/yak.py on the FLUX blocks (models/flux.py names)
YAK_RULES = (
    *_linear(r"img_in", "img_in"),
    *_linear(r"time_in\.in_layer", "time_in/mlp_0"), *_linear(r"time_in\.out_layer", "time_in/mlp_2"),
    *_linear(r"vector_in\.in_layer", "vector_in/fc1"), *_linear(r"vector_in\.out_layer", "vector_in/fc2"),
    *_linear(r"txt_in\.c_embedder\.linear_1", "txt_in/c_embedder/fc1"),
    *_linear(r"txt_in\.c_embedder\.linear_2", "txt_in/c_embedder/fc2"),
    *_linear(r"txt_in\.input_embedder", "txt_in/input_embedder"),
    (r"txt_in\.cls_token", "txt_in/cls_token", T.identity),
    *((_RB + rf"norm([12])\.{w}", rf"txt_in/blocks_\1/norm\2/{t}", T.identity)
      for w, t in (("weight", "scale"), ("bias", "bias"))),
    *_qkv(_RB + r"self_attn_qkv", r"txt_in/blocks_\1/attn"),
    *_proj(_RB + r"self_attn_proj", r"txt_in/blocks_\1/attn/o_proj"),
    *_linear(_RB + r"mlp\.(fc[12])", r"txt_in/blocks_\1/mlp/\2"),
    *_linear(_RB + r"adaLN_modulation\.1", r"txt_in/blocks_\1/modulation/linear"),
    # double blocks: img_mod (9 chunks) / txt_mod -> norm1 / norm1_context; joint attention streams img / txt
    *_linear(_DB + r"img_mod\.lin", r"double_blocks_\1/norm1/linear"),
    *_linear(_DB + r"txt_mod\.lin", r"double_blocks_\1/norm1_context/linear"),
    *(rule for s in ("img", "txt") for rule in (
        *_qkv(_DB + rf"{s}_attn\.qkv", r"double_blocks_\1/attn", s + "_{}_proj"),
        (_DB + rf"{s}_attn\.norm\.query_norm\.scale", rf"double_blocks_\1/attn/{s}_q_norm/scale", T.identity),
        (_DB + rf"{s}_attn\.norm\.key_norm\.scale", rf"double_blocks_\1/attn/{s}_k_norm/scale", T.identity),
        *_proj(_DB + rf"{s}_attn\.proj", rf"double_blocks_\1/attn/{s}_o_proj"))),
    *_qkv(_DB + r"img_self_attn\.qkv", r"double_blocks_\1/img_self_attn"),
    (_DB + r"img_self_attn\.norm\.query_norm\.scale", r"double_blocks_\1/img_self_attn/q_norm/scale", T.identity),
    (_DB + r"img_self_attn\.norm\.key_norm\.scale", r"double_blocks_\1/img_self_attn/k_norm/scale", T.identity),
    *_proj(_DB + r"img_self_attn\.proj", r"double_blocks_\1/img_self_attn/o_proj"),
    *_linear(_DB + r"img_mlp\.0", r"double_blocks_\1/ff/fc1"), *_linear(_DB + r"img_mlp\.2", r"double_blocks_\1/ff/fc2"),
    *_linear(_DB + r"txt_mlp\.0", r"double_blocks_\1/ff_context/fc1"),
    *_linear(_DB + r"txt_mlp\.2", r"double_blocks_\1/ff_context/fc2"),
    # single blocks: linear1 = [q; k; v; mlp] fused, split into the diffusers-style q/k/v and proj_mlp
    *((_SB + r"linear1\.weight", rf"single_blocks_\1/attn/{n}_proj/kernel", T.uneven_part(i, 4, T.to_heads))
      for i, n in enumerate("qkv")),
    *((_SB + r"linear1\.bias", rf"single_blocks_\1/attn/{n}_proj/bias", T.uneven_part(i, 4, T.to_heads, False))
      for i, n in enumerate("qkv")),
    (_SB + r"linear1\.weight", r"single_blocks_\1/proj_mlp/kernel", T.uneven_part(3, 4, T.transpose)),
    (_SB + r"linear1\.bias", r"single_blocks_\1/proj_mlp/bias", T.uneven_part(3, 4, kernel=False)),
    (_SB + r"norm\.query_norm\.scale", r"single_blocks_\1/attn/q_norm/scale", T.identity),
    (_SB + r"norm\.key_norm\.scale", r"single_blocks_\1/attn/k_norm/scale", T.identity),
    *_linear(_SB + r"linear2", r"single_blocks_\1/proj_out"),
    *_linear(_SB + r"modulation\.lin", r"single_blocks_\1/norm/linear"),
    *_linear(r"final_layer\.adaLN_modulation\.1", "final_modulation/linear"),
    *_linear(r"final_layer\.linear", "final_linear"),
)
RULES = (prefixed(qwen_map.RULES, r"llm\.", "llm/") + prefixed(TOKENIZER_RULES, r"visual_tokenizer\.", "visual_tokenizer/")
         + ((r"vte\.weight", "vte", T.identity),)
         + prefixed(YAK_RULES, r"visual_generator\.backbone\.", "visual_generator/")
         + prefixed(vae_map.RULES, r"visual_generator\.vae\.", "vae/"))


def ignore(cfg: OvisU1Config) -> tuple[str, ...]:
  llm = tuple(r"llm\." + p for p in (qwen_map.IGNORE_TIED if cfg.llm.tie_embeddings else qwen_map.IGNORE))
  return llm


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
          "visual_generator_config": _generator_config(cfg),
          "hidden_size": cfg.llm.embed, "conversation_formatter_class": "Qwen3ConversationFormatter",
          "multimodal_max_length": 4496, "torch_dtype": cfg.param_dtype}


def _generator_config(cfg: OvisU1Config) -> dict[str, Any]:
  g = cfg.generator
  return {"model_type": "yak", "architectures": ["YakModel"], "in_channels": g.in_channels,
          "out_channels": g.out_channels, "hidden_size": g.hidden, "num_heads": g.heads, "depth": g.depth,
          "depth_single_blocks": g.single_depth, "mlp_ratio": g.mlp_ratio, "context_in_dim": g.context_dim,
          "vec_in_dim": g.vec_in_dim, "axes_dim": list(g.axes_dims), "theta": g.rope_theta, "qkv_bias": True,
          "guidance_embed": False, "txt_type": "refiner", "timestep_shift": g.timestep_shift,
          "base_shift": g.base_shift, "max_shift": g.max_shift, "vae_config": vae_kl.diffusers_config(cfg.vae)}


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
    rules=lambda cfg: RULES, ignore=ignore, hf_config=hf_config, pipeline="unimm_jax.sampling.ovis_u1:load")
