"""The TUNA input pipeline: records of the streams -> TUNA samples -> packed batches.

`TunaBuilder` is the sequence builder `pipeline.Prepare` calls: it turns an example's images into image
tokens of the generated space and lays out the stream (data/tuna_sequences.py). Pixel-space TUNA (TUNA-2,
TUNA-R) patchifies pixels here (a clip frame by frame); latent-space TUNA expects latents precomputed by its
frozen VAE (records whose images are [h w 48] latent arrays, clips [T h w 48] from the Wan 2.2 VAE's 1 + 4k
frames) -- encoding a VAE per sample on the host would starve the accelerator.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from einops import rearrange

from unimm_jax import schema
from unimm_jax.data import pipeline, shapes, video
from unimm_jax.data import tuna_sequences as ts
from unimm_jax.models import tuna


@dataclasses.dataclass(frozen=True)
class TunaBuilder:
  """example (data/README.md section 2) -> TUNA sample."""

  tokens: ts.TunaTokens
  patch: int
  channels: int
  # Share of t2i captions and edit instructions replaced by the empty prompt, so the model learns the
  # null branches that classifier-free guidance contrasts with (sampling.tuna: an empty prompt for t2i,
  # the source with an empty instruction for editing). Decided by a hash of the record id: deterministic
  # and resumable without an rng in the pipeline.
  caption_dropout: float = 0.1
  meta_slots: int = 1            # 3: spans open with height and width slots (TunaConfig.meta_slots)
  vision_labels: bool = False    # understanding: <boi> / <eoi> are CE targets too (tuna_sequences)
  video_markers: bool = False    # clips between the video tokens, not the image tokens (tuna_sequences)

  def image(self, img: np.ndarray) -> np.ndarray:
    """[H W c] -> [h w o], a clip [T H W c] -> [T h w o] (each frame alone)."""
    if img.shape[-1] != self.channels:
      raise ValueError(f"image has {img.shape[-1]} channels, the model generates {self.channels}")
    return rearrange(np.asarray(img, np.float32), "... (h p) (w q) c -> ... h w (p q c)", p=self.patch, q=self.patch)

  def __call__(self, ex: Mapping[str, Any]) -> dict[str, Any]:
    stream, images, text = ex["stream"], [self.image(i) for i in ex["images"]], ex["text_ids"]
    if stream in ("t2i", "edit", "t2v") and zlib.crc32(str(ex["id"]).encode()) % 10_000 < self.caption_dropout * 10_000:
      text = text[:0]
    m = self.meta_slots
    if stream == "t2i":
      sample = ts.t2i_sample(text, images[0], self.tokens, meta_slots=m)
    elif stream == "mmu":
      sample = ts.understanding_sample(images[0], text, ex["answer_ids"], self.tokens, ex["text_loss"],
                                       vision_labels=self.vision_labels, meta_slots=m)
    elif stream == "edit":
      sample = ts.edit_sample(images[0], text, images[1], self.tokens, meta_slots=m)
    elif stream == "text":
      sample = ts.text_sample(text, self.tokens)
    elif stream in ("t2v", "vmmu") and m != 1:
      raise ValueError(f"{stream}: clips with aspect-ratio slots (meta_slots {m}) are not supported")
    elif stream == "t2v":
      sample = ts.t2v_sample(text, images[0], self.tokens, self.video_markers)
    elif stream == "vmmu":
      sample = ts.video_understanding_sample(images[0], text, ex["answer_ids"], self.tokens, ex["text_loss"],
                                             self.video_markers)
    else:
      raise ValueError(f"unknown stream {stream!r}")
    return {**sample, "id": ex["id"]}


def tuna_pipeline(streams: list[pipeline.Stream], *, tokenizer: Any, patch: int, channels: int,
                  buckets: tuple[tuple[int, int], ...], seq_len: int, max_spans: int, batch_size: int, seed: int = 0,
                  caption_dropout: float = 0.1, chat_template: bool = False, shard_index: int = 0,
                  shard_count: int = 1, max_consecutive_skips: int = 1000, meta_slots: int = 1,
                  vision_labels: bool = False, video_spec: video.VideoSpec | None = None,
                  video_markers: bool = False) -> pipeline.Pipeline:
  """Canonical records of the given streams -> packed TUNA batches (data.tuna_sequences.to_batch); the video
  streams sample their clips by `video_spec`."""
  builder = TunaBuilder(ts.TunaTokens.from_tokenizer(tokenizer), patch, channels, caption_dropout,
                        meta_slots=meta_slots, vision_labels=vision_labels, video_markers=video_markers)
  prepare = pipeline.Prepare(tokenizer, builder, buckets=buckets, chat_template=chat_template, video_spec=video_spec)
  return pipeline.Pipeline(
      streams, prepare, seq_len=seq_len, batch_size=batch_size, seed=seed, shard_index=shard_index,
      shard_count=shard_count, pad_values={"labels": schema.IGNORE}, max_consecutive_skips=max_consecutive_skips,
      collate_fn=functools.partial(ts.to_batch, max_spans=max_spans, token_features=patch * patch * channels))


def _check_model(config: Any, name: str) -> None:
  """Raises unless config.model is pixel-space TUNA whose position tables cover the images' token grid; run
  first, before any source or tokenizer is opened."""
  m = config.model
  if m.space != "pixel":
    raise ValueError(f"data {name!r} feeds pixel-space TUNA; config.model.space is {m.space!r} "
                     "(latent TUNA trains on precomputed latents)")
  grid = int(config.data.image_size) // int(m.patch)
  tuna.TunaConfig.from_dict(m.to_dict()).check_grid(
      grid, grid, f"data {name!r}: config.data.image_size {config.data.image_size} / config.model.patch {m.patch}")


def _from_config(config: Any, name: str, streams: Callable[[dict[str, float]], list[pipeline.Stream]],
                 names: Sequence[str], tokenizer: Any, batch_size: int, process_index: int,
                 process_count: int) -> pipeline.Pipeline | pipeline.Phases:
  """The packed TUNA batches of data `name`: `streams(config.data.weights)`, after a warm-up of
  `config.data.warmup.steps` steps on `streams(config.data.warmup.weights)` when that is set (a
  `pipeline.Phases`). `names` are the streams the run has; config.model is a pixel-space TUNA
  (`_check_model`). The video streams sample config.data.video.frames frames per clip at
  config.data.video.fps (0: spread over the clip); config.data.video_markers puts clips between the video
  tokens."""
  d, m = config.data, config.model
  size, patch = int(d.image_size), int(m.patch)
  meta_slots = tuna.TunaConfig.from_dict(m.to_dict()).meta_slots
  # a config that does not say labels <boi> / <eoi> as the reference does; configs/tuna.py's variants say no
  vision_labels = bool(d.get("mmu_vision_labels", True))
  spec = d.get("video")
  spec = spec and video.VideoSpec(int(spec.frames), float(spec.get("fps", 0.0)))

  def build(weights: dict[str, float]) -> pipeline.Pipeline:
    return tuna_pipeline(
        streams(weights), tokenizer=tokenizer, patch=patch, channels=int(m.channels), buckets=((size, size),),
        seq_len=int(d.seq_len), max_spans=int(d.max_spans), batch_size=batch_size, seed=int(d.seed),
        caption_dropout=float(d.get("caption_dropout", 0.1)), chat_template=bool(d.get("chat_template", False)),
        shard_index=process_index, shard_count=process_count, max_consecutive_skips=int(d.max_consecutive_skips),
        meta_slots=meta_slots, vision_labels=vision_labels, video_spec=spec,
        video_markers=bool(d.get("video_markers", False)))

  weights = {k: float(v) for k, v in d.weights.to_dict().items()}
  warmup = d.get("warmup")
  if warmup is None or int(warmup.steps) <= 0:
    return build(weights)
  warm = {k: float(v) for k, v in warmup.weights.to_dict().items() if float(v) > 0}
  unknown = sorted(set(warm) - set(names))
  if not warm or unknown:
    raise ValueError(f"config.data.warmup.weights {warmup.weights.to_dict()} must give a positive weight to "
                     f"some of the run's streams {list(names)}" + (f"; not streams: {unknown}" if unknown else ""))
  return pipeline.Phases([build(warm), build(weights)], [int(warmup.steps)])


def shapes_from_config(config: Any, batch_size: int, process_index: int,
                       process_count: int) -> pipeline.Pipeline | pipeline.Phases:
  """The trainer's "shapes_tuna" dataset, the embedded default: config.data (seq_len, max_spans, image_size,
  weights, optional warmup, seed, num_records, caption_dropout) and config.model (a pixel-space TUNA config)."""
  from unimm_jax.data.tokenizer import shapes_tokenizer  # builds the tokenizer offline, in memory
  _check_model(config, "shapes_tuna")
  d = config.data

  def streams(weights: dict[str, float]) -> list[pipeline.Stream]:
    return pipeline.shapes_streams(size=int(d.image_size), num_records=int(d.num_records), seed=int(d.seed),
                                   weights=weights)

  clips = any(float(w) > 0 for s, w in d.weights.to_dict().items() if s in shapes.VIDEO_STREAMS)
  return _from_config(config, "shapes_tuna", streams, shapes.STREAMS + shapes.VIDEO_STREAMS,
                      shapes_tokenizer(video=clips), batch_size, process_index, process_count)


def streams_from_config(config: Any, batch_size: int, process_index: int,
                        process_count: int) -> pipeline.Pipeline | pipeline.Phases:
  """The trainer's "tuna_streams" dataset: your own data. config.data.sources maps a stream (t2i, mmu, edit,
  text) to a source spec (`sources.from_spec`: jsonl:, folder:, array_record:, tfds:); streams with an
  empty spec are not used, the others are mixed by config.data.weights. config.data.tokenizer is a Hugging
  Face tokenizer (name or folder) with TUNA's special tokens, or empty for the shapes tokenizer;
  config.data.chat_template wraps understanding prompts in its chat template. Images are resized and
  centre-cropped to config.data.image_size."""
  from unimm_jax.data import sources
  _check_model(config, "tuna_streams")
  d = config.data
  specs = {k: str(v) for k, v in d.sources.items() if str(v)}
  if not specs:
    raise ValueError("data 'tuna_streams': config.data.sources gives no source; set e.g. "
                     "--config.data.sources.t2i=jsonl:/path/to/captions.jsonl")
  missing = sorted(k for k in specs if float(d.weights.to_dict().get(k, 0)) <= 0)
  if missing:
    raise ValueError(f"data 'tuna_streams': config.data.weights has no positive weight for {missing}")
  srcs = {k: sources.from_spec(v, k, key=f"config.data.sources.{k}") for k, v in specs.items()}
  if d.get("tokenizer"):
    import transformers
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(d.tokenizer))
  else:
    from unimm_jax.data.tokenizer import shapes_tokenizer
    tokenizer = shapes_tokenizer()

  def streams(weights: dict[str, float]) -> list[pipeline.Stream]:
    return [pipeline.Stream(k, srcs[k], weights[k]) for k in srcs if weights.get(k, 0) > 0]

  return _from_config(config, "tuna_streams", streams, list(srcs), tokenizer, batch_size, process_index,
                      process_count)
