"""Deterministic synthetic token rows for LLM training tests, smoke runs and benchmarks.

Each record is one packed row of `seq_len` tokens built from its index alone (so any process can read
any record, and a grain iterator state replays it exactly). A row holds documents that are arithmetic
progressions mod `vocab` (`start, start + stride, ...`): a model learns them from context, so the
loss falls. The tail of some rows is padding.

Record (numpy, shapes per row):
  input_ids   [t] int32   tokens; 0 on padding
  labels      [t] int32   = input_ids, IGNORE on padding (next-token targets are shifted by the task)
  segment_ids [t] int32   1, 2, ... per document, 0 on padding
  positions   [t] int32   position within each document, 0 on padding
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np

from unimm_jax.schema import IGNORE


@dataclasses.dataclass(frozen=True)
class SyntheticTokens:
  """grain random-access source of packed rows."""

  num_records: int
  seq_len: int
  vocab: int
  seed: int = 0
  min_doc_len: int = 4
  max_stride: int = 7
  pad_prob: float = 0.25     # share of rows whose tail is left as padding

  def __post_init__(self):
    if self.vocab < 3 or self.seq_len < self.min_doc_len or self.num_records < 1:
      raise ValueError(f"SyntheticTokens: need vocab >= 3, seq_len >= min_doc_len {self.min_doc_len}, "
                       f"num_records >= 1; got {self}")

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    if not 0 <= index < self.num_records:
      raise IndexError(f"SyntheticTokens: record {index} outside [0, {self.num_records})")
    rng = np.random.default_rng((self.seed, index))
    t = self.seq_len
    used = t - int(rng.integers(1, t // 4 + 1)) if rng.random() < self.pad_prob else t
    ids = np.zeros(t, np.int32)
    seg = np.zeros(t, np.int32)
    pos = np.zeros(t, np.int32)
    start, doc = 0, 1
    while start < used:
      left = used - start
      # Every document gets at least min_doc_len tokens, so the last one is never a stub.
      n = left if left < 2 * self.min_doc_len else int(rng.integers(self.min_doc_len, left - self.min_doc_len + 1))
      first, stride = rng.integers(0, self.vocab), rng.integers(1, self.max_stride + 1)
      ids[start:start + n] = (first + stride * np.arange(n)) % self.vocab
      seg[start:start + n] = doc
      pos[start:start + n] = np.arange(n)
      start, doc = start + n, doc + 1
    labels = np.where(seg > 0, ids, IGNORE).astype(np.int32)
    return {"input_ids": ids, "labels": labels, "segment_ids": seg, "positions": pos}


def dataset(source: SyntheticTokens, batch_per_process: int, *, process_index: int = 0,
            process_count: int = 1, seed: int = 0) -> grain.IterDataset:
  """Endless shuffled batches for one process of P.

  Every process shuffles the same way and reads only its own rows; stacked in process order, the P
  per-process batches of a step are exactly the batch one process with P * batch_per_process rows reads.
  """
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
  # Global step g is the P consecutive per-process batches g*P .. g*P + P-1; this process takes its own.
  return ds.batch(batch_per_process, drop_remainder=True)[process_index::process_count].to_iter_dataset()


def from_config(config: Any, batch_per_process: int, process_index: int, process_count: int) -> grain.IterDataset:
  """Dataset "synthetic_tokens" (unimm_jax.registry): config.data.{num_records, seq_len, vocab, seed}."""
  d = config.data
  src = SyntheticTokens(int(d.num_records), int(d.seq_len), int(d.vocab), seed=int(d.seed))
  return dataset(src, batch_per_process, process_index=process_index, process_count=process_count, seed=int(d.seed))
