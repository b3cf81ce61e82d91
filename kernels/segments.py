"""Builders for packed-sequence metadata: segment ids, span ids, cu_seqlens.

Segment ids number the samples of a packed row 1, 2, ...; 0 marks padding. Span ids number the
bidirectional spans (e.g. images) of a row 1, 2, ...; 0 marks tokens outside any span.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def segment_ids_from_lengths(lengths: Sequence[int], seq_len: int) -> np.ndarray:
  """[n] sample lengths -> int32 [seq_len] ids 1..n, 0-padded. Raises if they do not fit."""
  total = int(sum(lengths))
  if total > seq_len:
    raise ValueError(f"lengths {list(lengths)} sum to {total} > seq_len {seq_len}")
  if any(n <= 0 for n in lengths):
    raise ValueError(f"lengths must be positive, got {list(lengths)}")
  ids = np.zeros(seq_len, np.int32)
  ids[:total] = np.repeat(np.arange(1, len(lengths) + 1, dtype=np.int32), lengths)
  return ids


def span_ids_from_spans(spans: Sequence[tuple[int, int]], seq_len: int) -> np.ndarray:
  """[(start, end)] half-open bidirectional spans -> int32 [seq_len] ids 1..n, 0 elsewhere."""
  ids = np.zeros(seq_len, np.int32)
  for n, (start, end) in enumerate(spans, start=1):
    if not 0 <= start < end <= seq_len:
      raise ValueError(f"span {n - 1} = ({start}, {end}) is not inside [0, {seq_len})")
    if ids[start:end].any():
      raise ValueError(f"span {n - 1} = ({start}, {end}) overlaps an earlier span")
    ids[start:end] = n
  return ids


def positions_from_segment_ids(segment_ids: np.ndarray) -> np.ndarray:
  """[... t] segment ids -> [... t] positions restarting at 0 in each segment (0 on padding)."""
  seg = np.asarray(segment_ids)
  pos = np.zeros_like(seg)
  flat_seg, flat_pos = seg.reshape(-1, seg.shape[-1]), pos.reshape(-1, seg.shape[-1])
  for row, out in zip(flat_seg, flat_pos):
    start = 0
    for i in range(1, len(row) + 1):
      if i == len(row) or row[i] != row[start]:
        if row[start] != 0:
          out[start:i] = np.arange(i - start)
        start = i
  return pos


def cu_seqlens_from_segment_ids(segment_ids: np.ndarray) -> np.ndarray:
  """int [t] ids of one row (samples contiguous, padding at the end) -> int32 [n + 1] offsets."""
  seg = np.asarray(segment_ids)
  if seg.ndim != 1:
    raise ValueError(f"expected one row of segment ids, got shape {seg.shape}")
  valid = seg[seg != 0]
  if valid.size and (np.any(np.diff(valid) < 0) or np.any(seg[: valid.size] == 0)):
    raise ValueError("segment ids must be non-decreasing with all padding (0) at the end")
  _, counts = np.unique(valid, return_counts=True)
  return np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)


def segment_ids_from_cu_seqlens(cu_seqlens: Sequence[int], seq_len: int) -> np.ndarray:
  """int32 [n + 1] offsets (first 0) -> [seq_len] ids 1..n, 0-padded."""
  cu = np.asarray(cu_seqlens)
  if cu.ndim != 1 or cu.size < 1 or cu[0] != 0 or np.any(np.diff(cu) <= 0):
    raise ValueError(f"cu_seqlens must start at 0 and be strictly increasing, got {cu.tolist()}")
  return segment_ids_from_lengths(np.diff(cu).tolist(), seq_len)
