"""A streaming safetensors writer (the inverse of sources.safetensors_source); bf16 included."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping

import numpy as np

from unimm_jax.convert.sources import SAFETENSORS_DTYPES

_NAMES = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}


def save_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None):
  """Writes {name: array} to `path` (through a temporary file renamed at the end)."""
  header, offset = {}, 0
  for name, arr in tensors.items():
    dtype = np.dtype(arr.dtype)
    if dtype not in _NAMES:
      raise ValueError(f"{path}: tensor {name!r} has dtype {dtype} that safetensors cannot store")
    header[name] = {"dtype": _NAMES[dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
    offset += arr.nbytes
  if metadata:
    header["__metadata__"] = dict(metadata)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # the format aligns the data section to 8 bytes
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for arr in tensors.values():
      f.write(np.ascontiguousarray(arr).tobytes())
  os.replace(tmp, path)
