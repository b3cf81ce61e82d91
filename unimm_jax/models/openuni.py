"""OpenUni: a frozen InternVL3 whose last hidden states at 256 learned queries condition SANA through a connector.

Paper / code: OpenUni (seed 000; wusize/OpenUni src/models/openuni/internvl3_sana_hf.py `OpenUniInternVL3SANAHF`,
src/models/connector/modeling_connector.py).
Shapes: b batch, t prompt tokens, q queries (256), D LLM width, k SANA caption channels, h w c latents (NHWC).

The prompt (right-padded, or left-padded in the edit training collate) is followed by the q `meta_queries`,
*after* the padding: mask = [prompt mask, ones(q)], positions = cumsum(mask) - 1 clamped at 0, so the queries
continue right after the last real token. The causal LLM's last hidden state (after its final RMSNorm) at the q
query slots -> connector (SigLIP encoder layers: no mask, no position embedding, no final norm) -> projector
(Linear D -> k) = SANA's `prompt_embeds`. Editing writes InternViT features of the source image into the
`<IMG_CONTEXT>` slots of the prompt (InternVL's own path). The frozen parts are the existing models: InternVL
(`lmm`), SanaTransformer (`transformer`), AutoencoderDC (`vae`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unimm_jax.layers import DenseGeneral
from unimm_jax.layers.block import PreLNBlock
from unimm_jax.layers.stack import build_layers, run_layers
from unimm_jax.models import dc_ae, internvl, sana
from unimm_jax.models.config import DictConfig
from unimm_jax.models.dc_ae import AutoencoderDC, AutoencoderDCConfig
from unimm_jax.models.internvl import InternVL, InternVLConfig
from unimm_jax.models.sana import SanaConfig, SanaTransformer

VARIANTS = ("tiny", "b512", "l512", "l1024")


@dataclasses.dataclass(frozen=True)
class ConnectorConfig(DictConfig):
  """The connector's SigLIP-style encoder (configuration_connector.py names in comments)."""

  embed: int = 896          # hidden_size (the LLM width: proj_type 'enc_proj')
  mlp: int = 3072           # intermediate_size
  depth: int = 6            # num_hidden_layers
  heads: int = 14           # num_attention_heads
  act: str = "gelu_pytorch_tanh"
  norm_eps: float = 1e-6


@dataclasses.dataclass(frozen=True)
class OpenUniConfig(DictConfig):
  lmm: InternVLConfig
  connector: ConnectorConfig
  transformer: SanaConfig
  vae: AutoencoderDCConfig
  num_queries: int = 256
  vit_input_size: int | None = None   # edit images are resized to this (None: the InternViT tile size)
  image_size: int = 512               # default generation size of the release
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    if self.connector.embed != self.lmm.llm.embed:
      raise ValueError(f"OpenUniConfig: connector width {self.connector.embed} must equal the LLM width "
                       f"{self.lmm.llm.embed} (proj_type 'enc_proj')")
    if self.connector.embed % self.connector.heads:
      raise ValueError(f"OpenUniConfig: connector width {self.connector.embed} is not divisible by its "
                       f"{self.connector.heads} heads")

  @property
  def edit_size(self) -> int:
    return self.vit_input_size or self.lmm.tile_size

  @property
  def image_tokens(self) -> int:
    """`<IMG_CONTEXT>` tokens of one edit image (one tile at edit_size)."""
    return (self.edit_size // self.lmm.vision.patch // self.lmm.shuffle) ** 2

  # Releases (reference openuni.md b): B-512 = InternVL3-1B + SANA-0.6B-512, L-512 = InternVL3-2B + SANA-1.6B-512,
  # L-1024 = InternVL3-2B + SANA1.5-1.6B-1024; the DC-AE f32c32 SANA 1.1 autoencoder in all three.
  @classmethod
  def b512(cls, **kw) -> "OpenUniConfig":
    return cls(**{**dict(lmm=InternVLConfig.internvl3_1b(), connector=ConnectorConfig(),
                         transformer=SanaConfig.sana_600m_512(), vae=AutoencoderDCConfig.sana_1_1()), **kw})

  @classmethod
  def l512(cls, **kw) -> "OpenUniConfig":
    return cls(**{**dict(lmm=InternVLConfig.internvl3_2b(), connector=ConnectorConfig(1536, 8960, 6, 24),
                         transformer=SanaConfig.sana_1600m_512(), vae=AutoencoderDCConfig.sana_1_1()), **kw})

  @classmethod
  def l1024(cls, **kw) -> "OpenUniConfig":
    return cls.l512(**{**dict(transformer=SanaConfig.sana1_5_1600m_1024(), image_size=1024), **kw})

  @classmethod
  def tiny(cls, **kw) -> "OpenUniConfig":
    lmm = InternVLConfig.tiny()
    return cls(**{**dict(lmm=lmm, connector=ConnectorConfig(lmm.llm.embed, 2 * lmm.llm.embed, 2, lmm.llm.heads),
                         transformer=SanaConfig.tiny(), vae=AutoencoderDCConfig.tiny(), num_queries=8,
                         image_size=32), **kw})

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "OpenUniConfig":
    d = dict(d)
    d["lmm"] = InternVLConfig.from_dict(d["lmm"])
    return super().from_dict(d)


def variant(name: str) -> OpenUniConfig:
  if name not in VARIANTS:
    raise ValueError(f"OpenUni variant {name!r} is not one of {VARIANTS}")
  return getattr(OpenUniConfig, name)()


def config_from_hf(lmm: Mapping[str, Any], connector: Mapping[str, Any], transformer: Mapping[str, Any],
                   vae: Mapping[str, Any], **kw) -> OpenUniConfig:
  """The parts' config dicts (InternVLChatConfig, ConnectorConfig of configuration_connector.py, diffusers SANA and
  DC-AE config.json) -> OpenUniConfig; kw: num_queries, vit_input_size, image_token_id (InternVL3's <IMG_CONTEXT>)."""
  token = kw.pop("image_token_id", None)
  lmm_cfg = internvl.config_from_hf(lmm)
  if token is not None:
    lmm_cfg = dataclasses.replace(lmm_cfg, image_token_id=token)
  conn = ConnectorConfig(embed=connector["hidden_size"], mlp=connector["intermediate_size"],
                         depth=connector["num_hidden_layers"], heads=connector["num_attention_heads"],
                         act=connector.get("hidden_act", "gelu_pytorch_tanh"),
                         norm_eps=connector.get("layer_norm_eps", 1e-6))
  return OpenUniConfig(lmm=lmm_cfg, connector=conn, transformer=sana.config_from_diffusers(transformer),
                       vae=dc_ae.config_from_diffusers(vae), **kw)


def query_layout(attention_mask: jax.Array, num_queries: int) -> tuple[jax.Array, jax.Array]:
  """Prompt mask [b t] -> (LLM mask [b t+q] with the queries after the padding, positions cumsum(mask)-1 >= 0)."""
  mask = jnp.concatenate([attention_mask.astype(jnp.int32),
                          jnp.ones((attention_mask.shape[0], num_queries), jnp.int32)], axis=1)
  return mask, jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)


@dataclasses.dataclass
class Conditioning:
  prompt_embeds: jax.Array      # [b q k]
  query_hidden: jax.Array       # [b q D] LLM last hidden state at the queries
  connector_out: jax.Array      # [b q D]


class Connector(nn.Module):
  cfg: ConnectorConfig
  dtype: str = "float32"
  param_dtype: str = "float32"

  def setup(self):
    c = self.cfg
    self.layers = build_layers(PreLNBlock, c.depth, c.embed, c.heads, c.mlp, c.act, c.norm_eps, scan=False, shared=1,
                               dtype=jnp.dtype(self.dtype), param_dtype=jnp.dtype(self.param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    return run_layers(self.layers, x, None, None)[0]   # every query sees every query: no mask


class OpenUni(nn.Module):
  """Prompt ids (+ edit image tiles) -> SANA prompt_embeds; SANA velocity; DC-AE encode / decode."""

  cfg: OpenUniConfig

  def setup(self):
    cfg = self.cfg
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    d = cfg.lmm.llm.embed
    self.lmm = InternVL(cfg.lmm)
    # the reference draws them N(0, 1/sqrt(D)) (its __init__); converted checkpoints overwrite them
    self.meta_queries = self.param("meta_queries", nn.with_logical_partitioning(
        nn.initializers.normal(d ** -0.5), (None, "embed")), (cfg.num_queries, d), jnp.dtype(cfg.param_dtype))
    self.connector = Connector(cfg.connector, cfg.dtype, cfg.param_dtype)
    self.projector = DenseGeneral((d,), (cfg.transformer.caption_channels,), ("embed", None), True, **kw)
    self.transformer = SanaTransformer(cfg.transformer)
    self.vae = AutoencoderDC(cfg.vae)

  # The parts as standalone modules over their own params subtree (params["transformer"], params["lmm"]): what the
  # SANA sampler and the InternVL3 chat drive.
  @property
  def transformer_module(self) -> SanaTransformer:
    return SanaTransformer(self.cfg.transformer)

  @property
  def lmm_module(self) -> InternVL:
    return InternVL(self.cfg.lmm)

  def inputs_embeds(self, input_ids: jax.Array, vit_pixels: jax.Array | None = None) -> jax.Array:
    """[b t] ids -> [b t D]; with vit_pixels [n S S 3] (normalised), their features fill the `<IMG_CONTEXT>` slots
    in reading order (extract_feature: drop CLS, pixel shuffle, mlp1)."""
    return self.lmm.embed(input_ids, vit_pixels)

  def condition(self, input_ids: jax.Array, attention_mask: jax.Array, vit_pixels: jax.Array | None = None, *,
                inputs_embeds: jax.Array | None = None) -> Conditioning:
    """Prompt ids [b t] + mask [b t] (1 = token; any padding side) -> Conditioning (prompt_embeds [b q k])."""
    x = self.inputs_embeds(input_ids, vit_pixels) if inputs_embeds is None else inputs_embeds
    b = x.shape[0]
    queries = jnp.broadcast_to(self.meta_queries.astype(x.dtype)[None], (b, *self.meta_queries.shape))
    mask, positions = query_layout(attention_mask, self.cfg.num_queries)
    # segment 1 = real tokens and queries, 0 = padding (never a key); the LM head only runs at init, to build it
    out = self.lmm.language_model(inputs_embeds=jnp.concatenate([x, queries], axis=1), positions=positions,
                                  segment_ids=mask, return_logits=self.is_initializing())
    hidden = out.last_hidden_state[:, -self.cfg.num_queries:]
    connected = self.connector(hidden)
    return Conditioning(self.projector(connected).astype(jnp.float32), hidden, connected)

  def velocity(self, latents: jax.Array, prompt_embeds: jax.Array, timestep: jax.Array) -> jax.Array:
    """SANA on NHWC latents; `timestep` as the transformer gets it (all caption tokens valid)."""
    return self.transformer(latents, prompt_embeds, timestep)

  def encode(self, images: jax.Array) -> jax.Array:
    """[b H W 3] in [-1, 1] -> diffusion latents (vae.encode(x).latent * scaling_factor)."""
    return self.vae.normalize(self.vae.encode(images).mode())

  def decode(self, latents: jax.Array) -> jax.Array:
    """Diffusion latents -> [b H W 3], vae.decode(z / scaling_factor), not clamped."""
    return self.vae.decode(self.vae.denormalize(latents))

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, images: jax.Array, timestep: jax.Array,
               vit_pixels: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """One pass through every part (what init builds params with): -> (velocity at the clean latents of
    `images`, their reconstruction)."""
    latents = self.encode(images)
    v = self.velocity(latents, self.condition(input_ids, attention_mask, vit_pixels).prompt_embeds, timestep)
    return v, self.decode(latents)


def train_schedule(num_train_timesteps: int = 1000) -> tuple[np.ndarray, np.ndarray]:
  """FlowMatchEuler (shift 1) sigmas and timesteps, in diffusers' float32 arithmetic, on the host: sigmas = t / T,
  timesteps = sigmas * T (510.99997, not 511; XLA would turn the division into a reciprocal product)."""
  t = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1]
  sigmas = t / np.float32(num_train_timesteps)
  return sigmas, sigmas * np.float32(num_train_timesteps)


def flow_training_inputs(latents: jax.Array, noise: jax.Array, u: jax.Array, num_train_timesteps: int = 1000
                         ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """The original's diff_loss draw, given its randoms: clean latents x0, eps, u ~ U[0, 1) [b] -> (timestep [b] as the
  transformer gets it, sigma [b], x_t = (1 - sigma) x0 + sigma eps, target eps - x0). The training scheduler is
  FlowMatchEuler with shift 1 (only its own keys of the SANA config apply): timesteps T..1, index floor(T u)."""
  index = jnp.floor(u * num_train_timesteps).astype(jnp.int32)
  sigmas, timesteps = train_schedule(num_train_timesteps)
  sigma, timestep = jnp.asarray(sigmas)[index], jnp.asarray(timesteps)[index]
  s = sigma.reshape(-1, *([1] * (latents.ndim - 1)))
  return timestep, sigma, (1 - s) * latents + s * noise, noise - latents


def flow_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
  """Mean over each sample's elements, then over the batch (text2image_loss, weighting 'none')."""
  per = jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), axis=tuple(range(1, pred.ndim)))
  return jnp.mean(per)


def example_inputs(cfg: OpenUniConfig) -> tuple:
  """One token, one image of one latent pixel, one edit tile of one merged token: every param is built."""
  f, side = cfg.vae.spatial_downscale * cfg.transformer.patch_size, cfg.lmm.shuffle * cfg.lmm.vision.patch
  return (jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), jnp.int32), jnp.zeros((1, f, f, 3)), jnp.zeros((1,)),
          jnp.zeros((1, side, side, cfg.lmm.vision.channels)))
