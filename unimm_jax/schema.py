"""The packed multimodal row: one schema for the batches of every model that mixes text and images in one row
(TUNA, and the LLM rows of the other families), owned here and nowhere else.

A row holds several samples (segments) of text and images. Every image is a span
  [time slot] [image token] * (h * w)            (row-major y, x over its token grid)
of bidirectional attention inside an otherwise causal mask; a TUNA with aspect-ratio embeddings
(TunaConfig.aspect_ratio_embeds) opens every span with [height slot] [width slot] before the time slot.
`time_slot` marks all of these leading (meta) slots, so `image_tokens` stays the span minus them; which meta
slot a token is follows from its index in the span (`span_slots`). Keys, all [b t] unless noted:
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

IGNORE = -100   # label of a position that is no target (transformers' convention)

KEYS = {
    "input_ids": "int32 [b t] token ids; image slots hold <|image_pad|>",
    "labels": "int32 [b t] target token of each position, IGNORE where none (CE compares logits[i - 1], labels[i])",
    "segment_ids": "int32 [b t] sample of the row 1..m, 0 = padding",
    "positions": "int32 [b t] LLM position, restarting at 0 per sample",
    "span_ids": "int32 [b t] image span 1..n of the row (time slot + image tokens), 0 elsewhere",
    "time_slot": "bool [b t] the meta slots opening a span: the time token (after height and width tokens with "
                 "aspect-ratio embeddings)",
    "thw": "int32 [b t 3] (frame, row, column) of an image token in its image's token grid, 0 elsewhere",
    "flow_mask": "bool [b t] image tokens in the flow loss",
    "spatial_shapes": "int32 [b n 2] token-grid (rows, columns) of span i + 1; (0, 0) = no span",
    "span_clean": "bool [b n] span i + 1 is a clean condition (t = 1): an understanding image, an edit's source",
    "x1": "float32 [b t o] clean patches at image tokens, 0 elsewhere (o values per image token)",
    # added to the data's batch by training/tuna_objective.noise_batch and by the samplers:
    "x_t": "float [b t o] noisy patches at image tokens, 0 elsewhere",
    "span_t": "float32 [b n] time of span i + 1 (TUNA's t: 1 = clean)",
}
MODEL_INPUTS = ("input_ids", "segment_ids", "positions", "span_ids", "time_slot", "thw", "spatial_shapes", "x_t", "span_t")


def image_tokens(span_ids: jax.Array, time_slot: jax.Array) -> jax.Array:
  """bool [b t]: the image tokens of the row (inside a span, not its time slot)."""
  return (span_ids > 0) & ~time_slot


def span_slots(span_ids: jax.Array) -> jax.Array:
  """int32 [b t]: the index of each token in its span (0 at a span's first slot; 0 outside spans too).
  Spans are contiguous and adjacent spans have different ids (ids count the row's spans)."""
  idx = jnp.broadcast_to(jnp.arange(span_ids.shape[1], dtype=jnp.int32), span_ids.shape)
  prev = jnp.pad(span_ids[:, :-1], ((0, 0), (1, 0)))
  start = jnp.where(span_ids != prev, idx, 0)
  return jnp.where(span_ids > 0, idx - jax.lax.cummax(start, axis=1), 0)


def gather_spans(table: jax.Array, span_ids: jax.Array, outside: float) -> jax.Array:
  """Per-span rows [b n ...] -> per-token [b t ...]: row span_ids - 1 inside a span, `outside` elsewhere."""
  idx = jnp.clip(span_ids - 1, 0, table.shape[1] - 1)
  idx = idx.reshape(*idx.shape, *(1,) * (table.ndim - 2))
  rows = jnp.take_along_axis(table, idx, axis=1)
  inside = (span_ids > 0).reshape(*span_ids.shape, *(1,) * (table.ndim - 2))
  return jnp.where(inside, rows, jnp.asarray(outside, table.dtype))


def example_batch(seq_len: int, max_spans: int, token_features: int, batch: int = 1) -> dict[str, np.ndarray]:
  """A zero batch of the data's keys (KEYS but x_t, span_t): what data.tuna_sequences.to_batch emits."""
  rows = (batch, seq_len)
  return {
      "input_ids": np.zeros(rows, np.int32), "labels": np.full(rows, IGNORE, np.int32),
      "segment_ids": np.ones(rows, np.int32), "positions": np.zeros(rows, np.int32),
      "span_ids": np.zeros(rows, np.int32), "time_slot": np.zeros(rows, bool), "flow_mask": np.zeros(rows, bool),
      "thw": np.zeros((*rows, 3), np.int32), "spatial_shapes": np.zeros((batch, max_spans, 2), np.int32),
      "span_clean": np.zeros((batch, max_spans), bool), "x1": np.zeros((*rows, token_features), np.float32),
  }


def example_inputs(token_features: int, seq_len: int = 16, max_spans: int = 1) -> dict[str, jax.Array]:
  """example_batch plus a clean x_t / span_t: inputs that build a model's params."""
  b = {k: jnp.asarray(v) for k, v in example_batch(seq_len, max_spans, token_features).items()}
  return {**b, "x_t": b["x1"], "span_t": jnp.ones((1, max_spans), jnp.float32)}


def check(batch: Mapping[str, jax.Array], where: str, keys: tuple[str, ...] = MODEL_INPUTS) -> None:
  """Raises naming the keys `batch` lacks."""
  missing = sorted(set(keys) - set(batch))
  if missing:
    raise ValueError(f"{where}: batch is missing {missing}; expected keys: {sorted(keys)}")
