"""Streaming readers for PyTorch / Hugging Face weight files.

A source is a mapping from tensor name to a zero-argument loader, so a converter touches one tensor
at a time. safetensors files are parsed here (8-byte header length, JSON header, raw data) and read
with plain file reads rather than mmap, so pages of tensors already converted do not stay resident.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator, Mapping

import ml_dtypes
import numpy as np

from unimm_jax.convert.errors import ConversionError

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}
WEIGHT_FILES = (
    "model.safetensors.index.json", "model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin",
)


class LazyTensors(Mapping):
  """name -> loader() -> np.ndarray; iterating yields names in file order."""

  def __init__(self, loaders: dict[str, Callable[[], np.ndarray]], shapes: dict[str, tuple[int, ...]],
               origin: dict[str, str]):
    self._loaders, self.shapes, self.origin = loaders, shapes, origin

  def __getitem__(self, key: str) -> Callable[[], np.ndarray]:
    return self._loaders[key]

  def __iter__(self) -> Iterator[str]:
    return iter(self._loaders)

  def __len__(self) -> int:
    return len(self._loaders)


def read_safetensors_header(path: str) -> tuple[dict, int]:
  """-> (header without __metadata__, byte offset of the data section). Checks the file is whole."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise ConversionError(f"{path}: truncated safetensors file ({size} bytes, no header)")
    (n,) = struct.unpack("<Q", raw)
    if 8 + n > size:
      raise ConversionError(f"{path}: truncated safetensors file: header of {n} bytes, file has {size}")
    try:
      header = json.loads(f.read(n))
    except json.JSONDecodeError as e:
      raise ConversionError(f"{path}: corrupt safetensors header: {e}") from e
  header.pop("__metadata__", None)
  end = max((v["data_offsets"][1] for v in header.values()), default=0)
  if 8 + n + end > size:
    raise ConversionError(
        f"{path}: truncated safetensors file: header describes {8 + n + end} bytes, file has {size}")
  return header, 8 + n


def safetensors_source(path: str) -> LazyTensors:
  header, base = read_safetensors_header(path)
  loaders, shapes = {}, {}
  for name, info in header.items():
    if info["dtype"] not in SAFETENSORS_DTYPES:
      raise ConversionError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    dtype, shape = np.dtype(SAFETENSORS_DTYPES[info["dtype"]]), tuple(info["shape"])
    start, end = info["data_offsets"]

    def load(start=start, end=end, dtype=dtype, shape=shape, name=name):
      with open(path, "rb") as f:
        f.seek(base + start)
        buf = f.read(end - start)
      if len(buf) != end - start:
        raise ConversionError(f"{path}: tensor {name!r} is truncated")
      return np.frombuffer(buf, dtype=dtype).reshape(shape)

    loaders[name], shapes[name] = load, shape
  return LazyTensors(loaders, shapes, {k: path for k in loaders})


def torch_source(path: str) -> LazyTensors:
  """A `.bin` / `.pth` / `.pt` state dict (needs torch). Unwraps {'state_dict'|'model'|'module': {...}, ...}: a
  training checkpoint keeps step and optimizer state beside the weights (tuna-2's `{"model", "step",
  "optimizer", ...}`, read as its checkpoint_loader does)."""
  try:
    import torch
  except ImportError as e:
    raise ConversionError(f"{path}: reading a PyTorch state dict needs torch (pip install torch)") from e
  try:
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
  except Exception as e:  # torch raises many types for corrupt or truncated archives
    raise ConversionError(f"{path}: cannot read PyTorch state dict: {e}") from e
  while isinstance(state, dict) and (wrapper := next((k for k in ("model", "state_dict", "module")
                                                      if isinstance(state.get(k), dict)), None)):
    state = state[wrapper]
  if not isinstance(state, dict):
    raise ConversionError(f"{path}: expected a state dict, got {type(state).__name__}")

  def to_numpy(t):
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
      return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()

  loaders = {k: (lambda t=t: to_numpy(t)) for k, t in state.items() if hasattr(t, "shape")}
  return LazyTensors(loaders, {k: tuple(state[k].shape) for k in loaders}, {k: path for k in loaders})


def merge(sources: list[LazyTensors]) -> LazyTensors:
  loaders, shapes, origin = {}, {}, {}
  for src in sources:
    for k in src:
      if k in loaders:
        raise ConversionError(f"tensor {k!r} appears in both {origin[k]} and {src.origin[k]}")
      loaders[k], shapes[k], origin[k] = src[k], src.shapes[k], src.origin[k]
  return LazyTensors(loaders, shapes, origin)


def open_weights(path: str) -> LazyTensors:
  """A weights file, or a directory holding one of WEIGHT_FILES (sharded index files included)."""
  if os.path.isfile(path):
    if path.endswith(".safetensors"):
      return safetensors_source(path)
    if path.endswith(".json"):
      return _indexed(path)
    return torch_source(path)
  if not os.path.isdir(path):
    raise ConversionError(f"{path}: no such file or directory")
  for name in WEIGHT_FILES:
    if os.path.exists(os.path.join(path, name)):
      return open_weights(os.path.join(path, name))
  raise ConversionError(f"{path}: no weights found (looked for {', '.join(WEIGHT_FILES)})")


def _indexed(index_path: str) -> LazyTensors:
  with open(index_path) as f:
    weight_map = json.load(f)["weight_map"]
  folder = os.path.dirname(index_path)
  files = sorted(set(weight_map.values()))
  missing = [f for f in files if not os.path.exists(os.path.join(folder, f))]
  if missing:
    raise ConversionError(f"{index_path}: shard files listed but missing: {missing}")
  merged = merge([open_weights(os.path.join(folder, f)) for f in files])
  unlisted = sorted(set(weight_map) - set(merged))
  if unlisted:
    raise ConversionError(f"{index_path}: tensors listed in the index but absent from shards: {unlisted[:10]}")
  return merged
