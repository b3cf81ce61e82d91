"""tuna-2 reference state dict (`Tuna` / `Tuna2Pixel`, prefixes relative to the wrapper's `tuna_model`)
-> unimm_jax.models.tuna. The frozen `vae.*` tensors are a separate model (maps/vae_wan.py)."""

from unimm_jax import schema
from unimm_jax.convert import transforms as T
from unimm_jax.convert.engine import prefixed
from unimm_jax.convert.family import Family, Reference
from unimm_jax.convert.maps import qwen, siglip
from unimm_jax.models import tuna

_A = r"diffusion_head_a\.(\d+)\."
_HEAD = (
    (_A + r"self_attn\.([qkv])_proj\.weight", r"diffusion_head_a_\1/self_attn/\2_proj/kernel", T.to_heads),
    (_A + r"self_attn\.o_proj\.weight", r"diffusion_head_a_\1/self_attn/o_proj/kernel", T.from_heads),
    (_A + r"self_attn\.([qk])_norm\.weight", r"diffusion_head_a_\1/self_attn/\2_norm/scale", T.identity),
    (_A + r"mlp\.(gate|up|down)_proj\.weight", r"diffusion_head_a_\1/mlp/\2_proj/kernel", T.transpose),
    (_A + r"(input_layernorm|post_attention_layernorm)\.weight", r"diffusion_head_a_\1/\2/scale", T.identity),
    (_A + r"adaLN_modulation\.1\.weight", r"diffusion_head_a_\1/adaLN_modulation/linear/kernel", T.transpose),
    (_A + r"adaLN_modulation\.1\.bias", r"diffusion_head_a_\1/adaLN_modulation/linear/bias", T.identity),
    (r"diffusion_head_b\.norm_final\.weight", "diffusion_head_b/norm_final/scale", T.identity),
    (r"diffusion_head_b\.linear\.weight", "diffusion_head_b/linear/kernel", T.transpose),
    (r"diffusion_head_b\.linear\.bias", "diffusion_head_b/linear/bias", T.identity),
    (r"diffusion_head_b\.adaLN_modulation\.1\.weight", "diffusion_head_b/adaLN_modulation/linear/kernel",
     T.transpose),
    (r"diffusion_head_b\.adaLN_modulation\.1\.bias", "diffusion_head_b/adaLN_modulation/linear/bias", T.identity),
    (r"time_embed\.mlp\.([02])\.weight", r"time_embed/mlp_\1/kernel", T.transpose),
    (r"time_embed\.mlp\.([02])\.bias", r"time_embed/mlp_\1/bias", T.identity),
    # options (TunaConfig.aspect_ratio_embeds, TunaHeadConfig.share_adaln, head.embed != llm.embed); a checkpoint
    # with keys of an option its config lacks fails naming them ("the model has no such parameter")
    (r"aspect_ratio_embed\.mlp\.([02])\.weight", r"aspect_ratio_embed/mlp_\1/kernel", T.transpose),
    (r"aspect_ratio_embed\.mlp\.([02])\.bias", r"aspect_ratio_embed/mlp_\1/bias", T.identity),
    (r"shared_adaln\.1\.weight", "shared_adaln/linear/kernel", T.transpose),
    (r"shared_adaln\.1\.bias", "shared_adaln/linear/bias", T.identity),
    (_A + r"scale_shift_table", r"diffusion_head_a_\1/scale_shift_table", T.identity),
    (r"diff_proj\.([02])\.weight", r"diff_proj/layers_\1/kernel", T.transpose),
    (r"diff_proj\.([02])\.bias", r"diff_proj/layers_\1/bias", T.identity),
    (r"(time_embed_proj|ar_embed_proj)\.weight", r"\1/kernel", T.transpose),
    (r"(time_embed_proj|ar_embed_proj)\.bias", r"\1/bias", T.identity),
)
RULES_SIGLIP = (
    *prefixed(qwen.RULES, r"tuna\.", "llm/"),
    *prefixed(siglip.RULES_SIGLIP, r"vision_model\.", "vision_model/"),
    (r"siglip_proj\.0\.weight", "siglip_proj/layers_0/scale", T.identity),
    (r"siglip_proj\.([13])\.weight", r"siglip_proj/layers_\1/kernel", T.transpose),
    (r"siglip_proj\.([13])\.bias", r"siglip_proj/layers_\1/bias", T.identity),
    *_HEAD,
)
# TUNA-2: vision_encoder = SimplePatchEmbedding (Conv2d(c, d, p, stride p) + RMSNorm)
RULES_PATCH = (
    *prefixed(qwen.RULES, r"tuna\.", "llm/"),
    (r"vision_encoder\.patch_embedding\.weight", "vision_encoder/patch_embedding/kernel", T.conv2d),
    (r"vision_encoder\.patch_embedding\.bias", "vision_encoder/patch_embedding/bias", T.identity),
    (r"vision_encoder\.norm\.weight", "vision_encoder/norm/scale", T.identity),
    # TunaConfig.patch_positions > 0: our learned row/column tables (nn.Embedding-style), not in TUNA-2
    (r"vision_encoder\.(row|column)_embedding\.weight", r"vision_encoder/\1_embedding", T.identity),
    *_HEAD,
)
# Non-persistent buffers some exports keep; `vae.*` is converted separately; TUNA-2's `mask_token` (DeTok masked
# image modelling, enable_mask_token in configs/model/tuna_2_pixel_7b.yaml) is used only while training, by a
# masking our trainer does not do (docs/tuna.md).
IGNORE = (r"tuna\.model\.rotary_emb\.inv_freq", r"diffusion_head_a\.\d+\.self_attn\.rotary_emb\.inv_freq",
          r"image_position_ids", r"vae\..*", r"mask_token")


def rules(cfg) -> tuple:
  return RULES_SIGLIP if cfg.encoder == "siglip" else RULES_PATCH


def ignore(cfg) -> tuple:
  """IGNORE plus the tied lm_head and the SigLIP layers past the feature layer, if the config drops them."""
  extra = (r"tuna\.lm_head\.weight",) if cfg.llm.tie_embeddings else ()
  if cfg.siglip is not None:
    extra += tuple(rf"vision_model\.encoder\.layers\.{i}\..*" for i in range(cfg.siglip.num_layers, cfg.siglip.depth))
  return IGNORE + extra


# tuna-2 checkpoints carry no config.json: converted from the reference's state dict (convert/tuna.py).
FAMILY = Family(
    name="tuna", config_cls=tuna.TunaConfig, module=tuna.Tuna,
    example_inputs=lambda cfg: (schema.example_inputs(cfg.token_features),), rules=rules, ignore=ignore, pipeline="unimm_jax.sampling.tuna:load",
    reference=Reference(
        flag="tuna", help=f"TUNA variant ({', '.join(tuna.VARIANTS)}) of a tuna-2 reference checkpoint --src, or "
        "of a stage-1 model from --llm [--siglip] [--vae]", convert="unimm_jax.convert.tuna:convert_cli",
        parts={"tokenizer": "TUNA: directory whose tokenizer files are copied (default: --llm)",
               "llm": "TUNA from parts: Qwen2.5 HF directory",
               "siglip": "TUNA from parts: SigLIP / SigLIP2 HF directory",
               "vae": "Wan 2.2 VAE (diffusers directory, or the original Wan2.2_VAE.pth)"}))
