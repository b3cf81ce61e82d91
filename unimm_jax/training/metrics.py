"""Training metrics: TensorBoard event files (written and read without TensorFlow), throughput and MFU.

Event files are TFRecord streams of `tensorflow.Event` protos holding scalar summaries; the few
proto fields needed are encoded here by hand (wire format), so TensorBoard reads them and the
scaling plots read them back with `read_scalars`.

MFU = task.flops_per_example * examples per second / (peak FLOP/s per device * devices), the
flops coming from the task's analytic count (e.g. unimm_jax.training.lm.train_flops_per_token).
"""

from __future__ import annotations

import glob
import os
import socket
import struct
import time
from collections.abc import Mapping

import jax

# Dense bf16 peak FLOP/s per device, from the vendors' data sheets (H100/H200 SXM without sparsity).
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12,
}


def peak_flops(device: jax.Device, override_tflops: float = 0.0) -> float | None:
  """Per-device peak FLOP/s: the override if > 0, else the table entry for device_kind, else None."""
  if override_tflops > 0:
    return override_tflops * 1e12
  kind = device.device_kind
  for name in sorted(PEAK_FLOPS, key=len, reverse=True):  # longest (most specific) name first
    if kind.startswith(name):
      return PEAK_FLOPS[name]
  return None


# --- TFRecord + Event proto (wire format) ------------------------------------------------------

def _crc32c_table() -> list[int]:
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    table.append(c)
  return table


_CRC_TABLE = _crc32c_table()


def _masked_crc(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for b in data:
    crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
  crc ^= 0xFFFFFFFF
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    b, n = n & 0x7F, n >> 7
    out.append(b | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field(num: int, wire: int, payload: bytes) -> bytes:
  return _varint(num << 3 | wire) + payload


def _event(wall_time: float, step: int, summary: bytes | None = None, version: str | None = None) -> bytes:
  msg = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
  if version is not None:
    msg += _field(3, 2, _varint(len(version)) + version.encode())
  if summary is not None:
    msg += _field(5, 2, _varint(len(summary)) + summary)
  return msg


def _scalar_summary(scalars: Mapping[str, float]) -> bytes:
  out = b""
  for tag, value in scalars.items():
    v = _field(1, 2, _varint(len(tag.encode())) + tag.encode()) + _field(2, 5, struct.pack("<f", float(value)))
    out += _field(1, 2, _varint(len(v)) + v)
  return out


class EventWriter:
  """Appends scalar events to `logdir/events.out.tfevents.<time>.<host>` (one new file per writer)."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    self.path = os.path.join(logdir, f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}")
    self._f = open(self.path, "ab")
    self._write(_event(time.time(), 0, version="brain.Event:2"))

  def _write(self, data: bytes) -> None:
    header = struct.pack("<Q", len(data))
    self._f.write(header + struct.pack("<I", _masked_crc(header)) + data + struct.pack("<I", _masked_crc(data)))

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    self._write(_event(time.time(), int(step), summary=_scalar_summary(values)))
    self._f.flush()

  def close(self) -> None:
    self._f.close()


def _parse(msg: bytes) -> dict[int, list]:
  """Minimal proto decoder: field number -> list of raw values (ints, bytes, or fixed-width bytes)."""
  out: dict[int, list] = {}
  i = 0
  while i < len(msg):
    key, i = _read_varint(msg, i)
    num, wire = key >> 3, key & 7
    if wire == 0:
      val, i = _read_varint(msg, i)
    elif wire == 1:
      val, i = msg[i:i + 8], i + 8
    elif wire == 2:
      n, i = _read_varint(msg, i)
      val, i = msg[i:i + n], i + n
    elif wire == 5:
      val, i = msg[i:i + 4], i + 4
    else:
      raise ValueError(f"event proto: unsupported wire type {wire}")
    out.setdefault(num, []).append(val)
  return out


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
  shift = result = 0
  while True:
    b = buf[i]
    result |= (b & 0x7F) << shift
    i, shift = i + 1, shift + 7
    if not b & 0x80:
      return result, i


def read_scalars(logdir: str) -> dict[str, dict[int, float]]:
  """All scalars under `logdir` as {tag: {step: value}}; files are read in creation order, so a
  resumed run's values replace the ones its predecessor logged for the same steps. A record cut
  short at the end of a file (a killed writer) ends that file; a corrupt complete record raises."""
  out: dict[str, dict[int, float]] = {}
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      buf = f.read()
    i = 0
    while i + 12 <= len(buf):
      (n,) = struct.unpack("<Q", buf[i:i + 8])
      if i + 12 + n + 4 > len(buf):
        break
      data = buf[i + 12:i + 12 + n]
      if struct.unpack("<I", buf[i + 12 + n:i + 16 + n])[0] != _masked_crc(data):
        raise ValueError(f"{path}: corrupt record at byte {i}")
      i += 16 + n
      event = _parse(data)
      step = event.get(2, [0])[0]
      for summary in event.get(5, []):
        for value in _parse(summary).get(1, []):
          v = _parse(value)
          if 2 in v:
            out.setdefault(v[1][0].decode(), {})[step] = struct.unpack("<f", v[2][0])[0]
  return out
