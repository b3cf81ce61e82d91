"""The input pipeline: per-stream sources -> shard -> shuffle -> mix -> prepare -> build -> pack -> batch.

    records (canonical, per stream)  --Prepare-->  example  --builder-->  sample  --pack-->  row  --batch-->
    batch dict of [B L] arrays + attachments

`Prepare` loads and buckets images and tokenises texts; the model's sequence builder (e.g. TUNA's) turns an
example into a sample; `PackIterDataset` packs samples into rows. Keys and shapes of each stage are in
data/README.md. Bad records never raise: they become skip markers that the packer counts.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np
from absl import logging

from unimm_jax.data import packing, shapes, transforms, video


TUNA_MIX = {"t2i": 0.5, "edit": 0.2, "mmu": 0.2, "text": 0.1}  # TUNA's stream weights (train.yaml)
VIDEO_STREAMS = ("t2v", "vmmu")  # records whose one "image" is a clip
UNDERSTANDING = ("mmu", "vmmu")  # (question, answer) records
CLOSE_TIMEOUT_S = 5  # how long `DataIterator.close` waits for a packing thread stuck in a read


@dataclasses.dataclass(frozen=True)
class Stream:
  """One input stream: a random-access source of canonical records and its mixing weight."""

  name: str  # "t2i" | "mmu" | "edit" | "text" | "t2v" | "vmmu"
  source: Any
  weight: float


def shapes_streams(*, size: int = 32, num_records: int = 10_000, seed: int = 0,
                   weights: Mapping[str, float] = TUNA_MIX) -> list[Stream]:
  """The embedded default: one `shapes.ShapesSource` per stream with positive weight."""
  return [Stream(s, shapes.ShapesSource(s, num_records, size=size, seed=seed), w) for s, w in weights.items() if w > 0]


def mixed_records(streams: Sequence[Stream], *, seed: int, shard_index: int = 0, shard_count: int = 1,
                  num_epochs: int | None = None) -> grain.MapDataset:
  """Canonical records of all streams, this process's shard, shuffled per epoch, mixed by weight.

  Each stream is sharded by index (`[shard_index::shard_count]`, so shards are disjoint and cover the
  source), shuffled with `seed + k` (reshuffled every epoch) and repeated `num_epochs` times (None:
  forever); `MapDataset.mix` interleaves them deterministically in proportion to the weights. Each record
  gets `epoch`, the passes over its shard before it, so a bad record is counted once, not every epoch.
  """
  if not streams:
    raise ValueError("no streams given")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} not in [0, shard_count={shard_count})")
  parts, weights = [], []
  for k, st in enumerate(streams):
    if st.weight <= 0:
      raise ValueError(f"stream {st.name!r} has weight {st.weight}; weights must be positive")
    if len(st.source) < shard_count:
      raise ValueError(f"stream {st.name!r}: {len(st.source)} records cannot feed {shard_count} shards")
    ds = grain.MapDataset.source(st.source)[shard_index::shard_count].shuffle(seed=seed + k)
    parts.append(ds.repeat(num_epochs).map_with_index(functools.partial(_with_epoch, len(ds))))
    weights.append(st.weight)
  return parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)


def _with_epoch(n: int, index: int, record: Mapping[str, Any]) -> dict[str, Any]:
  return {**record, "epoch": index // n}


def _ids(tokenizer: Any, text: str) -> np.ndarray:
  if not text:
    return np.zeros(0, np.int32)
  backend = getattr(tokenizer, "backend_tokenizer", None)  # HF fast tokenizers: same ids, ~5x less overhead
  ids = backend.encode(text, add_special_tokens=False).ids if backend else tokenizer(
      text, add_special_tokens=False)["input_ids"]
  return np.asarray(ids, np.int32)


@dataclasses.dataclass(frozen=True)
class Prepare:
  """Canonical record -> example (images bucketed and normalised, texts tokenised), then `builder`.

  `builder(example) -> sample` is the model's sequence builder. With `chat_template`, an understanding
  prompt is wrapped as a user turn plus the opening of the assistant turn by the tokenizer's template.
  The video streams (t2v, vmmu) decode their clip and sample its frames by `video_spec` (data/video.py) into
  images [T H W 3]. Returns `{"skipped": reason, ...}` instead of raising for bad data.
  """

  tokenizer: Any
  builder: Callable[[dict[str, Any]], dict[str, Any]]
  buckets: tuple[tuple[int, int], ...]
  chat_template: bool = False
  video_spec: video.VideoSpec | None = None

  def example(self, record: Mapping[str, Any]) -> dict[str, Any]:
    """Canonical record -> example, or a skip marker (also passed through from the source)."""
    if packing.SKIP_KEY in record:
      return dict(record)
    stream = record["stream"]
    marker = {packing.SKIP_KEY: "", "id": record["id"], "stream": stream, "epoch": record.get("epoch", 0)}
    if not record["text"].strip() or (stream in UNDERSTANDING and not record["answer"].strip()):
      return {**marker, packing.SKIP_KEY: "empty_text"}
    if stream in VIDEO_STREAMS and self.video_spec is None:
      raise ValueError(f"Prepare: a {stream} record ({record['id']}) needs Prepare.video_spec (frames, fps) to sample "
                       "its clip; set config.data.video")
    images = []
    for image in record["images"]:
      try:
        if stream in VIDEO_STREAMS:
          images.append(video.prepare_video(video.sample_frames(*video.load_video(image), self.video_spec), self.buckets))
        else:
          images.append(transforms.prepare_image(transforms.load_image(image), self.buckets))
      except transforms.BadImage as e:
        return {**marker, packing.SKIP_KEY: e.reason, "detail": str(e).removeprefix(f"{e.reason}: ")}
    if stream in UNDERSTANDING:
      text_ids, text_loss = self._prompt(record)
    else:
      text_ids = _ids(self.tokenizer, record["text"])
      text_loss = np.zeros(len(text_ids), bool)
    return {"id": record["id"], "stream": stream, "images": images, "text_ids": text_ids, "text_loss": text_loss,
            "answer_ids": _ids(self.tokenizer, record["answer"]), "meta": record.get("meta", ""),
            "epoch": record.get("epoch", 0)}

  def _prompt(self, record: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """An understanding prompt (earlier turns + the question) -> (ids, loss mask on the earlier answers)."""
    turns = [*record.get("turns", ()), record["text"]]
    if not self.chat_template:
      # Without a template an earlier answer ends with eos, as the final one does.
      eos = np.asarray([self.tokenizer.eos_token_id], np.int32)
      pieces = [np.concatenate([_ids(self.tokenizer, t), eos]) if n % 2 else _ids(self.tokenizer, t)
                for n, t in enumerate(turns)]
      return np.concatenate(pieces), np.concatenate([np.full(len(p), n % 2 == 1) for n, p in enumerate(pieces)])
    # The template renders the conversation one message at a time; each message must only append tokens
    # (true of Qwen-style templates), so the tokens an assistant message adds are exactly its loss.
    msgs = [{"role": ("user", "assistant")[n % 2], "content": t} for n, t in enumerate(turns)]
    ids, loss = np.zeros(0, np.int32), np.zeros(0, bool)
    for n in range(len(msgs)):
      enc = self.tokenizer.apply_chat_template(msgs[:n + 1], add_generation_prompt=n % 2 == 0, return_dict=True)
      new = np.asarray(enc["input_ids"], np.int32)
      if not np.array_equal(new[:len(ids)], ids):
        raise ValueError(f"{record['id']}: the chat template rewrites earlier turns when turn {n} is added; "
                         "multi-turn records need a template that only appends")
      ids, loss = new, np.concatenate([loss, np.full(len(new) - len(ids), n % 2 == 1)])
    return ids, loss

  def __call__(self, record: Mapping[str, Any]) -> dict[str, Any]:
    ex = self.example(record)
    return ex if packing.SKIP_KEY in ex else {**self.builder(ex), "epoch": ex["epoch"]}


def collate(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Rows -> batch: per-token arrays stacked to [B L]; `attachments` = [(row, offset, array)]."""
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0] if k != "attachments"}
  batch["attachments"] = [(b, off, a) for b, r in enumerate(rows) for off, a in r["attachments"]]
  return batch


def stack_attachments(attachments: Sequence[tuple[int, int, np.ndarray]]) -> dict[str, np.ndarray]:
  """[(row, offset, array [...])] of one shape -> {"data": [n ...], "row": int32 [n], "offset": int32 [n]}."""
  found = sorted({a.shape for _, _, a in attachments})
  if len(found) > 1:
    raise ValueError(f"attachments have several shapes {found}; batch one resolution bucket at a time")
  return {"data": np.stack([a for _, _, a in attachments]),
          "row": np.asarray([b for b, _, _ in attachments], np.int32),
          "offset": np.asarray([o for _, o, _ in attachments], np.int32)}


class Pipeline:
  """The whole input pipeline; `iter(pipeline)` gives a checkpointable `DataIterator` of batches.

  Args:
    streams: the sources and mixing weights.
    prepare: record -> sample (a `Prepare`; must be picklable when `worker_count` > 0).
    seq_len, batch_size: each batch is [batch_size seq_len].
    seed, shard_index, shard_count: order and this process's share (multi-host: jax.process_index/count).
    num_epochs: None repeats forever; with a finite count the last batch is padded with empty rows.
    method, window: packing algorithm and how many samples it packs at once.
    num_threads, prefetch: threads preparing records ahead of the packer, and how far ahead.
    worker_count: >0 runs preparation in that many processes (grain mp_prefetch; needs absl flags parsed).
    prefetch_batches: batches packed ahead by a background thread (0: pack on the caller's thread).
    pad_values: padding value per per-token key (default 0).
    collate_fn: rows -> batch (default `collate`; a model may turn rows into its own batch layout).
    max_consecutive_skips: a stream whose last this-many records were all skipped raises
      `packing.TooManySkips` naming its source (an all-bad source would otherwise be read for ever).
  """

  def __init__(self, streams: Sequence[Stream], prepare: Callable[[Mapping[str, Any]], dict[str, Any]], *,
               seq_len: int, batch_size: int, seed: int = 0, shard_index: int = 0, shard_count: int = 1,
               num_epochs: int | None = None, method: str = "best_fit", window: int = 64, num_threads: int = 2,
               prefetch: int = 64, worker_count: int = 0, prefetch_batches: int = 2,
               pad_values: Mapping[str, Any] | None = None,
               collate_fn: Callable[[list[dict[str, Any]]], Any] = collate, max_consecutive_skips: int = 1000):
    self.streams, self.batch_size, self.prefetch_batches = list(streams), batch_size, prefetch_batches
    self.collate_fn = collate_fn
    records = mixed_records(self.streams, seed=seed, shard_index=shard_index, shard_count=shard_count,
                            num_epochs=num_epochs)
    samples = records.map(prepare).to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
    if worker_count > 0:
      from absl import flags

      if not flags.FLAGS.is_parsed():  # grain's worker processes read its --grain_* absl flags
        raise RuntimeError("Pipeline(worker_count > 0) needs absl flags parsed: run under absl.app.run or call "
                           "absl.flags.FLAGS.mark_as_parsed() first; worker_count=0 uses threads only")
      samples = samples.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    self.rows = packing.PackIterDataset(samples, seq_len=seq_len, window=window, method=method,
                                        pad_values=pad_values, max_consecutive_skips=max_consecutive_skips,
                                        sources={st.name: repr(st.source) for st in self.streams})

  def __iter__(self) -> DataIterator:
    return DataIterator(self)


class DataIterator(grain.DatasetIterator):
  """Batches of packed rows; `get_state`/`set_state` checkpoint it (JSON-serialisable state). A grain
  `DatasetIterator`, so grain's Orbax handler (`grain.checkpoint.CheckpointSave`) saves one state per process.

  With `prefetch_batches` > 0 a background thread packs and collates ahead; each batch travels with the
  iterator state and counters taken right after it, so `get_state()` and `stats()` describe exactly the
  batches handed out, not the ones prefetched.
  """

  def __init__(self, pipeline: Pipeline):
    super().__init__()
    self._pipeline = pipeline
    self._rows = pipeline.rows.__iter__()
    self._state: dict[str, Any] = self._rows.get_state()
    self._counters: dict[str, int] = dict(self._rows.counters)
    self._like: dict[str, Any] | None = None
    self._queue: queue.Queue | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._start()

  def _batch(self) -> dict[str, Any]:
    rows = []
    for _ in range(self._pipeline.batch_size):
      try:
        rows.append(next(self._rows))
      except StopIteration:
        break
    if not rows:
      raise StopIteration
    self._like = self._like or rows[0]
    rows += [packing.empty_row(self._like, self._pipeline.rows.pad_values)] * (self._pipeline.batch_size - len(rows))
    return self._pipeline.collate_fn(rows)

  def _item(self) -> tuple[Any, ...]:
    try:
      return ("batch", self._batch(), self._rows.get_state(), dict(self._rows.counters))
    except StopIteration:
      return ("end",)
    except Exception as e:  # handed to the consumer, which raises it
      return ("error", e)

  def _produce(self, q: queue.Queue, stop: threading.Event) -> None:
    while not stop.is_set():
      item = self._item()
      while not stop.is_set():
        try:
          q.put(item, timeout=0.05)
          break
        except queue.Full:
          continue
      if item[0] != "batch":
        return

  def _start(self) -> None:
    if self._pipeline.prefetch_batches <= 0:
      return
    self._stop = threading.Event()
    self._queue = queue.Queue(maxsize=self._pipeline.prefetch_batches)
    self._thread = threading.Thread(target=self._produce, args=(self._queue, self._stop), daemon=True)
    self._thread.start()

  def _halt(self, timeout: float | None = None) -> bool:
    """Stops the packing thread; False if it is still inside a read after `timeout` seconds."""
    if self._thread is not None:
      self._stop.set()
      self._thread.join(timeout)
      if self._thread.is_alive():
        return False
      self._thread = None
    return True

  def __iter__(self) -> DataIterator:
    return self

  def __next__(self) -> dict[str, Any]:
    self._assert_not_closed()
    item = self._item() if self._queue is None else self._queue.get()
    if item[0] == "end":
      if self._queue is not None:
        self._queue.put(item)  # later calls stop too
      raise StopIteration
    if item[0] == "error":
      raise item[1]
    _, batch, self._state, self._counters = item
    return batch

  def close(self) -> None:
    """Stops the packing thread and closes grain's iterators, worker processes included (idempotent).

    Returns within CLOSE_TIMEOUT_S even when the thread is stuck in a read (a stalled filesystem, a
    trainer stopping on SIGTERM): the thread, a daemon, is then left to finish and grain's iterators open."""
    if not self._halt(CLOSE_TIMEOUT_S):
      logging.warning("data: the packing thread is still reading after %d s; closing without it", CLOSE_TIMEOUT_S)
      self._closed = True
    if not self._closed:
      self._closed = True
      self._rows.close()

  def get_state(self) -> dict[str, Any]:
    return copy.deepcopy(self._state)

  def set_state(self, state: Mapping[str, Any]) -> None:
    if "phase" in state:
      raise ValueError("data iterator state is from a curriculum (`Phases`, config.data.warmup) at phase "
                       f"{state['phase']}; this run has a single mix: resume with the same data config")
    self._halt()
    self._rows.set_state(state)
    self._state, self._counters = copy.deepcopy(dict(state)), dict(self._rows.counters)
    self._start()

  @property
  def counters(self) -> dict[str, int]:
    """The packer's counters for the batches handed out (`stats` without the sources' own skips)."""
    return dict(self._counters)

  def stats(self) -> dict[str, float]:
    """Counters so far (samples, rows, tokens, slots, samples/<stream>, skipped/<reason>) + efficiency.

    Records dropped while reading manifests are added under `skipped/<reason>` too.
    """
    counts = collections.Counter(self._counters)
    for st in self._pipeline.streams:
      for reason, n in getattr(st.source, "skipped", {}).items():
        counts[f"skipped/{reason}"] += n
    out: dict[str, float] = dict(counts)
    out["efficiency"] = counts["tokens"] / max(1, counts["slots"])
    return out


@dataclasses.dataclass(frozen=True)
class SimpleBuilder:
  """A minimal sequence builder, the reference for the sample interface (data/README.md).

  `[bos] text (<|vision_start|> <|image_pad|>*n <|vision_end|>)* answer [eos]`, one bidirectional span per
  image, loss on the text of t2i/text samples and on the answer of mmu samples. It exercises the pipeline
  in tests and `scripts/bench_data.py`; models bring their own builders (TUNA's adds a time slot per image).
  """

  tokenizer: Any
  tokens_per_image: int

  def __call__(self, ex: Mapping[str, Any]) -> dict[str, Any]:
    tk = self.tokenizer
    pieces: list[tuple[np.ndarray, int, Any]] = [(np.asarray([tk.bos_token_id]), 0, 0.0)]  # (ids, span, loss)
    text_loss = 0.0 if ex["stream"] in ("mmu", "edit") else 1.0
    pieces.append((ex["text_ids"], 0, np.maximum(text_loss, ex["text_loss"])))
    attachments, n = [], 1 + len(ex["text_ids"])
    vs, ve, pad = tk.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>"])
    for k, image in enumerate(ex["images"], start=1):
      attachments.append((n + 1, image))
      pieces += [(np.asarray([vs]), 0, 0.0), (np.full(self.tokens_per_image, pad), k, 0.0), (np.asarray([ve]), 0, 0.0)]
      n += self.tokens_per_image + 2
    pieces += [(ex["answer_ids"], 0, 1.0), (np.asarray([tk.eos_token_id]), 0, 1.0)]
    return {
        "id": ex["id"], "stream": ex["stream"], "attachments": attachments,
        "input_ids": np.concatenate([p for p, _, _ in pieces]).astype(np.int32),
        "span_local": np.concatenate([np.full(len(p), s) for p, s, _ in pieces]).astype(np.int32),
        "loss_mask": np.concatenate([np.broadcast_to(m, len(p)) for p, _, m in pieces]).astype(np.float32),
    }


class Phases:
  """A curriculum: `iter(phases)` gives batches of `pipelines[0]` for `steps[0]` batches, then of
  `pipelines[1]` for `steps[1]`, ..., then of the last pipeline for ever. Each phase has its own streams and
  weights (e.g. a text-to-image warm-up before the full mix), counted in batches, i.e. train steps.

  Each phase starts its pipeline from the beginning (its own seed and order); the iterator state names the
  phase, the batches taken in it and that pipeline's state, so a resumed run continues in the same phase.
  """

  def __init__(self, pipelines: Sequence[Pipeline], steps: Sequence[int]):
    if len(steps) != len(pipelines) - 1 or not pipelines:
      raise ValueError(f"{len(pipelines)} pipelines need {len(pipelines) - 1} phase lengths, got {list(steps)}")
    if any(int(n) <= 0 for n in steps):
      raise ValueError(f"phase lengths must be positive numbers of steps, got {list(steps)}")
    self.pipelines, self.steps = list(pipelines), [int(n) for n in steps]

  def __iter__(self) -> PhasedIterator:
    return PhasedIterator(self)


class PhasedIterator(grain.DatasetIterator):
  """Iterator of `Phases`; only the current phase's pipeline is open (its threads and workers)."""

  def __init__(self, phases: Phases):
    super().__init__()
    self._phases = phases
    self._done: collections.Counter = collections.Counter()  # packer counters of the finished phases
    self._open(0, 0)

  def _open(self, phase: int, taken: int) -> None:
    self._phase, self._taken = phase, taken
    self._it = iter(self._phases.pipelines[phase])

  def _length(self) -> int | None:
    return self._phases.steps[self._phase] if self._phase < len(self._phases.steps) else None

  def __iter__(self) -> PhasedIterator:
    return self

  def __next__(self) -> dict[str, Any]:
    self._assert_not_closed()
    if self._taken == self._length():
      self._done.update(self._it.counters)
      self._it.close()
      self._open(self._phase + 1, 0)
    batch = next(self._it)
    self._taken += 1
    return batch

  def close(self) -> None:
    if not self._closed:
      self._closed = True
      self._it.close()

  def get_state(self) -> dict[str, Any]:
    return {"phase": self._phase, "taken": self._taken, "done": dict(self._done), "pipeline": self._it.get_state()}

  def set_state(self, state: Mapping[str, Any]) -> None:
    if "phase" not in state:
      raise ValueError("data iterator state is from a single mix; this run is a curriculum (`Phases`, "
                       "config.data.warmup): resume with the same data config")
    phase = int(state["phase"])
    if not 0 <= phase < len(self._phases.pipelines):
      raise ValueError(f"data iterator state is in phase {phase}; this run has {len(self._phases.pipelines)}")
    self._it.close()
    self._open(phase, int(state["taken"]))
    self._it.set_state(state["pipeline"])
    self._done = collections.Counter(state["done"])

  def stats(self) -> dict[str, float]:
    """`DataIterator.stats` summed over the phases so far, and `phase` (0-based). The sources' own skips
    (manifest lines) are those of the current phase's sources, counted once."""
    counts = self._done + collections.Counter(self._it.stats())
    counts.pop("efficiency", None)
    out: dict[str, float] = dict(counts)
    out["efficiency"] = counts["tokens"] / max(1, counts["slots"])
    out["phase"] = self._phase
    return out
