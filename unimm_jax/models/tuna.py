"""TUNA: a native unified multimodal model (understanding, text-to-image, editing).

Paper: TUNA (seed 003). Reference: facebookresearch/tuna-2 tuna/models/tuna.py (Tuna, variant A),
tuna_2_pixel.py (TUNA-2), tuna_2r_pixel.py (TUNA-R), backbones/modules_new_mm.py (head).
Shapes: b batch, t tokens of a packed row, n image spans per row, d LLM embed, v vocab,
o = p * p * channels values per image token (a p x p patch of the generated space).

One packed row holds text, images and video clips of several samples. Every image is a span
  [time slot] [image token] * (T * h * w)        (row-major frame, y, x over its token grid; T = 1 for an image)
whose tokens attend to each other bidirectionally inside an otherwise causal mask. The image tokens
carry the noisy patches x_t of the generated space (Wan 2.2 latents for TUNA, pixels for TUNA-2 and
TUNA-R); a representation encoder turns them into LLM embeddings: SigLIP over x_t + `siglip_proj`
(TUNA: 1x1 conv over 48 latent channels; TUNA-R: patch-16 conv over pixels) or a plain patch
embedding + RMSNorm (TUNA-2); SigLIP sees each frame of a clip as its own image, the patch stem works
per token. The time slot holds the image's timestep embedding. The Qwen2.5 decoder runs over the row
(LLM positions count every token, frames included, as the reference's arange); the flow head reads its
last hidden state and predicts, per image token, the velocity x1 - x0 (or x1 for x0-prediction), with
t = 1 meaning clean; its 3D RoPE advances the time axis per frame (thw).

The packed batch is the schema of unimm_jax/batch.py (`batch.KEYS`; the model reads `schema.MODEL_INPUTS`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from einops import rearrange

from unimm_jax import schema
from unimm_jax.layers import DenseGeneral, RMSNorm
from unimm_jax.layers.modulation import AdaLNModulation, TimestepEmbedder
from unimm_jax.layers.stack import build_layers, run_layers
from unimm_jax.models import qwen, siglip
from unimm_jax.models.codec import LatentNorm
from unimm_jax.models.config import DictConfig
from unimm_jax.models.tuna_head import FinalLayer, ModulatedBlock, TunaHeadConfig, tuna_rope_fn

ENCODERS = ("siglip", "patch")
PREDICTIONS = ("velocity", "x0")
LATENT_STATS = ("mean_is_std", "codec")


SIGLIP_ON_LATENTS = siglip.SiglipVisionConfig.so400m(
    patch=1, image_size=32, channels=48, post_layernorm=False, use_head=False, feature_layer=-2)


@dataclasses.dataclass(frozen=True)
class TunaConfig(DictConfig):
  llm: qwen.QwenConfig
  head: TunaHeadConfig
  encoder: str = "siglip"                            # siglip (TUNA, TUNA-R) | patch (TUNA-2)
  siglip: siglip.SiglipVisionConfig | None = None    # the representation encoder when encoder == siglip
  space: str = "latent"                              # latent (a VAE encodes images) | pixel
  channels: int = 48                                 # channels of the generated space
  patch: int = 1                                     # image token = patch x patch of the generated space
  # > 0: learned row and column embeddings added to the patch stem's image tokens, for token grids up to this
  # many a side (our addition, not in TUNA-2: configs/tuna_tiny.py says why); 0: none, as TUNA-2
  patch_positions: int = 0
  prediction: str = "velocity"                       # velocity (TUNA) | x0 (TUNA-2)
  time_frequency_dim: int = 256
  # Latent space: the reference normalises Wan 2.2 latents as (z - std) / std -- it was trained with mean = std
  # (REFERENCE.md) -- so converted checkpoints only work with that quirk; "codec": the codec's own statistics.
  latent_stats: str = "mean_is_std"                  # mean_is_std | codec
  proj_norm_eps: float = 1e-6                        # siglip_proj's RMSNorm (the reference's RMSNorm default)
  # The reference's `add_aspect_ratio_embeds`: every span opens with a height and a width slot before its time slot,
  # holding `aspect_ratio_embed` (a TimestepEmbedder of the head's width) of the token grid's rows and columns.
  # Tuna.__init__ defaults it to True, but every released config (configs/model/tuna_*.yaml) sets it False: so do we.
  aspect_ratio_embeds: bool = False
  # A flow head narrower or wider than the LLM (head.embed != llm.embed, the reference's
  # separate_diffusion_head_config) gets the reference's projections: diff_proj (Linear -> GELU -> Linear) from
  # the LLM's last hidden state into the head, and time_embed_proj / ar_embed_proj from the head's embeddings
  # to the LLM's input slots.

  def __post_init__(self):
    if self.encoder not in ENCODERS:
      raise ValueError(f"TunaConfig.encoder {self.encoder!r} is not one of {ENCODERS}")
    if self.patch_positions and self.encoder != "patch":
      raise ValueError(f"TunaConfig.patch_positions {self.patch_positions} needs encoder 'patch' (SigLIP has its "
                       f"own position embeddings); encoder is {self.encoder!r}")
    if self.latent_stats not in LATENT_STATS:
      raise ValueError(f"TunaConfig.latent_stats {self.latent_stats!r} is not one of {LATENT_STATS}")
    if self.prediction not in PREDICTIONS:
      raise ValueError(f"TunaConfig.prediction {self.prediction!r} is not one of {PREDICTIONS}")
    if self.encoder == "siglip" and self.siglip is None:
      raise ValueError("TunaConfig: encoder 'siglip' needs a siglip config")
    if self.head.out_features != self.patch * self.patch * self.channels:
      raise ValueError(f"TunaConfig: head.out_features {self.head.out_features} != patch^2 * channels "
                       f"{self.patch * self.patch * self.channels}")
    if self.siglip is not None and self.siglip.patch * self.siglip.patch * self.siglip.channels != self.token_features:
      raise ValueError(f"TunaConfig: SigLIP patches of {self.siglip.patch}x{self.siglip.patch}x{self.siglip.channels} "
                       f"do not match image tokens of {self.token_features} values")

  def check_grid(self, h: int, w: int, where: str) -> None:
    """Raises if an h x w token grid has rows or columns past the patch stem's position tables."""
    if self.patch_positions and max(h, w) > self.patch_positions:
      raise ValueError(f"{where}: an image of {h}x{w} tokens is larger than TunaConfig.patch_positions = "
                       f"{self.patch_positions}, the patch stem's learned row/column tables")

  def latent_norm(self, codec_cfg: Any) -> LatentNorm:
    """Codec latents <-> the latents this TUNA generates (models/codec.py)."""
    if self.latent_stats == "codec":
      return codec_cfg.latent_norm()
    return LatentNorm(codec_cfg.latent_norm().std, codec_cfg.latent_norm().std)

  @property
  def token_features(self) -> int:
    return self.patch * self.patch * self.channels

  @property
  def meta_slots(self) -> int:
    """Slots opening each span before its image tokens: [height] [width] [time] or [time]."""
    return 3 if self.aspect_ratio_embeds else 1

  # Released sizes: tuna-2 configs/model/tuna_{2b,7b}.yaml (LLMs from their HF config.json; SigLIP so400m on
  # 48-channel Wan 2.2 latents, 32x32 position table, 26 of 27 layers; head_dim 64); TUNA-2 is the pixel variant.
  @classmethod
  def sized(cls, llm: qwen.QwenConfig, head_depth: int, head_heads: int, head_kv_heads: int, head_dim: int = 64,
            **kw) -> "TunaConfig":
    """A TUNA whose flow head has the LLM's width and MLP."""
    out = kw.get("patch", 1) ** 2 * kw.get("channels", 48)
    head = TunaHeadConfig(embed=llm.embed, mlp=llm.mlp, depth=head_depth, heads=head_heads, kv_heads=head_kv_heads,
                          head_dim=head_dim, out_features=out)
    return cls(llm=llm, head=head, **kw)

  @classmethod
  def tuna_2b(cls) -> "TunaConfig":
    return cls.sized(qwen.QwenConfig.qwen2_5_1_5b(), 40, 24, 8, siglip=SIGLIP_ON_LATENTS)

  @classmethod
  def tuna_7b(cls) -> "TunaConfig":
    return cls.sized(qwen.QwenConfig.qwen2_5_7b(), 16, 56, 14, siglip=SIGLIP_ON_LATENTS)

  @classmethod
  def tuna2_7b(cls) -> "TunaConfig":
    return cls.sized(qwen.QwenConfig.qwen2_5_7b(), 16, 56, 14, encoder="patch", space="pixel", channels=3, patch=16,
                     prediction="x0")

  @classmethod
  def tiny(cls) -> "TunaConfig":
    """A CPU-sized TUNA-2 (pixel patches, x0 prediction)."""
    return cls.sized(qwen.QwenConfig.tiny(), 2, 4, 2, head_dim=16, encoder="patch", space="pixel", channels=3,
                     patch=4, prediction="x0")

  def with_runtime(self, **kw) -> "TunaConfig":
    """The same model with runtime choices (dtype, param_dtype, remat, scan_layers, attention_impl) set on every
    part that has them."""
    def set_on(part):
      return part and dataclasses.replace(part, **{k: v for k, v in kw.items() if hasattr(part, k)})
    return dataclasses.replace(self, llm=set_on(self.llm), head=set_on(self.head), siglip=set_on(self.siglip))



# Real sizes train and sample with bf16 compute and rematerialised layers.
VARIANTS = {
    "tiny": TunaConfig.tiny,
    "2b": lambda: TunaConfig.tuna_2b().with_runtime(dtype="bfloat16", remat="dots"),
    "7b": lambda: TunaConfig.tuna_7b().with_runtime(dtype="bfloat16", remat="dots"),
    "tuna2_7b": lambda: TunaConfig.tuna2_7b().with_runtime(dtype="bfloat16", remat="dots"),
}


def variant(name: str) -> TunaConfig:
  if name not in VARIANTS:
    raise ValueError(f"unknown TUNA variant {name!r}; choose one of {sorted(VARIANTS)}")
  return VARIANTS[name]()


@flax.struct.dataclass
class TunaOutput:
  logits: jax.Array | None      # [b t v] fp32
  prediction: jax.Array         # [b t o] velocity (or x1) at every position; read it at image tokens
  hidden_states: tuple | None   # LLM hidden states when requested (depth + 1 entries)


def frame_segments(span_ids: jax.Array, time_slot: jax.Array, thw: jax.Array) -> jax.Array:
  """int32 [b t]: the representation encoder's image of each image token, one per (span, frame) -- a video
  span's frames are separate images, as the reference's reshape_frame_to_batch_dim -- numbered 1 + the row
  index of the frame's first token (unique in the row); 0 outside image tokens."""
  image = schema.image_tokens(span_ids, time_slot)
  frame = thw[..., 0]
  shift = lambda a, fill: jnp.concatenate([jnp.full_like(a[:, :1], fill), a[:, :-1]], axis=1)
  same = shift(image, False) & (shift(span_ids, 0) == span_ids) & (shift(frame, 0) == frame)
  idx = jnp.broadcast_to(jnp.arange(span_ids.shape[1], dtype=jnp.int32), span_ids.shape)
  first = jax.lax.cummax(jnp.where(image & ~same, idx, 0), axis=1)
  return jnp.where(image, first + 1, 0)


class PatchEncoder(nn.Module):
  """TUNA-2 stem: a stride-p patch embedding (a dense [p p c d] kernel, the conv's HWIO) + RMSNorm, plus
  learned row and column embeddings when `positions` > 0 (TunaConfig.patch_positions)."""

  features: int
  patch: int
  channels: int
  positions: int = 0
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, thw: jax.Array) -> jax.Array:
    """[b t (p p c)], (frame, row, column) [b t 3] -> [b t d]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = rearrange(x, "b t (p q c) -> b t p q c", p=self.patch, q=self.patch)
    h = DenseGeneral((self.patch, self.patch, self.channels), (self.features,), (None, None, None, "embed"),
                     use_bias=True, name="patch_embedding", **kw)(x)
    # torch.nn.RMSNorm(eps=None) uses the dtype's machine epsilon
    h = RMSNorm(self.features, float(jnp.finfo(jnp.float32).eps), name="norm", **kw)(h)
    if not self.positions:
      return h
    # std 1, the scale of the normed patch embedding: at the noisy t where sampling places objects, that
    # embedding is of near-pure noise, and a 0.02 table stayed drowned in it (a linear read-out of the token's
    # column from the LLM input at t = 0.02: 0.67, chance 0.5); configs/tuna_tiny.py has the runs
    init = nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, "embed"))
    rows, cols = (self.param(n, init, (self.positions, self.features), self.param_dtype)
                  for n in ("row_embedding", "column_embedding"))
    return h + (rows[thw[..., 1]] + cols[thw[..., 2]]).astype(h.dtype)


class SiglipProjector(nn.Module):
  """RMSNorm -> Linear -> GELU -> Linear: SigLIP features [b t c] -> LLM embeddings [b t d]."""

  in_features: int
  features: int
  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = RMSNorm(self.in_features, self.eps, name="layers_0", **kw)(x)
    h = DenseGeneral((self.in_features,), (self.features,), ("mlp", "embed"), True, name="layers_1", **kw)(h)
    h = jax.nn.gelu(h, approximate=False)
    return DenseGeneral((self.features,), (self.features,), ("mlp", "embed"), True, name="layers_3", **kw)(h)


class HeadProjector(nn.Module):
  """The reference's diff_proj: Linear -> GELU -> Linear, the LLM's last hidden state [b t d] -> the head's [b t e]."""

  in_features: int
  features: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = DenseGeneral((self.in_features,), (self.features,), ("embed", "mlp"), True, name="layers_0", **kw)(x)
    h = jax.nn.gelu(h, approximate=False)
    return DenseGeneral((self.features,), (self.features,), ("mlp", "embed"), True, name="layers_2", **kw)(h)


class Tuna(nn.Module):
  cfg: TunaConfig

  def setup(self):
    cfg = self.cfg
    kw = dict(dtype=jnp.dtype(cfg.llm.dtype), param_dtype=jnp.dtype(cfg.llm.param_dtype))
    self.llm = qwen.Qwen(cfg.llm)
    if cfg.encoder == "siglip":
      self.vision_model = siglip.VisionTransformer(cfg.siglip)
      self.siglip_proj = SiglipProjector(cfg.siglip.embed, cfg.llm.embed, cfg.proj_norm_eps, **kw)
    else:
      self.vision_encoder = PatchEncoder(cfg.llm.embed, cfg.patch, cfg.channels, cfg.patch_positions, **kw)
    self.time_embed = TimestepEmbedder(cfg.head.embed, cfg.time_frequency_dim, **kw)
    if cfg.aspect_ratio_embeds:
      self.aspect_ratio_embed = TimestepEmbedder(cfg.head.embed, cfg.time_frequency_dim, **kw)
    if cfg.head.share_adaln:
      self.shared_adaln = AdaLNModulation(cfg.head.embed, 6, **kw)
    if cfg.head.embed != cfg.llm.embed:
      self.diff_proj = HeadProjector(cfg.llm.embed, cfg.head.embed, **kw)
      to_llm = lambda name: DenseGeneral((cfg.head.embed,), (cfg.llm.embed,), ("mlp", "embed"), True, name=name, **kw)
      self.time_embed_proj = to_llm("time_embed_proj")
      if cfg.aspect_ratio_embeds:
        self.ar_embed_proj = to_llm("ar_embed_proj")
    # a Python loop: the blocks take a RoPE closure, which nn.scan cannot broadcast
    self.diffusion_head_a = build_layers(ModulatedBlock, cfg.head.depth, cfg.head, scan=False, shared=4,
                                         name="diffusion_head_a")
    self.diffusion_head_b = FinalLayer(cfg.head)

  def encode_images(self, batch: Mapping[str, jax.Array]) -> jax.Array:
    """x_t at image tokens -> LLM embeddings [b t d] (garbage outside image tokens; masked by the caller)."""
    cfg = self.cfg
    x_t = batch["x_t"]
    if cfg.encoder == "patch":
      return self.vision_encoder(x_t, batch["thw"])
    # One SigLIP image per (span, frame): the reference folds a clip's frames into SigLIP's batch
    # (reshape_frame_to_batch_dim), so a frame attends only to itself and keeps SigLIP's sequences short.
    seg = frame_segments(batch["span_ids"], batch["time_slot"], batch["thw"])
    shapes = schema.gather_spans(batch["spatial_shapes"], batch["span_ids"], 0)   # [b t 2] each token's grid
    pos = batch["thw"][..., 1] * jnp.maximum(shapes[..., 1], 1) + batch["thw"][..., 2]
    # segment s is the frame whose first token sits at s - 1, so the token table is SigLIP's per-image table
    feats = self.vision_model(patches=x_t, spatial_shapes=shapes, segment_ids=seg, positions=pos)
    return self.siglip_proj(feats.last_hidden_state)

  def embed_inputs(self, batch: Mapping[str, jax.Array], t_embed: jax.Array | None = None) -> jax.Array:
    """The LLM's input row [b t d]: token embeddings, encoded images at image tokens, time embeddings
    at time slots, and with aspect-ratio embeddings those of the grid's rows and columns at the height and
    width slots (the reference's _prepare_input; also the prefill of understanding generation)."""
    cfg = self.cfg
    span_ids, time_slot = batch["span_ids"], batch["time_slot"]
    if t_embed is None:
      t_embed = self.time_embed(batch["span_t"])
    if cfg.head.embed != cfg.llm.embed:
      t_embed = self.time_embed_proj(t_embed)
    image = schema.image_tokens(span_ids, time_slot)[..., None]
    x = self.llm.embed(batch["input_ids"])
    x = jnp.where(image, self.encode_images(batch).astype(x.dtype), x)
    if not cfg.aspect_ratio_embeds:
      return jnp.where(time_slot[..., None], schema.gather_spans(t_embed, span_ids, 0.0).astype(x.dtype), x)
    # the reference embeds the token grid's size (h // p, w // p) as it embeds a time: integers, unscaled
    hw = self.aspect_ratio_embed(batch["spatial_shapes"].astype(jnp.float32))         # [b n 2 e]
    if cfg.head.embed != cfg.llm.embed:
      hw = self.ar_embed_proj(hw)
    slot = schema.span_slots(span_ids)
    for k, table in enumerate((hw[..., 0, :], hw[..., 1, :], t_embed)):  # <height> <width> <time>
      x = jnp.where((time_slot & (slot == k))[..., None], schema.gather_spans(table, span_ids, 0.0).astype(x.dtype), x)
    return x

  def __call__(self, batch: Mapping[str, jax.Array], *, return_logits: bool = True,
               return_hidden_states: bool = False) -> TunaOutput:
    """Packed batch (schema.MODEL_INPUTS) -> logits at every position and the flow prediction at every position."""
    schema.check(batch, "Tuna")
    span_ids, time_slot = batch["span_ids"], batch["time_slot"]
    t_embed = self.time_embed(batch["span_t"])                                    # [b n d]
    x = self.embed_inputs(batch, t_embed)
    out = self.llm(inputs_embeds=x, positions=batch["positions"], segment_ids=batch["segment_ids"],
                   span_ids=span_ids, return_logits=return_logits, return_hidden_states=return_hidden_states)
    h = out.last_hidden_state
    cfg = self.cfg
    if cfg.head.embed != cfg.llm.embed:
      h = self.diff_proj(h)
    rope_fn = tuna_rope_fn(cfg.head, batch["positions"], span_ids, time_slot, batch["thw"], cfg.meta_slots,
                           batch["spatial_shapes"])
    # share_adaln: the blocks add their tables to one projection of the time embedding
    cond = jnp.concatenate(self.shared_adaln(t_embed), axis=-1) if cfg.head.share_adaln else t_embed
    h, _, _ = run_layers(self.diffusion_head_a, h, None, cond, span_ids, rope_fn, batch["segment_ids"])
    prediction = self.diffusion_head_b(h, t_embed, span_ids)
    return TunaOutput(logits=out.logits, prediction=prediction.astype(jnp.float32), hidden_states=out.hidden_states)
