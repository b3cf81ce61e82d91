"""InternVL3 checkpoints -> unimm_jax.models.internvl, in both namings of the released weights.

transformers (`OpenGVLab/InternVL3-1B-hf`, model_type internvl): `model.vision_tower.*` (q/k/v split),
`model.multi_modal_projector.*`, `model.language_model.*`, `lm_head.weight`.
The original remote-code release (`OpenGVLab/InternVL3-1B`, model_type internvl_chat): `vision_model.*` (one fused
`attn.qkv` [3d, d], q then k then v, split by three `part` rules), `mlp1.{0,1,3}`, `language_model.model.*`,
`language_model.lm_head.weight` (tests/fixtures/internvl/ holds that release's key list).
Both layouts read the Qwen2.5 decoder through maps/qwen.py under `language_model.`; transformers' prefixes are
renamed to it on import and back on export (`key_prefixes`). Each naming is its own family (as SigLIP / SigLIP2),
so a converted directory exports back to the layout it came from.
"""

from __future__ import annotations

from typing import Any

from unimm_jax.convert import transforms as T
from unimm_jax.convert.engine import prefixed
from unimm_jax.convert.errors import ConversionError
from unimm_jax.convert.family import Family
from unimm_jax.convert.maps import qwen as qwen_map
from unimm_jax.models import internvl
from unimm_jax.models.internvl import InternVLConfig

_QKV = ("q", "k", "v")
_LLM = prefixed(qwen_map.RULES, r"language_model\.", "language_model/")


def _vision(prefix: str, layer: str, names: dict[str, str]) -> tuple:
  """The tower's rules; `names` gives the checkpoint's name of each of our modules."""
  L = prefix + layer + r"\.(\d+)\."
  n = {k: v.replace(".", r"\.") for k, v in names.items()}
  return (
      (prefix + n["class_embedding"], "vision_tower/class_embedding", T.identity),
      (prefix + n["position_embedding"], "vision_tower/position_embedding", T.identity),
      (prefix + n["patch_embedding"] + r"\.weight", "vision_tower/patch_embedding/kernel", T.conv2d),
      (prefix + n["patch_embedding"] + r"\.bias", "vision_tower/patch_embedding/bias", T.identity),
      (L + n["ls"] + r"([12])", r"vision_tower/layers_\1/ls\2", T.identity),
      (L + n["norm1"] + r"\.weight", r"vision_tower/layers_\1/norm1/scale", T.identity),
      (L + n["norm1"] + r"\.bias", r"vision_tower/layers_\1/norm1/bias", T.identity),
      (L + n["norm2"] + r"\.weight", r"vision_tower/layers_\1/norm2/scale", T.identity),
      (L + n["norm2"] + r"\.bias", r"vision_tower/layers_\1/norm2/bias", T.identity),
      (L + n["o_proj"] + r"\.weight", r"vision_tower/layers_\1/attn/o_proj/kernel", T.from_heads),
      (L + n["o_proj"] + r"\.bias", r"vision_tower/layers_\1/attn/o_proj/bias", T.identity),
      (L + r"mlp\.(fc[12])\.weight", r"vision_tower/layers_\1/mlp/\2/kernel", T.transpose),
      (L + r"mlp\.(fc[12])\.bias", r"vision_tower/layers_\1/mlp/\2/bias", T.identity),
  )


def _projector(names: tuple[str, str, str]) -> tuple:
  rules = ()
  for ours, theirs in zip(("layer_norm", "linear_1", "linear_2"), names):
    w, leaf = (T.identity, "scale") if ours == "layer_norm" else (T.transpose, "kernel")
    rules += ((theirs.replace(".", r"\.") + r"\.weight", f"multi_modal_projector/{ours}/{leaf}", w),
              (theirs.replace(".", r"\.") + r"\.bias", f"multi_modal_projector/{ours}/bias", T.identity))
  return rules


# transformers' keys after `key_prefixes` (model.vision_tower. -> vision_tower., ... see hf_prefix_for)
_HF_ATTN = r"vision_tower\.encoder\.layer\.(\d+)\.attention\."
RULES_HF = (
    *_vision(r"vision_tower\.", r"encoder\.layer", dict(
        class_embedding="embeddings.cls_token", position_embedding="embeddings.position_embeddings",
        patch_embedding="embeddings.patch_embeddings.projection", ls="lambda_", norm1="layernorm_before",
        norm2="layernorm_after", o_proj="attention.projection_layer")),
    (_HF_ATTN + r"([qkv])_proj\.weight", r"vision_tower/layers_\1/attn/\2_proj/kernel", T.to_heads),
    (_HF_ATTN + r"([qkv])_proj\.bias", r"vision_tower/layers_\1/attn/\2_proj/bias", T.to_heads),
    *_projector(("multi_modal_projector.layer_norm", "multi_modal_projector.linear_1",
                 "multi_modal_projector.linear_2")),
    *_LLM,
)
_QKV_SRC = r"vision_model\.encoder\.layers\.(\d+)\.attn\.qkv\."
RULES_ORIGINAL = (
    *_vision(r"vision_model\.", r"encoder\.layers", dict(
        class_embedding="embeddings.class_embedding", position_embedding="embeddings.position_embedding",
        patch_embedding="embeddings.patch_embedding", ls="ls", norm1="norm1", norm2="norm2", o_proj="attn.proj")),
    *((_QKV_SRC + r"weight", rf"vision_tower/layers_\1/attn/{n}_proj/kernel", T.part(i, 3, T.to_heads))
      for i, n in enumerate(_QKV)),
    *((_QKV_SRC + r"bias", rf"vision_tower/layers_\1/attn/{n}_proj/bias", T.part(i, 3, T.to_heads))
      for i, n in enumerate(_QKV)),
    *_projector(("mlp1.0", "mlp1.1", "mlp1.3")),
    *_LLM,
)


def _ignore(vision_prefix: str, layer: str):
  def ignore(cfg: InternVLConfig) -> tuple[str, ...]:
    """RoPE buffers of old exports, the tied lm_head, and the vision layers past the feature layer (not built)."""
    out = tuple(r"language_model\." + p for p in qwen_map.IGNORE)
    out += (vision_prefix + r"embeddings\.mask_token",)   # masked-image-modelling only, unused by InternVL
    if cfg.llm.tie_embeddings:
      out += (r"language_model\.lm_head\.weight",)
    v = cfg.vision
    return out + tuple(vision_prefix + layer + rf"\.{i}\..*" for i in range(v.num_layers, v.depth))
  return ignore


def hf_prefix_for(model_type_in_file: str) -> dict[str, str]:
  """transformers' layout -> the names RULES_HF reads (the LLM as `language_model.model.*`, as the release)."""
  del model_type_in_file
  return {"model.vision_tower.": "vision_tower.", "model.multi_modal_projector.": "multi_modal_projector.",
          "model.language_model.": "language_model.model.", "lm_head.": "language_model.lm_head."}


def hf_config(cfg: InternVLConfig) -> dict[str, Any]:
  """InternVLConfig -> config.json of transformers' InternVLForConditionalGeneration."""
  v, llm = cfg.vision, cfg.llm
  text = {k: val for k, val in qwen_map.hf_config(llm).items() if k not in ("architectures", "torch_dtype")}
  if cfg.max_positions is not None:   # the release's dynamic-NTK RoPE (see InternVLConfig.max_positions)
    text.update(max_position_embeddings=cfg.max_positions,
                rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": llm.rope_theta})
  return {
      "architectures": ["InternVLForConditionalGeneration"], "model_type": "internvl",
      "image_token_id": cfg.image_token_id, "image_seq_length": cfg.tokens_per_tile,
      "downsample_ratio": cfg.downsample_ratio, "projector_hidden_act": cfg.projector_act,
      "vision_feature_layer": -1 if v.feature_layer is None else v.feature_layer,
      "vision_feature_select_strategy": "default", "tie_word_embeddings": llm.tie_embeddings,
      "torch_dtype": cfg.param_dtype, "text_config": text,
      "vision_config": {
          "model_type": "internvl_vision", "hidden_size": v.embed, "intermediate_size": v.mlp,
          "num_hidden_layers": v.depth, "num_attention_heads": v.heads, "patch_size": [v.patch, v.patch],
          "image_size": [cfg.tile_size, cfg.tile_size], "num_channels": v.channels, "attention_bias": v.qkv_bias,
          "norm_type": v.norm, "layer_norm_eps": v.norm_eps, "hidden_act": v.act, "use_qk_norm": False,
          "use_mean_pooling": True, "use_absolute_position_embeddings": True},
  }


def original_config(cfg: InternVLConfig) -> dict[str, Any]:
  """The original release has no config class of ours to write from: its export reuses the config.json kept in
  the converted directory's metadata (hf.convert_to_orbax records it); this is only reached without one."""
  raise ConversionError("an internvl_chat checkpoint exports with the release's own config.json; this converted "
                        "directory has none in its unimm_config.json (convert it from the release directory)")


FAMILY = Family(
    name="internvl", hf_model_types=("internvl",), config_cls=InternVLConfig, config_from_hf=internvl.config_from_hf,
    module=internvl.InternVL, example_inputs=internvl.example_inputs, rules=lambda cfg: RULES_HF,
    ignore=_ignore(r"vision_tower\.", r"encoder\.layer"), key_prefixes=hf_prefix_for, hf_config=hf_config,
    pipeline="unimm_jax.sampling.internvl:load")
FAMILY_ORIGINAL = Family(
    name="internvl_chat", hf_model_types=("internvl_chat",), config_cls=InternVLConfig,
    config_from_hf=internvl.config_from_hf, module=internvl.InternVL, example_inputs=internvl.example_inputs,
    rules=lambda cfg: RULES_ORIGINAL, ignore=_ignore(r"vision_model\.", r"encoder\.layers"),
    hf_config=original_config,
    pipeline="unimm_jax.sampling.internvl:load")
