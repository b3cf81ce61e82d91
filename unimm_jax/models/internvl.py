"""InternVL3: InternViT tiles -> pixel shuffle -> MLP projector -> a Qwen2.5 decoder, image features in place of
the `<IMG_CONTEXT>` tokens of the prompt.

Papers: InternVL 2.5 (arXiv 2412.05271), InternVL3 (arXiv 2504.10479).
Reference: transformers models/internvl/modeling_internvl.py (InternVLForConditionalGeneration); the original
release's remote code OpenGVLab/InternVL internvl_chat/internvl/model/internvl_chat/modeling_internvl_chat.py
(InternVLChatModel.extract_feature: select_layer, drop the class token, pixel_shuffle ps_version v2, mlp1).
Shapes: n tiles, b batch, t tokens, d vision width, s = 1/downsample_ratio, g patch grid of a tile,
k = (g/s)^2 image tokens per tile, D LLM width, v vocab.

Each image is cut into 448 px tiles (unimm_jax.data.internvl); each tile gives k = 256 LLM tokens: the
InternViT patch tokens of a g x g grid (32 x 32) are merged s x s (2 x 2) into one token of s^2 d channels
(transformers' `pixel_shuffle`: channels ordered (row offset, column offset, channel)), then projected by
LayerNorm -> Linear -> GELU -> Linear (the release's `mlp1.{0,1,3}`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

from unimm_jax.layers import DenseGeneral, LayerNorm, activation, scatter_placeholders
from unimm_jax.models import internvit, qwen
from unimm_jax.models.config import DictConfig, push_runtime
from unimm_jax.models.internvit import InternViTConfig
from unimm_jax.models.qwen import QwenConfig

MODEL_TYPES = ("internvl", "internvl_chat")   # transformers' conversion | the original remote-code release


@dataclasses.dataclass(frozen=True)
class InternVLConfig(DictConfig):
  vision: InternViTConfig
  llm: QwenConfig
  image_token_id: int = 151667        # <IMG_CONTEXT> of the InternVL3 (Qwen2.5) tokenizer
  downsample_ratio: float = 0.5       # pixel shuffle: s x s patch tokens -> one, s = 1 / downsample_ratio
  projector_act: str = "gelu"
  projector_norm_eps: float = 1e-5    # nn.LayerNorm's default in both references
  # The releases' LLM has dynamic-NTK RoPE (factor 2), which equals plain RoPE up to max_position_embeddings
  # positions and rescales past them; sequences are refused past this limit (None: no limit).
  max_positions: int | None = None
  # Runtime choices, set on both towers: they change speed and memory, never the numbers.
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"
  attention_impl: str = "auto"

  def __post_init__(self):
    scale = 1 / self.downsample_ratio
    if abs(scale - round(scale)) > 1e-6 or round(scale) < 1:
      raise ValueError(f"InternVLConfig.downsample_ratio {self.downsample_ratio} is not 1 / an integer")
    if self.vision.posemb_grid % round(scale):
      raise ValueError(f"InternVLConfig: a tile's {self.vision.posemb_grid}x{self.vision.posemb_grid} patch grid does "
                       f"not merge {round(scale)}x{round(scale)} (downsample_ratio {self.downsample_ratio})")
    push_runtime(self, ("vision", "llm"), ("dtype", "param_dtype", "remat", "attention_impl"))

  @property
  def shuffle(self) -> int:
    return round(1 / self.downsample_ratio)

  @property
  def tile_size(self) -> int:
    """Pixels per side of a tile (448): the size the position table was trained at."""
    return self.vision.posemb_grid * self.vision.patch

  @property
  def tokens_per_tile(self) -> int:
    return (self.vision.posemb_grid // self.shuffle) ** 2

  # Released sizes. InternVL3-1B: its config.json (InternVLChatConfig) as printed from the loaded release in
  # shivangjhalani/multicoco InternVL3-1B_data.md: vision_config InternViT-300M-448px, llm_config Qwen2.5-0.5B shapes
  # with the vocabulary extended to 151674 and an untied lm_head, rope_theta 1e6 with dynamic NTK factor 2 over
  # max_position_embeddings 32768 (tests/fixtures/internvl: its 938,193,024 parameters). InternVL3-2B: the same
  # tower with Qwen2.5-1.5B shapes (width 1536, 28 layers, 12 / 2 heads, head_dim 128, vocab 151674, as in the
  # InternVL text_config of NVIDIA trtmc's runtime-config test); its MLP 8960 (Qwen2.5-1.5B's) and untied lm_head
  # (the 1B release's) are UNVERIFIED against the 2B config.json. config_from_hf reads the real file either way.
  @classmethod
  def internvl3_1b(cls, **kw) -> "InternVLConfig":
    llm = QwenConfig.qwen2_5_0_5b(vocab=151674, tie_embeddings=False)
    return cls(**{**dict(vision=InternViTConfig.internvit_300m(), llm=llm, max_positions=32768), **kw})

  @classmethod
  def internvl3_2b(cls, **kw) -> "InternVLConfig":
    llm = QwenConfig.qwen2_5_1_5b(vocab=151674, tie_embeddings=False)
    return cls(**{**dict(vision=InternViTConfig.internvit_300m(), llm=llm, max_positions=32768), **kw})

  @classmethod
  def tiny(cls, **kw) -> "InternVLConfig":
    """28 px tiles of 7 px patches: 4 image tokens per tile."""
    return cls(**{**dict(vision=InternViTConfig.tiny(), llm=QwenConfig.tiny(), image_token_id=255), **kw})

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "InternVLConfig":
    d = dict(d)
    d["vision"] = InternViTConfig.from_dict(d["vision"])
    d["llm"] = QwenConfig.from_dict(d["llm"])
    return super().from_dict(d)


def _llm_config(d: Mapping[str, Any], tie: bool, where: str) -> tuple[QwenConfig, int | None]:
  """The LLM's config dict -> (QwenConfig, max_positions); dynamic-NTK RoPE becomes plain RoPE plus a limit."""
  d = dict(d)
  if d.get("model_type") not in ("qwen2",):
    raise NotImplementedError(f"{where}: LLM model_type {d.get('model_type')!r} (architectures "
                              f"{d.get('architectures')}) is not supported; InternVL3 with a Qwen2.5 LLM is")
  rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
  limit = None
  if rope.get("rope_type", rope.get("type")) == "dynamic":
    limit = int(d.get("max_position_embeddings", 32768))
    theta = rope.get("rope_theta", d.get("rope_theta", 1e6))
    d.pop("rope_scaling", None)
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
  d["tie_word_embeddings"] = tie
  return qwen.config_from_hf(d), limit


def config_from_hf(hf: Mapping[str, Any] | Any) -> InternVLConfig:
  """config.json of transformers' InternVLForConditionalGeneration (model_type internvl) or of the original
  release's InternVLChatModel (model_type internvl_chat; dict or PretrainedConfig) -> InternVLConfig."""
  d = hf if isinstance(hf, Mapping) else hf.to_dict()
  model_type = d.get("model_type")
  if model_type not in MODEL_TYPES:
    raise ValueError(f"unsupported model_type {model_type!r}; supported: {MODEL_TYPES}")
  if model_type == "internvl":
    text = d.get("text_config") or {}
    # transformers 5 ties lm_head to the embeddings by the top-level flag, but keeps a separate lm_head found in
    # the checkpoint; untied unless both flags say tied, so a checkpoint's own lm_head is never dropped.
    tie = bool(d.get("tie_word_embeddings", True)) and bool(text.get("tie_word_embeddings", False))
    llm, limit = _llm_config(text, tie, "text_config")
    if d.get("vision_feature_select_strategy", "default") != "default":
      raise NotImplementedError(f"vision_feature_select_strategy {d['vision_feature_select_strategy']!r} "
                                "is not supported (InternVL drops the class token: 'default')")
    layer = d.get("vision_feature_layer", -1)
    extra = dict(image_token_id=d.get("image_token_id", 151667), projector_act=d.get("projector_hidden_act", "gelu"))
  else:
    text = d.get("llm_config") or {}
    llm, limit = _llm_config(text, bool(text.get("tie_word_embeddings", False)), "llm_config")
    if d.get("ps_version", "v2") != "v2":
      raise NotImplementedError(f"ps_version {d['ps_version']!r} is not supported (InternVL2.5 / 3 use 'v2')")
    layer = d.get("select_layer", -1)
    extra = {}
  if not isinstance(layer, int):
    raise NotImplementedError(f"{model_type}: a list of vision feature layers {layer} is not supported")
  vision = dataclasses.replace(internvit.config_from_hf(d.get("vision_config") or {}),
                               feature_layer=None if layer == -1 else layer)
  return InternVLConfig(vision=vision, llm=llm, downsample_ratio=float(d.get("downsample_ratio", 0.5)),
                        max_positions=limit, **extra)


class Projector(nn.Module):
  """[n k s^2 d] merged patch tokens -> [n k D]: LayerNorm -> Linear -> act -> Linear."""

  cfg: InternVLConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.cfg
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    width = cfg.vision.embed * cfg.shuffle ** 2
    x = LayerNorm(width, cfg.projector_norm_eps, name="layer_norm", **kw)(x)
    x = DenseGeneral((width,), (cfg.llm.embed,), ("mlp", "embed"), True, name="linear_1", **kw)(x)
    x = activation(cfg.projector_act)(x)
    return DenseGeneral((cfg.llm.embed,), (cfg.llm.embed,), ("mlp", "embed"), True, name="linear_2", **kw)(x)


class InternVL(nn.Module):
  """Token ids (with image placeholders) + tiles -> logits (qwen.DecoderOutput)."""

  cfg: InternVLConfig

  def setup(self):
    self.vision_tower = internvit.InternViT(self.cfg.vision)
    self.multi_modal_projector = Projector(self.cfg)
    self.language_model = qwen.Qwen(self.cfg.llm)

  def image_features(self, pixels: jax.Array) -> jax.Array:
    """Normalised tiles [n H W 3] -> LLM embeddings [n k D] (k = tokens_per_tile at the trained tile size)."""
    s = self.cfg.shuffle
    x = self.vision_tower(pixels).last_hidden_state[:, 1:]   # the class token is dropped
    gh, gw = pixels.shape[1] // self.cfg.vision.patch, pixels.shape[2] // self.cfg.vision.patch
    if gh % s or gw % s:
      raise ValueError(f"InternVL: a {gh}x{gw} patch grid ({pixels.shape[1]}x{pixels.shape[2]} px) does not merge "
                       f"{s}x{s} (downsample_ratio {self.cfg.downsample_ratio})")
    x = rearrange(x, "n (h p w q) d -> n (h w) (p q d)", h=gh // s, p=s, q=s)
    return self.multi_modal_projector(x)

  def embed(self, input_ids: jax.Array, pixels: jax.Array | None = None, *,
            features: jax.Array | None = None) -> jax.Array:
    """[b t] ids -> [b t D]; the `image_token_id` rows, in reading order, take the features of the tiles in order
    (n tiles * k placeholders: checked by the caller, see sampling/internvl.py). Pass the tiles (pixels), or
    their `image_features` [n k D] computed beforehand."""
    x = self.language_model.embed(input_ids)
    if pixels is not None:
      features = self.image_features(pixels)
    if features is None:
      return x
    return scatter_placeholders(x, input_ids, features.reshape(-1, features.shape[-1]), self.cfg.image_token_id)

  def __call__(self, input_ids: jax.Array, pixels: jax.Array | None = None, *, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, return_hidden_states: bool = False,
               return_logits: bool = True) -> qwen.DecoderOutput:
    """input_ids [b t], pixels [n H W 3] (None: text only); positions / segment_ids as models/qwen.py."""
    return self.language_model(inputs_embeds=self.embed(input_ids, pixels), positions=positions,
                               segment_ids=segment_ids, return_hidden_states=return_hidden_states,
                               return_logits=return_logits)


def example_inputs(cfg: InternVLConfig) -> tuple:
  """Inputs that build every param: one token and one tile of one merged token (s x s patches)."""
  side = cfg.shuffle * cfg.vision.patch
  return jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, side, side, cfg.vision.channels), jnp.float32)

