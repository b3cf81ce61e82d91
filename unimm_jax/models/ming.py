"""Ming-Lite-Uni: a frozen Qwen2.5 MLLM (window-attention ViT + M-RoPE LLM) conditioning SANA through multi-scale
learnable queries, a bidirectional Qwen2 connector, L2 normalisation and a two-LayerNorm MLP.

Paper: Ming-Lite-Uni (arXiv 2505.02471). Reference: inclusionAI/Ming, Ming-unify/Ming_Uni/ (MingUniInference.py
`image_gen_generate` / `append_understand_embeds_with_learnable_scales`, sana_loss.py `SanaModel_withMLP`,
process.py `MyProcessor`). Shapes: b batch, t tokens, d LLM width, c connector width, s scale side, n tokens of a
scale (s*s), q all query slots, o ViT output width, e SANA caption width.

The prompt ends with one `<image>` token; for generation it becomes, per scale s,
`<image> <imagePatch>*s^2 </image>` and the queries (4x4, then 8x8, then 16x16, row-major) are written into those
slots. An edit / question image fills its own `<imagePatch>` run earlier in the prompt with
L2norm(linear_proj(ViT)). Every `<imagePatch>` run is one M-RoPE "image": a query block has the grid
[1, 2, 2s^2] (t and h frozen, only w advances); positions come from models/qwen_vl.rope_index, whose rule is the
same. The LLM's last hidden states at the query slots -> proj_in -> the connector (a Qwen2 decoder run
bidirectionally at positions 0..n-1, each scale on its own) -> proj_out -> L2 normalise: the condition of that
scale. SANA sees it through `mlp` (fc1 -> LayerNorm -> ReLU -> fc2 -> LayerNorm), applied to the condition and to
zeros (the unconditional caption).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unimm_jax.data.qwen_vl import pack_vision
from unimm_jax.layers import DenseGeneral, LayerNorm, activation, scatter_placeholders
from unimm_jax.models import qwen, qwen_vit, qwen_vl
from unimm_jax.models.config import DictConfig, push_runtime
from unimm_jax.models.qwen_vit import QwenVisionConfig

MROPE_SECTIONS = (16, 24, 24)   # hard-coded in the reference's LLM constructor, whatever its config says


@dataclasses.dataclass(frozen=True)
class MingConfig(DictConfig):
  vision: QwenVisionConfig
  text: qwen.QwenConfig           # the MLLM's decoder (M-RoPE)
  connector: qwen.QwenConfig      # run bidirectionally; its embeddings and lm_head are unused
  mlp_hidden: int = 2048          # SANA-side MLP (sana_loss.py ToClipMLP: hard-coded 2048)
  caption_channels: int = 2304    # = the SANA transformer's caption_channels
  scales: tuple[int, ...] = (4, 8, 16)
  image_token_id: int = 151680    # <imagePatch>: the slots of images and of the queries
  image_start_token_id: int = 151681   # <image>
  image_end_token_id: int = 151682     # </image>
  eos_token_id: int = 151645      # <|im_end|>
  video_token_id: int = -1        # Ming has no video placeholders: matches no id (models/qwen_vl.rope_index reads it)
  tokens_per_second: float = 2.0
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = False
  remat: str = "none"
  attention_impl: str = "auto"

  def __post_init__(self):
    push_runtime(self, ("vision", "text", "connector"))
    if self.text.mrope_sections is None:
      raise ValueError("MingConfig: the MLLM decoder needs mrope_sections (M-RoPE)")
    if self.connector.mrope_sections is not None:
      raise ValueError("MingConfig: the connector uses 1-D RoPE (mrope_sections must be None)")

  @property
  def queries(self) -> int:
    return sum(s * s for s in self.scales)

  @classmethod
  def release(cls, connector: qwen.QwenConfig, **kw) -> "MingConfig":
    """inclusionAI/Ming-Lite-Uni: Qwen2.5-7B decoder, the Ming-Lite-Omni ViT (depth 32, 1280 wide, MLP 3456,
    window 112, out 8192), SANA-1.6B caption width 2304. The connector's size is not published: conversion reads it
    from connector/config.json, so it is an argument here."""
    vision = QwenVisionConfig(embed=1280, depth=32, heads=16, mlp=3456, out_embed=8192, window_size=112,
                              fullatt_blocks=(7, 15, 23, 31))
    text = qwen.QwenConfig.qwen2_5_7b(mrope_sections=MROPE_SECTIONS)
    return cls(vision=vision, text=text, connector=connector, **kw)

  @classmethod
  def tiny(cls, **kw) -> "MingConfig":
    """head_dim 128 because the M-RoPE sections are fixed at (16, 24, 24); the last ids carry Ming's tokens."""
    text = qwen.QwenConfig.tiny(vocab=256, embed=128, heads=1, kv_heads=1, head_dim=128, mrope_sections=MROPE_SECTIONS)
    ids = dict(image_token_id=252, image_start_token_id=253, image_end_token_id=254, eos_token_id=255)
    return cls(vision=QwenVisionConfig.tiny(out_embed=48), text=text, connector=qwen.QwenConfig.tiny(vocab=16),
               mlp_hidden=96, caption_channels=48, **{**ids, **kw})


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """torch.nn.functional.normalize(x, dim=-1): x / max(||x||, eps)."""
  x32 = x.astype(jnp.float32)
  return (x32 / jnp.maximum(jnp.linalg.norm(x32, axis=-1, keepdims=True), eps)).astype(x.dtype)


class CaptionMLP(nn.Module):
  """SanaModel_withMLP.mlp (ToClipMLP): fc1 -> LayerNorm -> ReLU -> fc2 -> LayerNorm (eps 1e-5): [.. d] -> [.. e]."""

  cfg: MingConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.cfg
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    x = DenseGeneral((cfg.text.embed,), (cfg.mlp_hidden,), ("embed", "mlp"), True, name="fc1", **kw)(x)
    x = nn.relu(LayerNorm(cfg.mlp_hidden, 1e-5, name="layer_norm1", **kw)(x))
    x = DenseGeneral((cfg.mlp_hidden,), (cfg.caption_channels,), ("mlp", "embed"), True, name="fc2", **kw)(x)
    return LayerNorm(cfg.caption_channels, 1e-5, name="layer_norm2", **kw)(x)


class Ming(nn.Module):
  """The MLLM side of Ming-Lite-Uni: prompt (+ image) -> per-scale SANA conditions, or -> logits (chat)."""

  cfg: MingConfig

  def setup(self):
    cfg = self.cfg
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    d, c, o = cfg.text.embed, cfg.connector.embed, cfg.vision.out_embed
    self.visual = qwen_vit.QwenVisionTransformer(cfg.vision)
    self.llm = qwen.Qwen(cfg.text)
    self.connector = qwen.Qwen(cfg.connector)
    self.linear_proj_0 = DenseGeneral((o,), (d,), ("mlp", "embed"), True, **kw)
    # a logical axis may name one dimension only (sharding): the square layer's input is sharded as an MLP's
    self.linear_proj_2 = DenseGeneral((d,), (d,), ("mlp", "embed"), True, **kw)
    self.proj_in = DenseGeneral((d,), (c,), ("embed", "mlp"), True, **kw)
    self.proj_out = DenseGeneral((c,), (d,), ("mlp", "embed"), True, **kw)
    # init as the release: L2-normalised randn per query
    init = nn.with_logical_partitioning(lambda key, shape: l2_normalize(jax.random.normal(key, shape)), (None, "embed"))
    self.query_tokens = {f"{s}x{s}": self.param(f"query_tokens_{s}x{s}", init, (s * s, d)) for s in cfg.scales}
    self.mlp = CaptionMLP(cfg)

  def image_features(self, vision: qwen_vl.VisionInputs) -> jax.Array:
    """Packed images -> [n d]: linear_proj(merged ViT tokens) in placeholder order (before the L2 norm)."""
    out = self.visual(vision.patches, vision.positions, vision.frame_ids, vision.window_ids).pooler_output
    features = jnp.take(out.reshape(-1, out.shape[-1]), vision.image_tokens, axis=0)
    return self.linear_proj_2(activation("gelu")(self.linear_proj_0(features)))

  def image_embeds(self, vision: qwen_vl.VisionInputs) -> jax.Array:
    """What the image slots hold: L2norm(image_features) [n d]."""
    return l2_normalize(self.image_features(vision))

  def embed(self, input_ids: jax.Array, vision: qwen_vl.VisionInputs | None = None, *,
            with_queries: bool = True) -> jax.Array:
    """[b t] -> [b t d]; the `<imagePatch>` slots of each row hold its image embeddings, then (with_queries) the
    336 queries. `prepare` checked the counts."""
    x = self.llm.embed(input_ids)
    rows = []
    if vision is not None:
      rows.append(self.image_embeds(vision).reshape(x.shape[0], -1, x.shape[-1]))
    if with_queries:
      queries = jnp.concatenate([self.query_tokens[f"{s}x{s}"] for s in self.cfg.scales]).astype(x.dtype)
      rows.append(jnp.broadcast_to(queries, (x.shape[0], *queries.shape)))
    if not rows:
      return x
    features = jnp.concatenate(rows, axis=1)
    return scatter_placeholders(x, input_ids, features.reshape(-1, x.shape[-1]), self.cfg.image_token_id)

  def connect(self, h: jax.Array) -> dict[str, jax.Array]:
    """LLM states at the query slots [b q d] -> {scale name: connector output [b n c], proj_out [b n d],
    condition [b n d]}: proj_in -> the bidirectional connector (each scale alone, positions 0..n-1) -> proj_out
    -> L2 normalise."""
    out, start = {}, 0
    for s in self.cfg.scales:
      n = s * s
      x = self.proj_in(h[:, start:start + n])
      ones = jnp.ones(x.shape[:2], jnp.int32)   # one span over all tokens: no causal mask (the reference's +1 mask)
      y = self.connector(inputs_embeds=x, segment_ids=ones, span_ids=ones, return_logits=False).last_hidden_state
      p = self.proj_out(y)
      out[f"{s}x{s}"] = {"connector": y, "proj_out": p, "cond": l2_normalize(p)}
      start += n
    return out

  def __call__(self, input_ids: jax.Array, positions: jax.Array, query_index: jax.Array,
               vision: qwen_vl.VisionInputs | None = None) -> dict[str, jax.Array]:
    """Generation: ids [b t] with the query blocks, M-RoPE positions [b t 3], query_index [b q] (slot positions,
    from `prepare`) -> {"hidden" [b q d], per scale {"connector" [b n c], "proj_out", "cond" [b n d], "caption"
    [b n e] (the SANA-side MLP of cond)}}."""
    x = self.embed(input_ids, vision)
    # init also builds the chat head (lm_head), which generation never reads
    h = self.llm(inputs_embeds=x, positions=positions, return_logits=self.is_initializing()).last_hidden_state
    h = jnp.take_along_axis(h, query_index[..., None], axis=1)
    scales = self.connect(h)
    for k, v in scales.items():
      v["caption"] = self.mlp(v["cond"])
    return {"hidden": h, **scales}

  def logits(self, input_ids: jax.Array, positions: jax.Array, vision: qwen_vl.VisionInputs | None = None,
             **decoder_kwargs) -> qwen.DecoderOutput:
    """Understanding: the LLM over the prompt (images in their slots, no queries)."""
    return self.llm(inputs_embeds=self.embed(input_ids, vision, with_queries=False), positions=positions,
                    **decoder_kwargs)


# ----------------------------------------------------------------------------------------------
# Host-side preparation (NumPy)
# ----------------------------------------------------------------------------------------------

# process.py MyProcessor: the prompt is tokenised in these pieces (question in between) and the ids concatenated
SYSTEM_PIECE = "<|im_start|>system\nYou are a helpful assistant."
USER_PIECE = "<|im_end|>\n<|im_start|>user\n"
ASSISTANT_PIECE = "<|im_end|>\n<|im_start|>assistant\n"


def prompt_ids(tokenizer, question: str, *, image_slots: int = 0, generate: bool = True) -> list[int]:
  """The reference's prompt ids: the pieces tokenised one by one (not the joined string). image_slots > 0 puts an
  image of that many merged tokens before the question (edit, understanding) as the reference writes it
  (`"<image>\n {question}"`, the tag expanded, then stripped); `generate` appends the `<image>` generation prefix."""
  if image_slots:
    question = ("<image>" + "<imagePatch>" * image_slots + "</image>\n " + question).strip()
  pieces = [SYSTEM_PIECE, USER_PIECE, question, ASSISTANT_PIECE] + (["<image>"] if generate else [])
  return [i for piece in pieces for i in tokenizer(piece, add_special_tokens=False)["input_ids"]]


def query_block(cfg: MingConfig) -> list[int]:
  """What replaces the final `<image>` for generation: `<image> <imagePatch>*s^2 </image>` per scale."""
  out = []
  for s in cfg.scales:
    out += [cfg.image_start_token_id, *[cfg.image_token_id] * (s * s), cfg.image_end_token_id]
  return out


def expand_generation(ids: Sequence[int], cfg: MingConfig) -> list[int]:
  """A prompt ending with `<image>` (the processor's generation prefix) -> the ids the LLM runs."""
  ids = list(ids)
  if not ids or ids[-1] != cfg.image_start_token_id:
    raise ValueError(f"expand_generation: the prompt must end with <image> (id {cfg.image_start_token_id}); it ends "
                     f"with {ids[-1:]}")
  return ids[:-1] + query_block(cfg)


def image_slots(grid: Sequence[int], merge: int) -> int:
  t, h, w = (int(v) for v in grid)
  return t * h * w // (merge * merge)


def prepare(input_ids: np.ndarray, cfg: MingConfig, *, pixel_values: np.ndarray | None = None,
            image_grid_thw: Sequence[Sequence[int]] = (), generate: bool = True) -> dict:
  """Expanded ids [b t] (+ the processor's patches [N P] and grids of the images, in order) -> keyword arguments of
  Ming (positions [b t 3], vision, and with `generate` query_index [b q]).

  The query blocks count as images of grid [1, 2, 2s^2] for the M-RoPE positions."""
  ids = np.asarray(input_ids)
  grids = [tuple(int(v) for v in g) for g in image_grid_thw]
  if bool(grids) != (pixel_values is not None):
    raise ValueError(f"prepare: pixel_values and image_grid_thw go together ({len(grids)} grids, pixel_values "
                     f"{'given' if pixel_values is not None else 'missing'})")
  per_row = len(grids) // ids.shape[0] if grids else 0
  if per_row * ids.shape[0] != len(grids):
    raise ValueError(f"prepare: {len(grids)} image grids for {ids.shape[0]} rows (each row needs as many)")
  merge = cfg.vision.merge
  query_grids = [(1, 2, 2 * s * s) for s in cfg.scales] if generate else []
  want = sum(image_slots(g, merge) for g in grids) // max(ids.shape[0], 1) + cfg.queries * generate
  all_grids = []
  for row in range(ids.shape[0]):
    got = int(np.sum(ids[row] == cfg.image_token_id))
    if got != want:
      raise ValueError(f"prepare: row {row} has {got} <imagePatch> slots (id {cfg.image_token_id}); its images and "
                       f"{'queries' if generate else 'no queries'} need {want}")
    all_grids += grids[row * per_row:(row + 1) * per_row] + query_grids
  positions, _ = qwen_vl.rope_index(ids, cfg, all_grids)
  out = {"positions": jnp.asarray(positions, jnp.int32)}
  if grids:
    window = cfg.vision.window
    packing = pack_vision(grids, merge=merge, window=window)
    out["vision"] = qwen_vl.VisionInputs.from_packing(packing, np.asarray(pixel_values, np.float32), len(grids))
  if generate:
    slots = np.stack([np.flatnonzero(r == cfg.image_token_id)[-cfg.queries:] for r in ids])
    out["query_index"] = jnp.asarray(slots, jnp.int32)
  return out
