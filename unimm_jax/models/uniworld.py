"""UniWorld-V1: a frozen Qwen2.5-VL whose last hidden states, projected by an MLP connector (and joined by the
projected SigLIP tokens of the reference images), condition a fine-tuned FLUX.1-dev transformer.

Paper: UniWorld: High-Resolution Semantic Encoders for Unified Visual Understanding and Generation (seed 004).
Reference: PKU-YuanGroup/UniWorld-V1 univa/models/qwen2p5vl/modeling_univa_qwen2p5vl.py
(UnivaQwen2p5VLForConditionalGeneration.forward with output_type="denoise_embeds", _insert_img_to_vlm),
univa/models/modeling_univa_denoise_tower.py (UnivaDenoiseTower: the projectors), univa/serve/cli.py (the
task head, the [t5, vlm] join).
Shapes: b batch, t prompt tokens, d VLM width, n reference images, k SigLIP tokens per image, s SigLIP width,
c FLUX context width (T5's 4096), t' = t + (images of the row) k.

Conditioning of FLUX (`denoise_embeds`): the VLM's last hidden state (after the final RMSNorm) of EVERY prompt
token -> denoise_projector (Linear-SiLU-Linear, named `mlp2x_gelu` in the original although it uses SiLU).
Each reference image's SigLIP `last_hidden_state` -> siglip_projector, inserted immediately before the j-th
`<|vision_end|>` of the batch (row-major), rows left-padded with zeros to the longest (`siglip_insertion`).
The pipeline then puts the T5 embeddings of the prompt in front (sampling/uniworld.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

from unimm_jax.convert.maps import qwen_vl as qwen_vl_map
from unimm_jax.layers import DenseGeneral
from unimm_jax.models import flux, qwen_vl, siglip
from unimm_jax.models.config import DictConfig, push_runtime
from unimm_jax.models.flux import FluxConfig
from unimm_jax.models.qwen_vl import QwenVLConfig, VisionInputs
from unimm_jax.models.siglip import SiglipVisionConfig


@dataclasses.dataclass(frozen=True)
class UniWorldConfig(DictConfig):
  vlm: QwenVLConfig
  denoiser: FluxConfig
  siglip: SiglipVisionConfig
  image_end_token_id: int = 151653         # config.image_end_token_id: the `<|vision_end|>` id (train_denoiser.py)
  vae_input: int = 64                      # vae_projector input (packed VAE latents; trained, unused at inference)
  task_head: bool = False                  # the gen-vs-answer router of task_head_final.pt
  task_head_hidden: int = 10240            # cli.py: Linear(3584, 10240) -> SiLU -> Dropout -> Linear(10240, 2)
  # Runtime choices for every tower: they change speed and memory, never the numbers.
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_impl: str = "auto"
  # the router's token is found from the tokenizer (sampling/uniworld.assistant_index), not stored as an id
  RETIRED_FIELDS: ClassVar[tuple[str, ...]] = ("assistant_token_id",)

  def __post_init__(self):
    push_runtime(self, ("vlm", "denoiser", "siglip"), ("dtype", "param_dtype", "attention_impl"))

  @property
  def context_dim(self) -> int:
    """Width of every projector's output = FLUX's joint_attention_dim (the original's output_hidden_size)."""
    return self.denoiser.context_dim

  @property
  def siglip_tokens(self) -> int:
    return self.siglip.posemb_grid ** 2

  # The release: Qwen2.5-VL-7B-Instruct, FLUX.1-dev, google/siglip2-so400m-patch16-512 (read by
  # SiglipVisionModel: the fixed-resolution SigLIP layout, 32 x 32 = 1024 tokens of width 1152).
  @classmethod
  def release(cls, **kw) -> "UniWorldConfig":
    return cls(**{**dict(vlm=QwenVLConfig.qwen2_5_vl_7b(), denoiser=FluxConfig.dev(),
                         siglip=SiglipVisionConfig.so400m(patch=16, image_size=512, use_head=False),
                         task_head=True), **kw})

  @classmethod
  def tiny(cls, **kw) -> "UniWorldConfig":
    vlm = QwenVLConfig.tiny()
    return cls(**{**dict(vlm=vlm, denoiser=FluxConfig.tiny(),
                         siglip=SiglipVisionConfig.tiny(use_head=False),
                         image_end_token_id=vlm.vision_end_token_id, task_head_hidden=32), **kw})


def config_from_hf(d: Mapping[str, Any], siglip_config: Mapping[str, Any], task_head_hidden: int | None = None
                   ) -> UniWorldConfig:
  """The release's config.json (model_type univa_qwen2p5vl, with `denoise_tower.denoiser_config`) and SigLIP's
  config.json -> UniWorldConfig; task_head_hidden: the router's width (None: no router)."""
  d = dict(d)
  if d.get("model_type") != "univa_qwen2p5vl":
    raise ValueError(f"unsupported model_type {d.get('model_type')!r}; supported: ('univa_qwen2p5vl',)")
  tower = d.get("denoise_tower") or {}
  if tower.get("denoiser_type", "flux") != "flux":
    raise NotImplementedError(f"denoise_tower.denoiser_type {tower.get('denoiser_type')!r} is not supported (flux)")
  if "image_end_token_id" not in d:
    raise ValueError("config.json has no image_end_token_id (train_denoiser.py sets it to the <|vision_end|> id)")
  # transformers 4.50 writes the vision_config with model_type qwen2_5_vl, which reads as a whole VL config
  vision = {**(d.get("vision_config") or {}), "model_type": "qwen2_5_vl_vision"}
  vlm = qwen_vl.config_from_hf({**d, "model_type": "qwen2_5_vl", "vision_config": vision})
  denoiser = flux.config_from_diffusers(tower.get("denoiser_config") or {})
  # the original reads last_hidden_state only: the MAP pooling head is not built
  sig = dataclasses.replace(siglip.config_from_hf(siglip_config), use_head=False)
  for name, want, got in (("input_hidden_size", vlm.text.embed, tower.get("input_hidden_size", vlm.text.embed)),
                          ("output_hidden_size", denoiser.context_dim,
                           tower.get("output_hidden_size", denoiser.context_dim)),
                          ("siglip_hidden_size", sig.embed, tower.get("siglip_hidden_size", sig.embed))):
    if want != got:
      raise ValueError(f"denoise_tower.{name} {got} does not match the towers' width {want}")
  return UniWorldConfig(vlm=vlm, denoiser=denoiser, siglip=sig, image_end_token_id=int(d["image_end_token_id"]),
                        vae_input=int(tower.get("vae_input_hidden_size", 64)), task_head=task_head_hidden is not None,
                        task_head_hidden=task_head_hidden or UniWorldConfig.task_head_hidden)


class Connector(nn.Module):
  """[... i] -> [... o]: Linear(i, m) -> SiLU -> Linear(m, o), the original's `nn.Sequential` indices 0 and 2."""

  widths: tuple[int, int, int]
  out_axis: str | None = "embed"   # None for the task head's 2 logits (too few to shard)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    i, m, o = self.widths
    kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.silu(DenseGeneral((i,), (m,), ("embed", "mlp"), name="layers_0", **kw)(x))
    return DenseGeneral((m,), (o,), ("mlp", self.out_axis), name="layers_2", **kw)(x)


@flax.struct.dataclass
class Insertion:
  """Where the rows of [text tokens (b t); SigLIP tokens (n k); one zero row] go in the joined [b t'] sequence
  (`siglip_insertion`), and which of its tokens are real (left padding is 0)."""

  index: jax.Array   # [b t'] int32
  mask: jax.Array    # [b t'] int32


def siglip_insertion(input_ids: np.ndarray, image_end_token_id: int, images: int, tokens: int) -> Insertion:
  """_insert_img_to_vlm as a gather: image j of the batch (row-major) goes immediately before the j-th
  `<|vision_end|>`; rows are left-padded to the longest. Raises unless there is one image per `<|vision_end|>`."""
  ids = np.asarray(input_ids)
  b, t = ids.shape
  ends = [np.flatnonzero(row == image_end_token_id) for row in ids]
  if sum(map(len, ends)) != images:
    raise ValueError(f"siglip_insertion: {images} reference image(s) for {sum(map(len, ends))} <|vision_end|> "
                     f"token(s) (id {image_end_token_id}) in the prompt(s); the original needs one per image")
  length = t + tokens * max(map(len, ends))
  pad_row = b * t + images * tokens
  index = np.full((b, length), pad_row, np.int64)
  mask = np.zeros((b, length), np.int32)
  image = 0
  for r in range(b):
    pieces, start = [], 0
    for pos in ends[r]:
      pieces += [r * t + np.arange(start, pos), b * t + image * tokens + np.arange(tokens)]
      start, image = pos, image + 1
    pieces.append(r * t + np.arange(start, t))
    row = np.concatenate(pieces)
    index[r, length - len(row):] = row
    mask[r, length - len(row):] = 1
  return Insertion(jnp.asarray(index, jnp.int32), jnp.asarray(mask))


class UniWorld(nn.Module):
  """The UniWorld-V1 checkpoint: `vlm` (Qwen2.5-VL), the connectors, `denoiser` (FLUX), `siglip`, `task_head`."""

  cfg: UniWorldConfig

  def setup(self):
    cfg = self.cfg
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    c = cfg.context_dim
    self.vlm = qwen_vl.QwenVL(cfg.vlm)
    self.denoiser = flux.FluxTransformer2DModel(cfg.denoiser)
    self.siglip = siglip.VisionTransformer(cfg.siglip)
    # widths as the original's literals, written in terms of the towers (3 x 4096 = 12288, FLUX width 3072)
    self.denoise_projector = Connector((cfg.vlm.text.embed, 3 * c, c), **kw)
    self.siglip_projector = Connector((cfg.siglip.embed, 3 * c, c), **kw)
    self.vae_projector = Connector((cfg.vae_input, cfg.denoiser.embed, c), **kw)
    if cfg.task_head:
      self.task_head = Connector((cfg.vlm.text.embed, cfg.task_head_hidden, 2), out_axis=None, **kw)

  def hidden(self, input_ids: jax.Array, vision: VisionInputs | None = None, *,
             positions: jax.Array | None = None, segment_ids: jax.Array | None = None) -> jax.Array:
    """[b t] ids (+ the prompt's images) -> the VLM's last hidden state [b t d] (after the final norm)."""
    return self.vlm(input_ids, vision, positions=positions, segment_ids=segment_ids,
                    return_logits=False).last_hidden_state

  def siglip_features(self, pixels: jax.Array) -> jax.Array:
    """Reference images [n H W 3], SigLIP-normalised -> siglip_projector(last_hidden_state) [n k c]."""
    return self.siglip_projector(self.siglip(pixels).last_hidden_state)

  def denoise_embeds(self, input_ids: jax.Array, vision: VisionInputs | None = None, *,
                     positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
                     siglip_pixels: jax.Array | None = None, insertion: Insertion | None = None) -> jax.Array:
    """output_type="denoise_embeds": [b t'] FLUX text-stream features [b t' c]. With reference images
    (siglip_pixels [n H W 3] and their `siglip_insertion`) their projected SigLIP tokens are inserted."""
    text = self.denoise_projector(self.hidden(input_ids, vision, positions=positions, segment_ids=segment_ids))
    if (siglip_pixels is None) != (insertion is None):
      raise ValueError("UniWorld.denoise_embeds: siglip_pixels and insertion go together")
    if siglip_pixels is None:
      return text   # the original projects a zeros dummy and discards it: nothing to compute
    image = self.siglip_features(siglip_pixels).astype(text.dtype)
    rows = jnp.concatenate([rearrange(text, "b t c -> (b t) c"), rearrange(image, "n k c -> (n k) c"),
                            jnp.zeros((1, text.shape[-1]), text.dtype)])
    return jnp.take(rows, insertion.index, axis=0)

  def route(self, hidden: jax.Array, index: jax.Array) -> jax.Array:
    """Task-head logits [b 2] on hidden [b t d] at index [b], the last `assistant` token of each row
    (sampling/uniworld.assistant_index); logit 1 > logit 0 means generate. The head runs in float32 (cli.py)."""
    if not self.cfg.task_head:
      raise ValueError("UniWorld.route: this checkpoint has no task head (convert with --task_head)")
    picked = jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]
    return self.task_head(picked.astype(jnp.float32))

  def __call__(self, input_ids: jax.Array, vision: VisionInputs | None = None, siglip_pixels: jax.Array | None = None,
               insertion: Insertion | None = None, latents: jax.Array | None = None,
               pooled: jax.Array | None = None, timestep: jax.Array | None = None, img_ids: jax.Array | None = None,
               txt_ids: jax.Array | None = None, guidance: jax.Array | None = None,
               positions: jax.Array | None = None) -> dict[str, jax.Array]:
    """Everything at once (init and tests): the VLM logits, the denoise embeddings and, with latents, one FLUX
    velocity over them; the task head's logits when built; the vae_projector on zeros (it is trained only)."""
    out = self.vlm(input_ids, vision, positions=positions)
    embeds = self.denoise_embeds(input_ids, vision, positions=positions, siglip_pixels=siglip_pixels,
                                 insertion=insertion)
    result = {"logits": out.logits, "denoise_embeds": embeds,
              "vae_projector": self.vae_projector(jnp.zeros((1, 1, self.cfg.vae_input)))}
    if latents is not None:
      result["velocity"] = self.denoiser(latents, embeds, pooled, timestep, img_ids, txt_ids, guidance)
    if self.cfg.task_head:
      result["route"] = self.route(out.last_hidden_state, jnp.full((input_ids.shape[0],), input_ids.shape[1] - 1))
    return result


def example_inputs(cfg: UniWorldConfig) -> tuple:
  """Inputs that build every param: one image token, one SigLIP image of one patch, one latent token."""
  ids, vision = qwen_vl_map.example_inputs(cfg.vlm)
  p = cfg.siglip.patch
  index = Insertion(jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), jnp.int32))
  f = flux.example_inputs(cfg.denoiser)
  return (ids, vision, jnp.zeros((1, p, p, cfg.siglip.channels)), index, f[0], f[2], f[3], f[4],
          jnp.zeros((1, 3)), f[6])
