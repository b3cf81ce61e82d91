"""The TUNA input pipeline: records of the four streams -> TUNA samples -> packed batches.

`TunaBuilder` is the sequence builder `pipeline.Prepare` calls: it turns an example's images into image
tokens of the generated space and lays out the stream (data/tuna_sequences.py). Pixel-space TUNA (TUNA-2,
TUNA-R) patchifies pixels here; latent-space TUNA expects latents precomputed by its frozen VAE
(records whose images are [h w 48] latent arrays) -- encoding a VAE per sample on the host would starve
the accelerator.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from einops import rearrange

from unimm_jax.data import pipeline
from unimm_jax.data import tuna_sequences as ts


@dataclasses.dataclass(frozen=True)
class TunaBuilder:
  """example (data/README.md section 2) -> TUNA sample."""

  tokens: ts.TunaTokens
  patch: int
  channels: int
  # Share of t2i captions replaced by the empty prompt, so the model learns the unconditional branch
  # that classifier-free guidance contrasts with. Decided by a hash of the record id: deterministic
  # and resumable without an rng in the pipeline.
  caption_dropout: float = 0.1

  def image(self, img: np.ndarray) -> np.ndarray:
    if img.shape[-1] != self.channels:
      raise ValueError(f"image has {img.shape[-1]} channels, the model generates {self.channels}")
    return rearrange(np.asarray(img, np.float32), "(h p) (w q) c -> h w (p q c)", p=self.patch, q=self.patch)

  def __call__(self, ex: Mapping[str, Any]) -> dict[str, Any]:
    stream, images, text = ex["stream"], [self.image(i) for i in ex["images"]], ex["text_ids"]
    if stream == "t2i":
      drop = zlib.crc32(str(ex["id"]).encode()) % 10_000 < self.caption_dropout * 10_000
      sample = ts.t2i_sample(text[:0] if drop else text, images[0], self.tokens)
    elif stream == "mmu":
      sample = ts.understanding_sample(images[0], text, ex["answer_ids"], self.tokens, ex["text_loss"])
    elif stream == "edit":
      sample = ts.edit_sample(images[0], text, images[1], self.tokens)
    elif stream == "text":
      sample = ts.text_sample(text, self.tokens)
    else:
      raise ValueError(f"unknown stream {stream!r}")
    return {**sample, "id": ex["id"]}


def shapes_pipeline(*, tokenizer: Any, patch: int, image_size: int, row_length: int, max_spans: int,
                    batch_size: int, weights: Mapping[str, float], seed: int = 0, num_records: int = 10_000,
                    caption_dropout: float = 0.1, shard_index: int = 0, shard_count: int = 1) -> pipeline.Pipeline:
  """The embedded default for pixel-space TUNA: the shapes world, mixed by `weights`, packed rows."""
  builder = TunaBuilder(ts.TunaTokens.from_tokenizer(tokenizer), patch, 3, caption_dropout)
  prepare = pipeline.Prepare(tokenizer, builder, buckets=((image_size, image_size),))
  streams = pipeline.shapes_streams(size=image_size, num_records=num_records, seed=seed, weights=dict(weights))
  return pipeline.Pipeline(
      streams, prepare, row_length=row_length, batch_size=batch_size, seed=seed, shard_index=shard_index,
      shard_count=shard_count, pad_values={"labels": ts.IGNORE},
      collate_fn=functools.partial(ts.to_batch, max_spans=max_spans, token_features=patch * patch * 3))


def shapes_from_config(config: Any, batch_size: int, process_index: int, process_count: int) -> pipeline.Pipeline:
  """The trainer's "shapes_tuna" dataset: config.data (seq_len, max_spans, image_size, weights, seed,
  num_records) and config.model (a pixel-space TUNA config)."""
  from unimm_jax.data.tokenizer import shapes_tokenizer  # builds the tokenizer offline, in memory
  d, m = config.data, config.model
  if m.space != "pixel":
    raise ValueError(f"data 'shapes_tuna' feeds pixel-space TUNA; config.model.space is {m.space!r}")
  return shapes_pipeline(
      tokenizer=shapes_tokenizer(), patch=int(m.patch), image_size=int(d.image_size), row_length=int(d.seq_len),
      max_spans=int(d.max_spans), batch_size=batch_size, weights=d.weights.to_dict(), seed=int(d.seed),
      num_records=int(d.num_records), caption_dropout=float(d.get("caption_dropout", 0.1)),
      shard_index=process_index, shard_count=process_count)
