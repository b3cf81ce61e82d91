"""diffusers FluxTransformer2DModel -> unimm_jax.models.flux (loop layout)."""

from unimm_jax.convert import transforms as T
from unimm_jax.convert.family import DIFFUSERS_WEIGHTS, Family
from unimm_jax.models import flux

_D = r"transformer_blocks\.(\d+)\."
_S = r"single_transformer_blocks\.(\d+)\."
RULES = (
    # Input projections and the conditioning vector (timestep, distilled guidance, pooled text).
    (r"(x_embedder|context_embedder|proj_out)\.weight", r"\1/kernel", T.transpose),
    (r"(x_embedder|context_embedder|proj_out)\.bias", r"\1/bias", T.identity),
    (r"time_text_embed\.(timestep_embedder|guidance_embedder)\.linear_1\.weight",
     r"time_text_embed/\1/mlp_0/kernel", T.transpose),
    (r"time_text_embed\.(timestep_embedder|guidance_embedder)\.linear_1\.bias", r"time_text_embed/\1/mlp_0/bias",
     T.identity),
    (r"time_text_embed\.(timestep_embedder|guidance_embedder)\.linear_2\.weight",
     r"time_text_embed/\1/mlp_2/kernel", T.transpose),
    (r"time_text_embed\.(timestep_embedder|guidance_embedder)\.linear_2\.bias", r"time_text_embed/\1/mlp_2/bias",
     T.identity),
    (r"time_text_embed\.text_embedder\.linear_1\.weight", "time_text_embed/text_embedder/fc1/kernel", T.transpose),
    (r"time_text_embed\.text_embedder\.linear_1\.bias", "time_text_embed/text_embedder/fc1/bias", T.identity),
    (r"time_text_embed\.text_embedder\.linear_2\.weight", "time_text_embed/text_embedder/fc2/kernel", T.transpose),
    (r"time_text_embed\.text_embedder\.linear_2\.bias", "time_text_embed/text_embedder/fc2/bias", T.identity),
    # AdaLN modulations (double: norm1, norm1_context; single: norm; final: norm_out).
    (_D + r"(norm1|norm1_context)\.linear\.weight", r"transformer_blocks_\1/\2/linear/kernel", T.transpose),
    (_D + r"(norm1|norm1_context)\.linear\.bias", r"transformer_blocks_\1/\2/linear/bias", T.identity),
    (_S + r"norm\.linear\.weight", r"single_transformer_blocks_\1/norm/linear/kernel", T.transpose),
    (_S + r"norm\.linear\.bias", r"single_transformer_blocks_\1/norm/linear/bias", T.identity),
    (r"norm_out\.linear\.weight", "norm_out/linear/kernel", T.transpose),
    (r"norm_out\.linear\.bias", "norm_out/linear/bias", T.identity),
    # Double-stream joint attention: to_* is the image stream, add_* / *_added_* the text stream.
    (_D + r"attn\.to_([qkv])\.weight", r"transformer_blocks_\1/attn/img_\2_proj/kernel", T.to_heads),
    (_D + r"attn\.to_([qkv])\.bias", r"transformer_blocks_\1/attn/img_\2_proj/bias", T.to_heads),
    (_D + r"attn\.add_([qkv])_proj\.weight", r"transformer_blocks_\1/attn/txt_\2_proj/kernel", T.to_heads),
    (_D + r"attn\.add_([qkv])_proj\.bias", r"transformer_blocks_\1/attn/txt_\2_proj/bias", T.to_heads),
    (_D + r"attn\.norm_([qk])\.weight", r"transformer_blocks_\1/attn/img_\2_norm/scale", T.identity),
    (_D + r"attn\.norm_added_([qk])\.weight", r"transformer_blocks_\1/attn/txt_\2_norm/scale", T.identity),
    (_D + r"attn\.to_out\.0\.weight", r"transformer_blocks_\1/attn/img_o_proj/kernel", T.from_heads),
    (_D + r"attn\.to_out\.0\.bias", r"transformer_blocks_\1/attn/img_o_proj/bias", T.identity),
    (_D + r"attn\.to_add_out\.weight", r"transformer_blocks_\1/attn/txt_o_proj/kernel", T.from_heads),
    (_D + r"attn\.to_add_out\.bias", r"transformer_blocks_\1/attn/txt_o_proj/bias", T.identity),
    # Double-stream MLPs (diffusers FeedForward: net.0.proj, GELU-tanh, net.2).
    (_D + r"(ff|ff_context)\.net\.0\.proj\.weight", r"transformer_blocks_\1/\2/fc1/kernel", T.transpose),
    (_D + r"(ff|ff_context)\.net\.0\.proj\.bias", r"transformer_blocks_\1/\2/fc1/bias", T.identity),
    (_D + r"(ff|ff_context)\.net\.2\.weight", r"transformer_blocks_\1/\2/fc2/kernel", T.transpose),
    (_D + r"(ff|ff_context)\.net\.2\.bias", r"transformer_blocks_\1/\2/fc2/bias", T.identity),
    # Single-stream blocks: attention without its own output projection, MLP in, one projection out.
    (_S + r"attn\.to_([qkv])\.weight", r"single_transformer_blocks_\1/attn/\2_proj/kernel", T.to_heads),
    (_S + r"attn\.to_([qkv])\.bias", r"single_transformer_blocks_\1/attn/\2_proj/bias", T.to_heads),
    (_S + r"attn\.norm_([qk])\.weight", r"single_transformer_blocks_\1/attn/\2_norm/scale", T.identity),
    (_S + r"(proj_mlp|proj_out)\.weight", r"single_transformer_blocks_\1/\2/kernel", T.transpose),
    (_S + r"(proj_mlp|proj_out)\.bias", r"single_transformer_blocks_\1/\2/bias", T.identity),
)
# Nothing to ignore: every tensor of a diffusers FluxTransformer2DModel state dict has a rule (the RoPE table is
# computed, not stored).
IGNORE = ()

FAMILY = Family(
    name="flux", hf_model_types=("FluxTransformer2DModel",), config_cls=flux.FluxConfig,
    config_from_hf=flux.config_from_diffusers, module=flux.FluxTransformer2DModel,
    example_inputs=flux.example_inputs, rules=lambda cfg: RULES, hf_config=flux.diffusers_config,
    reads_text=False, weights_file=DIFFUSERS_WEIGHTS)
