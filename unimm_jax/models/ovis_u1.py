"""Ovis-U1: Qwen3 reading images through a probabilistic visual tokenizer (AIMv2 NaViT + softmax over a visual
vocabulary embedded by `vte`).

Paper: Ovis-U1 Technical Report (seed 001). Reference: the Hugging Face remote code of AIDC-AI/Ovis-U1-3B
(modeling_ovis_u1.py: Aimv2VisualTokenizer, VisualEmbedding, merge_multimodal, generate_condition;
modeling_aimv2.py), as pinned in shared/fixtures/ovis_u1/README.md.
Shapes: b batch, t tokens, d LLM width, r packed vision rows, l patches a row, n visual tokens (merge groups),
m merge group size (hidden_stride^2), v visual vocabulary.

Understanding and the generation condition:
  patches -> AIMv2 NaViT (models/aimv2.py: 2D RoPE, windows, bicubic-resized learned positions) -> the LAST
  BLOCK's output (the tokenizer skips post_trunk_norm) -> m patches concatenated -> Linear -> LayerNorm ->
  fp32 softmax over v - 4 words -> 4 zero columns -> probabilities @ vte = visual embeddings.
  The prompt's image placeholder [-301, -300, -302] becomes: vte row of the start indicator, the image's
  visual embeddings, vte row of the end indicator (`merge`); Qwen3 (models/qwen.py) reads the result.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

from unimm_jax.data.qwen_vl import pack_vision
from unimm_jax.layers import DenseGeneral
from unimm_jax.layers.embed import scatter_placeholders
from unimm_jax.layers.norms import LayerNorm
from unimm_jax.models import qwen, vae_kl, yak
from unimm_jax.models.aimv2 import Aimv2VisionConfig, Aimv2VisionModel
from unimm_jax.models.config import DictConfig, push_runtime

MODEL_TYPE = "ovis_u1"
IMAGE_ATOM_ID = -300                          # one per image in the prompt; replaced by all its visual embeddings
IMAGE_INDICATOR_IDS = (-301, -302, -303, -304)
IMAGE_PLACEHOLDER = (-301, -300, -302)        # what `<image>` tokenizes to
INDICATORS = len(IMAGE_INDICATOR_IDS)


@dataclasses.dataclass(frozen=True)
class OvisU1Config(DictConfig):
  llm: qwen.QwenConfig
  vision: Aimv2VisionConfig
  generator: yak.YakConfig                   # the image decoder (models/yak.py) ...
  vae: vae_kl.AutoencoderKLConfig            # ... over the SDXL VAE
  visual_vocab: int = 65536               # v: the head predicts v - 4 words, the last 4 vte rows are indicators
  head_norm_eps: float = 1e-5
  # Runtime choices, applied to every tower (they change speed and memory, never the numbers).
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = False
  remat: str = "none"
  attention_impl: str = "auto"

  def __post_init__(self):
    push_runtime(self, ("llm", "vision"))
    push_runtime(self, ("generator",), ("dtype", "param_dtype", "attention_impl"))
    push_runtime(self, ("vae",), ("dtype", "param_dtype"))
    if self.generator.context_dim != 2 * self.llm.embed:
      raise ValueError(f"OvisU1Config: generator.context_dim {self.generator.context_dim} must be 2 x llm.embed "
                       f"({2 * self.llm.embed}): the condition is cat(hidden_states[-1], hidden_states[-2])")
    if self.generator.in_channels != 4 * self.vae.latent_channels:
      raise ValueError(f"OvisU1Config: generator.in_channels {self.generator.in_channels} must be 4 x the VAE's "
                       f"{self.vae.latent_channels} latent channels (2x2 packing)")
    if self.vision.use_head or not self.vision.rope or self.vision.posemb != "learned":
      raise ValueError("OvisU1Config: the visual tokenizer's AIMv2 has no pooling head, 2D RoPE and a learned "
                       f"position table (got use_head={self.vision.use_head}, rope={self.vision.rope}, "
                       f"posemb={self.vision.posemb!r})")
    if self.visual_vocab <= INDICATORS + 1:
      raise ValueError(f"OvisU1Config: visual_vocab {self.visual_vocab} must exceed the {INDICATORS} indicator rows")

  @property
  def depth(self) -> int:
    return self.llm.depth

  @property
  def merge_tokens(self) -> int:
    return self.vision.merge ** 2

  @classmethod
  def ovis_u1_3b(cls, **kw) -> "OvisU1Config":
    """AIDC-AI/Ovis-U1-3B config.json (shared/fixtures/ovis_u1/README.md 3.1): Qwen3-1.7B, AIMv2-large-448
    with every block attending over the whole image (fullatt_block_indexes null), v = 65536."""
    vision = Aimv2VisionConfig.large_patch14(448, use_head=False, posemb_resize="two_dim", rope=True)
    return cls(llm=qwen.QwenConfig.qwen3_1_7b(), vision=vision, generator=yak.YakConfig(),
               vae=vae_kl.preset("sdxl"), **kw)

  @classmethod
  def tiny(cls, **kw) -> "OvisU1Config":
    """The public fixture set's sizes (window attention in blocks 0 and 2)."""
    vision = Aimv2VisionConfig(embed=48, depth=3, heads=4, mlp=96, image_size=56, use_head=False,
                               posemb_resize="two_dim", rope=True, window_size=56, fullatt_blocks=(1,))
    llm = qwen.QwenConfig.qwen3_1_7b(vocab=175, embed=64, mlp=128, depth=2, heads=4, kv_heads=2, head_dim=16)
    vae = vae_kl.AutoencoderKLConfig(block_out_channels=(8, 16, 16, 16), norm_num_groups=4, scaling_factor=0.13025)
    return cls(llm=llm, vision=vision, generator=yak.YakConfig.tiny(), vae=vae, **{**dict(visual_vocab=40), **kw})


def _vision_config_from_hf(vt: Mapping[str, Any]) -> Aimv2VisionConfig:
  """visual_tokenizer_config (its backbone_config, overridden by backbone_kwargs as the original does)."""
  b = {**(vt.get("backbone_config") or {}), **(vt.get("backbone_kwargs") or {})}
  if not b.get("preserve_original_pe", False):
    raise NotImplementedError("ovis_u1: visual tokenizer without preserve_original_pe (no learned positions) "
                              "is not supported")
  if b.get("disable_rope", False):
    raise NotImplementedError("ovis_u1: visual tokenizer with disable_rope=True is not supported")
  if int(b.get("temporal_patch_size", 1)) != 1:
    raise NotImplementedError(f"ovis_u1: temporal_patch_size {b['temporal_patch_size']} (only 1: images)")
  full = b.get("fullatt_block_indexes")
  if isinstance(full, str):   # the original's "a|b" string form
    full = [int(i) for i in full.replace(" ", "").split("|")]
  # fullatt_block_indexes null: every block attends over the whole image, so the windows change nothing
  window = int(b.get("window_size", 0)) if full is not None else 0
  return Aimv2VisionConfig(
      embed=b["hidden_size"], depth=b["num_hidden_layers"], heads=b["num_attention_heads"],
      mlp=b["intermediate_size"], patch=b.get("patch_size", 14), channels=b.get("num_channels", 3),
      image_size=b.get("image_size", 448), norm_eps=float(b.get("rms_norm_eps", 1e-5)),
      qkv_bias=bool(b.get("qkv_bias", False)), mlp_bias=bool(b.get("use_bias", False)), use_head=False,
      posemb_resize=b.get("interpolate_pe_method", "two_dim"), rope=True, window_size=window,
      merge=int(vt.get("hidden_stride", 2)), fullatt_blocks=tuple(full or ()))


def config_from_hf(hf: Mapping[str, Any] | Any) -> OvisU1Config:
  """The release's nested config.json (llm_config / visual_tokenizer_config / visual_generator_config)."""
  d = hf if isinstance(hf, Mapping) else hf.to_dict()
  if d.get("model_type") != MODEL_TYPE:
    raise ValueError(f"unsupported model_type {d.get('model_type')!r}; supported: ('{MODEL_TYPE}',)")
  for part in ("llm_config", "visual_tokenizer_config", "visual_generator_config"):
    if not isinstance(d.get(part), Mapping):
      raise ValueError(f"ovis_u1 config.json: missing {part!r}")
  vt = d["visual_tokenizer_config"]
  if vt.get("tokenize_function", "softmax") != "softmax":
    raise NotImplementedError(f"ovis_u1: tokenize_function {vt['tokenize_function']!r} (only softmax)")
  llm = qwen.config_from_hf(d["llm_config"])
  if d.get("disable_tie_weight"):
    llm = dataclasses.replace(llm, tie_embeddings=False)
  gen = d["visual_generator_config"]
  if not isinstance(gen.get("vae_config"), Mapping):
    raise ValueError("ovis_u1 config.json: missing 'visual_generator_config.vae_config'")
  return OvisU1Config(llm=llm, vision=_vision_config_from_hf(vt), generator=yak.config_from_hf(gen),
                      vae=vae_kl.config_from_diffusers(gen["vae_config"]), visual_vocab=int(vt["vocab_size"]))


@flax.struct.dataclass
class VisionInputs:
  """Packed NaViT rows (data/qwen_vl.pack_vision with temporal patch 1) and, for each visual token in prompt
  order (image by image, merge groups row-major), its index in the tokenizer's flattened output [r*l/m]."""

  patches: jax.Array       # [r l P]
  positions: jax.Array     # [r l 2]
  frame_sizes: jax.Array   # [r l 2]
  frame_ids: jax.Array     # [r l]
  window_ids: jax.Array    # [r l]
  tokens: jax.Array        # [n] int32


class VisualTokenizer(nn.Module):
  """Packed patches -> visual-word probabilities [n v] (Aimv2VisualTokenizer.encode + head + tokenize)."""

  cfg: OvisU1Config

  def setup(self):
    cfg = self.cfg
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    words = cfg.visual_vocab - INDICATORS
    self.backbone = Aimv2VisionModel(cfg.vision)
    self.head = DenseGeneral((cfg.merge_tokens * cfg.vision.embed,), (words,), ("embed", "vocab"), False, **kw)
    self.head_norm = LayerNorm(words, cfg.head_norm_eps, **kw)

  def __call__(self, vision: VisionInputs) -> jax.Array:
    out = self.backbone(patches=vision.patches, positions=vision.positions, frame_sizes=vision.frame_sizes,
                        frame_ids=vision.frame_ids, window_ids=vision.window_ids, return_hidden_states=True)
    # the original reads hidden_states[-1]: the last block's output, before post_trunk_norm
    features = rearrange(out.hidden_states[-1], "r (n m) d -> (r n) (m d)", m=self.cfg.merge_tokens)
    logits = self.head_norm(self.head(jnp.take(features, vision.tokens, axis=0)))
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.pad(probs, ((0, 0), (0, INDICATORS)))


class OvisU1(nn.Module):
  """Token ids with image placeholders (+ packed images) -> Qwen3 logits and hidden states."""

  cfg: OvisU1Config

  def setup(self):
    cfg = self.cfg
    self.visual_tokenizer = VisualTokenizer(cfg)
    self.vte = self.param("vte", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
                          (cfg.visual_vocab, cfg.llm.embed), jnp.dtype(cfg.param_dtype))
    self.llm = qwen.Qwen(cfg.llm)
    self.visual_generator = yak.YakTransformer(cfg.generator)
    self.vae = vae_kl.AutoencoderKL(cfg.vae)

  def visual_embeds(self, vision: VisionInputs) -> jax.Array:
    """[n d] = probabilities @ vte (VisualEmbedding), in fp32."""
    probs = self.visual_tokenizer(vision)
    return jnp.einsum("nv,vd->nd", probs, self.vte.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)

  def embed(self, input_ids: jax.Array, vision: VisionInputs | None = None) -> jax.Array:
    """ids [b t], each image's -300 repeated once per visual token (sampling/vlm.expand_placeholders) ->
    [b t d] (merge_multimodal).

    Text ids take embed_tokens; indicator -301 - k takes vte row v - 5 + k. That is the original's off-by-one,
    reproduced: the head has v - 4 words and 4 zero columns, yet the indicators start at row v - 5, so the
    image-start indicator shares the last real word's row and row v - 1 is never read. Each -300 takes the next
    visual embedding in order.
    """
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    x = self.llm.embed(jnp.maximum(input_ids, 0))
    indicator = (input_ids <= IMAGE_INDICATOR_IDS[0]) & (input_ids >= IMAGE_INDICATOR_IDS[-1])
    rows = cfg.visual_vocab - INDICATORS - 1 + (IMAGE_INDICATOR_IDS[0] - input_ids)
    x = jnp.where(indicator[..., None], jnp.take(self.vte, jnp.where(indicator, rows, 0), axis=0).astype(dtype), x)
    if vision is None:
      return x
    return scatter_placeholders(x, input_ids, self.visual_embeds(vision).astype(dtype), IMAGE_ATOM_ID)

  def __call__(self, input_ids: jax.Array, vision: VisionInputs | None = None, **decoder_kwargs) -> qwen.DecoderOutput:
    """decoder_kwargs as models/qwen.Qwen (segment_ids, positions, cache, return_hidden_states, ...)."""
    if self.is_initializing():   # one init builds every part: the decoder and the VAE run through other methods
      self.velocity(*generator_example(self.cfg))
      self.vae(jnp.zeros((1, self.cfg.vae.spatial_downscale, self.cfg.vae.spatial_downscale, self.cfg.vae.in_channels)))
    return self.llm(inputs_embeds=self.embed(input_ids, vision), **decoder_kwargs)

  def velocity(self, img: jax.Array, img_ids: jax.Array, txt: jax.Array, timesteps: jax.Array,
               cond: jax.Array | None = None, cond_ids: jax.Array | None = None,
               txt_mask: jax.Array | None = None) -> jax.Array:
    """The decoder's velocity (models/yak.YakTransformer) for the condition `txt` of `condition`."""
    return self.visual_generator(img, img_ids, txt, timesteps, cond, cond_ids, txt_mask)

  def condition(self, input_ids: jax.Array, vision: VisionInputs | None = None, **decoder_kwargs) -> jax.Array:
    """The generator's text condition [b t 2d] = cat(hidden_states[-1], hidden_states[-2]) (generate_condition):
    the final-normed last layer and the raw output of the layer before it, over every position."""
    out = self(input_ids, vision, return_hidden_states=True, return_logits=False, **decoder_kwargs)
    return jnp.concatenate([out.hidden_states[-1], out.hidden_states[-2]], axis=-1)


def generator_example(cfg: OvisU1Config) -> tuple:
  """Decoder inputs that build all of its params: one latent token and one condition token."""
  g = cfg.generator
  return (jnp.zeros((1, 1, g.in_channels)), jnp.zeros((1, 3)), jnp.zeros((1, 1, g.context_dim)), jnp.zeros((1,)))


# ----------------------------------------------------------------------------------------------
# Host-side preparation (NumPy)
# ----------------------------------------------------------------------------------------------

def prepare_vision(pixel_values: np.ndarray, grid_thws: Sequence[Sequence[int]], cfg: OvisU1Config,
                   seq_len: int | None = None) -> tuple[VisionInputs, tuple[int, ...]]:
  """The processor's patches [N (c p p)] (merge order) and grids [[1, h, w]] -> (VisionInputs, visual tokens of
  each image)."""
  grids = [tuple(int(v) for v in g) for g in grid_thws]
  pixel_values = np.asarray(pixel_values, np.float32)
  want = cfg.vision.channels * cfg.vision.patch ** 2
  if pixel_values.ndim != 2 or pixel_values.shape[1] != want:
    raise ValueError(f"ovis_u1: pixel_values {pixel_values.shape}, expected [patches, {want}] (c*p*p)")
  packing = pack_vision(grids, merge=cfg.vision.merge, window=cfg.vision.window, seq_len=seq_len)
  vision = VisionInputs(jnp.asarray(packing.rows(pixel_values)), jnp.asarray(packing.positions),
                        jnp.asarray(packing.frame_sizes), jnp.asarray(packing.frame_ids),
                        jnp.asarray(packing.window_ids), jnp.asarray(packing.merged, jnp.int32))
  return vision, tuple(packing.tokens_per_image)
