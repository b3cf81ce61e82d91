"""Packing samples into fixed-length rows (first-fit or best-fit over a window), checkpointable.

A sample is a dict of per-token 1D arrays of one length n (must include `input_ids`; `span_local` is 0
outside bidirectional spans and 1..k inside the sample's own spans) plus `attachments`, a list of
`(offset, array)` pairs (e.g. an image whose tokens start at `offset` in the sample), and optional `id` /
`stream` strings and `epoch` (how many times its source was read through before it). A row is the same keys
as [L] arrays plus `segment_ids` (1..m, 0 padding), `positions` (restarting at 0 per segment), `span_ids`
(unique within the row, 0 outside spans) and `attachments` with offsets shifted into the row. A sample is
never split: one longer than L is skipped and counted. Full interface: data/README.md.

Skipped records are counted once, in the first epoch of their source (a repeating source meets the same
bad record every epoch), and the first few of each stream are logged with their id and reason. A stream
whose last `max_consecutive_skips` records were all skipped raises TooManySkips naming its source.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np
from absl import logging

METHODS = ("first_fit", "best_fit")
META_KEYS = ("id", "stream", "attachments", "epoch")
# a record the pipeline dropped: {"skipped": reason, "id": ..., "stream": ..., "epoch": ..., "detail": ...}
SKIP_KEY = "skipped"
NAMED_SKIPS = 5  # skipped records logged by id per stream; the rest are counted


class TooManySkips(RuntimeError):
  """A stream's last `max_consecutive_skips` records were all skipped: its source is unusable as it stands."""


def token_keys(sample: Mapping[str, Any]) -> list[str]:
  """The per-token array keys of a sample, sorted; checks they are 1D and of one length."""
  keys = sorted(k for k in sample if k not in META_KEYS)
  if "input_ids" not in keys:
    raise ValueError(f"sample {sample.get('id', '?')!r} has no 'input_ids' array (keys: {keys})")
  n = len(sample["input_ids"])
  for k in keys:
    a = np.asarray(sample[k])
    if a.ndim != 1 or a.shape[0] != n:
      raise ValueError(f"sample {sample.get('id', '?')!r}: {k!r} has shape {a.shape}, want [{n}] like 'input_ids'")
  for offset, _ in sample.get("attachments", ()):
    if not 0 <= offset < n:
      raise ValueError(f"sample {sample.get('id', '?')!r}: attachment offset {offset} outside [0, {n})")
  return keys


def assign_rows(lengths: Sequence[int], seq_len: int, method: str) -> list[list[int]]:
  """Sample lengths -> rows as lists of sample indices. Longest first; every length must be <= seq_len.

  first_fit puts each sample in the earliest row with room; best_fit in the row it fills the most.
  """
  if method not in METHODS:
    raise ValueError(f"unknown packing method {method!r}; expected one of {METHODS}")
  order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep arrival order
  rows: list[list[int]] = []
  room: list[int] = []
  for i in order:
    n = lengths[i]
    if n > seq_len:
      raise ValueError(f"sample {i} has {n} tokens > seq_len {seq_len}")
    fits = [r for r in range(len(rows)) if room[r] >= n]
    if not fits:
      rows.append([i])
      room.append(seq_len - n)
      continue
    r = fits[0] if method == "first_fit" else min(fits, key=lambda r: room[r])
    rows[r].append(i)
    room[r] -= n
  return rows


def pack_row(samples: Sequence[Mapping[str, Any]], seq_len: int,
             pad_values: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Samples (same keys) -> one row of [seq_len] arrays; see the module docstring for the keys."""
  pad_values = pad_values or {}
  keys = token_keys(samples[0])
  row: dict[str, Any] = {}
  for k in keys:
    if k == "span_local":
      continue
    a0 = np.asarray(samples[0][k])
    row[k] = np.full(seq_len, pad_values.get(k, 0), a0.dtype)
  row["segment_ids"] = np.zeros(seq_len, np.int32)
  row["positions"] = np.zeros(seq_len, np.int32)
  row["span_ids"] = np.zeros(seq_len, np.int32)
  attachments = []
  start, spans = 0, 0
  for seg, s in enumerate(samples, start=1):
    if token_keys(s) != keys:
      raise ValueError(f"sample {s.get('id', '?')!r} has keys {token_keys(s)}, the row has {keys}")
    n = len(s["input_ids"])
    if start + n > seq_len:
      raise ValueError(f"samples of lengths {[len(x['input_ids']) for x in samples]} overflow seq_len {seq_len}")
    for k in keys:
      if k != "span_local":
        row[k][start : start + n] = s[k]
    row["segment_ids"][start : start + n] = seg
    row["positions"][start : start + n] = np.arange(n)
    if "span_local" in s:
      local = np.asarray(s["span_local"], np.int32)
      row["span_ids"][start : start + n] = np.where(local > 0, local + spans, 0)
      spans += int(local.max(initial=0))
    attachments += [(start + offset, data) for offset, data in s.get("attachments", ())]
    start += n
  row["attachments"] = attachments
  return row


def empty_row(like: Mapping[str, Any], pad_values: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """An all-padding row shaped like `like` (fills the last batch of a finite pipeline)."""
  pad_values = pad_values or {}
  ids = ("segment_ids", "positions", "span_ids")  # always 0 on padding
  row = {k: np.full_like(v, 0 if k in ids else pad_values.get(k, 0)) for k, v in like.items() if k != "attachments"}
  row["attachments"] = []
  return row


class PackIterDataset(grain.IterDataset):
  """Samples (or skip markers) -> packed rows. Reads `window` samples, packs them all, emits the rows.

  Checkpointable: the state is the parent's state at the start of the current window, the counters at
  that point and how many of the window's rows were emitted; restoring re-reads and re-packs the window
  (deterministic) and skips the emitted rows, so counters and rows continue exactly.
  """

  def __init__(self, parent: grain.IterDataset, *, seq_len: int, window: int = 64, method: str = "best_fit",
               pad_values: Mapping[str, Any] | None = None, max_consecutive_skips: int = 1000,
               sources: Mapping[str, str] | None = None):
    super().__init__(parent)
    if method not in METHODS:
      raise ValueError(f"unknown packing method {method!r}; expected one of {METHODS}")
    if seq_len <= 0 or window <= 0 or max_consecutive_skips <= 0:
      raise ValueError(f"seq_len ({seq_len}), window ({window}) and max_consecutive_skips "
                       f"({max_consecutive_skips}) must be positive")
    self.seq_len, self.window, self.method = seq_len, window, method
    self.pad_values = dict(pad_values or {})
    self.max_consecutive_skips = max_consecutive_skips
    self.sources = dict(sources or {})  # stream -> what it reads, for messages

  def __iter__(self) -> PackIterator:
    return PackIterator(self)

  def __str__(self) -> str:
    return f"PackIterDataset(seq_len={self.seq_len}, window={self.window}, method={self.method})"


class PackIterator(grain.DatasetIterator):
  """Iterator of `PackIterDataset`; `counters` holds samples/rows/tokens/slots and skipped/<reason>."""

  def __init__(self, ds: PackIterDataset):
    super().__init__(ds._parent.__iter__())
    self._ds = ds
    self.counters: collections.Counter[str] = collections.Counter()
    # per stream: reasons of the records skipped since its last usable one, and a few of them by name
    self._runs: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    self._examples: dict[str, list[str]] = collections.defaultdict(list)
    self._window_state = self._parent.get_state()
    self._window_counters = dict(self.counters)
    self._groups: list[list[dict[str, Any]]] = []  # the current window's samples, row by row
    self._emitted = 0
    self._exhausted = False  # the parent has ended

  def _fill(self) -> None:
    """Reads the next window from the parent and assigns its samples to rows (`self._groups`)."""
    self._window_state = self._parent.get_state()
    self._window_counters = dict(self.counters)
    self._emitted = 0
    samples = []
    for _ in range(self._ds.window):
      try:
        s = next(self._parent)
      except StopIteration:
        self._exhausted = True
        break
      if SKIP_KEY in s:
        self._skip(s, s[SKIP_KEY])
      elif len(s["input_ids"]) > self._ds.seq_len:
        self._skip(s, "too_long", f"{len(s['input_ids'])} tokens > seq_len {self._ds.seq_len}")
      elif len(s["input_ids"]) == 0:
        self._skip(s, "empty_sample")
      else:
        self._runs.pop(s.get("stream", ""), None)
        samples.append(s)
    groups = assign_rows([len(s["input_ids"]) for s in samples], self._ds.seq_len, self._ds.method)
    self._groups = [[samples[i] for i in g] for g in groups]

  def _skip(self, s: Mapping[str, Any], reason: str, detail: str = "") -> None:
    stream = s.get("stream", "")
    detail = detail or s.get("detail", "")
    where = f"{s.get('id', '?')} ({reason}{': ' + detail if detail else ''})"
    if not s.get("epoch", 0):  # the same record comes back every epoch: count and name it once
      self.counters[f"skipped/{reason}"] += 1
      if len(self._examples[stream]) < NAMED_SKIPS:
        self._examples[stream].append(where)
        logging.warning("data: skipped %s record %s", stream or "a", where)
    run = self._runs[stream]
    run[reason] += 1
    if sum(run.values()) >= self._ds.max_consecutive_skips:
      reasons = ", ".join(f"{k} {v}" for k, v in run.most_common())
      source = self._ds.sources.get(stream, "its source")
      raise TooManySkips(
          f"data: the last {sum(run.values())} records of stream {stream!r} were all skipped ({reasons}); source "
          f"{source}; e.g. {'; '.join(self._examples[stream][:3] or [where])}. Fix or remove these records, or "
          "raise config.data.max_consecutive_skips")

  def _count(self, samples: list[dict[str, Any]]) -> None:
    self.counters["rows"] += 1
    self.counters["slots"] += self._ds.seq_len
    for s in samples:
      self.counters["samples"] += 1
      self.counters["tokens"] += len(s["input_ids"])
      if "stream" in s:
        self.counters[f"samples/{s['stream']}"] += 1

  def __next__(self) -> dict[str, Any]:
    while self._emitted >= len(self._groups):  # a window may hold only skipped records: read on
      if self._exhausted:
        raise StopIteration
      self._fill()
    group = self._groups[self._emitted]
    row = pack_row(group, self._ds.seq_len, self._ds.pad_values)
    self._count(group)
    self._emitted += 1
    return row

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._window_state, "counters": dict(self._window_counters), "emitted": self._emitted}

  def set_state(self, state: Mapping[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self.counters = collections.Counter(state["counters"])
    emitted = int(state["emitted"])
    self._groups, self._emitted, self._exhausted = [], 0, False
    if emitted:
      self._fill()
      for g in self._groups[:emitted]:
        self._count(g)
      self._emitted = emitted
    else:  # nothing of this window was emitted: the next call reads it afresh
      self._window_state, self._window_counters = state["parent"], dict(state["counters"])
