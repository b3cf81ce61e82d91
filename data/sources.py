"""Random-access sources of canonical raw records: JSONL manifests, image folders, ArrayRecord, tfds.

Every source has `__len__` and `__getitem__` (grain's RandomAccessDataSource protocol) and returns canonical
raw records (schema in data/README.md): `id`, `stream`, `images` (paths, encoded bytes or uint8 arrays),
`text`, `answer`, `meta`. Manifest lines that cannot be parsed or lack the stream's fields are skipped
and counted in `source.skipped` (reason -> count) when the manifest is read, the first few logged with
their line and what is wrong; ArrayRecord and tfds records that cannot be read return a skip marker
(`skipped()`), which the packer counts and names.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import grain
import numpy as np
from absl import logging

from unimm_jax.data.packing import NAMED_SKIPS

STREAMS = ("t2i", "mmu", "edit", "text", "t2v", "vmmu")
IMAGE_COUNT = {"t2i": 1, "mmu": 1, "edit": 2, "text": 0, "t2v": 1, "vmmu": 1}  # a video stream's "image" is its clip
UNDERSTANDING = ("mmu", "vmmu")  # streams of (question, answer) records
# Field names the reference repos and common tools use, first match wins.
IMAGE_KEYS = {
    "t2i": (("image",), ("images",), ("file_name",), ("image_path",), ("path",)),
    "mmu": (("image",), ("images",), ("file_name",), ("image_path",)),
    "edit": (("source_image", "target_image"), ("input_image", "output_image"), ("src_image", "tgt_image"),
             ("input_image", "edited_image"), ("images",)),
    "text": (),
    "t2v": (("video",), ("video_path",), ("clip",), ("path",)),
    "vmmu": (("video",), ("video_path",), ("clip",)),
}
TEXT_KEYS = {
    "t2i": ("caption", "text", "prompt", "prompts"),
    "mmu": ("question", "prompt", "text"),
    "edit": ("instruction", "edit_instruction", "prompt", "text"),
    "text": ("text", "content"),
    "t2v": ("caption", "text", "prompt", "prompts"),
    "vmmu": ("question", "prompt", "text"),
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class RecordError(ValueError):
  """A manifest line or stored record that does not have the fields its stream needs."""


def skipped(reason: str, rid: str, stream: str) -> dict[str, str]:
  """The marker a source returns for a record it cannot read; the pipeline skips and counts it."""
  return {"skipped": reason, "id": rid, "stream": stream}


def _first(raw: Mapping[str, Any], keys: Sequence[str]) -> Any:
  for k in keys:
    if k in raw:
      return raw[k]
  return None


def _as_str(v: Any) -> str:
  return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def _conversation(turns: Sequence[Mapping[str, Any]], rid: str) -> tuple[list[str], str, str]:
  """LLaVA-style turns [{"from": "human"|"gpt", "value": ...}] -> (earlier turns, question, answer).

  Earlier turns alternate user, assistant; like LLaVA, the sequence builder puts the loss on every
  assistant turn, not only the last. The `<image>` placeholder is removed: the sequence builder decides
  where the image goes.
  """
  texts = [(str(t.get("from", t.get("role", ""))), _as_str(t.get("value", t.get("content", "")))) for t in turns]
  roles = [("human", "user"), ("gpt", "assistant")]
  for n, (role, _) in enumerate(texts):
    if role not in roles[n % 2]:
      raise RecordError(f"{rid}: conversation turn {n} is from {role!r}; turns must alternate "
                        f"{roles[0]} and {roles[1]}, starting with the user")
  if not texts or len(texts) % 2:
    raise RecordError(f"{rid}: conversation does not end with an assistant ('gpt') turn")
  values = [v.replace("<image>", "").strip() for _, v in texts]
  return values[:-2], values[-2], values[-1]


def canonical(raw: Mapping[str, Any], stream: str, *, rid: str, base_dir: str | None = None) -> dict[str, Any]:
  """A manifest/tfds record with any of the known field names -> the canonical raw record."""
  if stream not in STREAMS:
    raise ValueError(f"unknown stream {stream!r}; expected one of {STREAMS}")
  images: list[Any] = []
  for keys in IMAGE_KEYS[stream]:
    if all(k in raw for k in keys):
      found = [raw[k] for k in keys]
      images = list(found[0]) if len(keys) == 1 and isinstance(found[0], (list, tuple)) else found
      break
  if stream != "text" and not images:
    raise RecordError(f"{rid}: no image field (looked for {IMAGE_KEYS[stream]})")
  if len(images) != IMAGE_COUNT[stream]:
    raise RecordError(f"{rid}: {stream} records have {IMAGE_COUNT[stream]} image(s), got {len(images)}")
  if base_dir is not None:
    images = [os.path.join(base_dir, im) if isinstance(im, str) else im for im in images]
  answer, turns = "", [_as_str(t) for t in raw.get("turns", ())]
  if stream in UNDERSTANDING and "conversations" in raw:
    turns, text, answer = _conversation(raw["conversations"], rid)
  else:
    text = _first(raw, TEXT_KEYS[stream])
    if text is None:
      raise RecordError(f"{rid}: no text field (looked for {TEXT_KEYS[stream]})")
    if stream in UNDERSTANDING:
      answer = _first(raw, ("answer", "response"))
      if answer is None:
        raise RecordError(f"{rid}: no answer field (looked for 'answer', 'response', 'conversations')")
  if len(turns) % 2 or (turns and stream not in UNDERSTANDING):
    raise RecordError(f"{rid}: 'turns' must be earlier (user, assistant) pairs of an mmu / vmmu record, got "
                      f"{len(turns)} turns in a {stream} record")
  if isinstance(text, list):  # several captions per image: the first one is used
    text = text[0] if text else ""
  meta = raw.get("meta", "")
  return {"id": _as_str(raw.get("id", rid)), "stream": stream, "images": images, "text": _as_str(text),
          "answer": _as_str(answer), "turns": turns, "meta": meta if isinstance(meta, str) else _as_str(meta)}


class ManifestSource:
  """A JSONL manifest of one stream; image paths are relative to the manifest's folder."""

  def __init__(self, path: str | os.PathLike, stream: str):
    self.path, self.stream = os.fspath(path), stream
    self.skipped: collections.Counter[str] = collections.Counter()
    self.records: list[dict[str, Any]] = []
    base = os.path.dirname(os.path.abspath(self.path))
    with open(self.path, encoding="utf-8") as f:
      for n, line in enumerate(f, start=1):
        if not line.strip():
          continue
        rid = f"{self.path}:{n}"
        try:
          raw = json.loads(line)
          if not isinstance(raw, dict):
            raise RecordError(f"{rid}: a manifest line must be a JSON object")
          self.records.append(canonical(raw, stream, rid=rid, base_dir=base))
        except (json.JSONDecodeError, RecordError, AttributeError, TypeError) as e:
          self.skipped["bad_record"] += 1
          if self.skipped["bad_record"] <= NAMED_SKIPS:  # the first few by line, the rest counted
            logging.warning("data: skipped %s", e if isinstance(e, RecordError) else f"{rid}: {type(e).__name__}: {e}")

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self.records[index]

  def __repr__(self) -> str:
    return f"ManifestSource({self.path!r}, {self.stream!r}, {len(self)} records)"


class FolderSource(ManifestSource):
  """An image folder: `metadata.jsonl` (HF imagefolder layout) if present, else `x.png` + `x.txt` pairs.

  In the pairs layout a missing caption file gives an empty caption, which the pipeline skips and counts.
  """

  def __init__(self, folder: str | os.PathLike, stream: str = "t2i"):
    folder = os.fspath(folder)
    manifest = os.path.join(folder, "metadata.jsonl")
    if os.path.exists(manifest):
      super().__init__(manifest, stream)
      return
    if stream != "t2i":
      raise ValueError(f"{folder}: image+caption pairs only make t2i records; give a metadata.jsonl for {stream}")
    self.path, self.stream = folder, stream
    self.skipped = collections.Counter()
    self.records = []
    for name in sorted(os.listdir(folder)):
      stem, ext = os.path.splitext(name)
      if ext.lower() not in IMAGE_SUFFIXES:
        continue
      txt = os.path.join(folder, stem + ".txt")
      caption = open(txt, encoding="utf-8").read().strip() if os.path.exists(txt) else ""
      self.records.append({"id": os.path.join(folder, name), "stream": "t2i",
                           "images": [os.path.join(folder, name)], "text": caption, "answer": "", "turns": [],
                           "meta": ""})


# ArrayRecord files hold one canonical record per entry in a small self-describing format: a 4-byte
# little-endian header length, a JSON header, then the raw blobs (encoded images or array bytes) it indexes.
def encode_record(record: Mapping[str, Any]) -> bytes:
  """Canonical record (images as bytes, paths or uint8 arrays) -> bytes for an ArrayRecord file."""
  blobs, images = [], []
  for im in record["images"]:
    if isinstance(im, np.ndarray):
      images.append({"array": str(im.dtype), "shape": list(im.shape)})
      blobs.append(np.ascontiguousarray(im).tobytes())
    elif isinstance(im, (bytes, bytearray)):
      images.append({"bytes": len(im)})
      blobs.append(bytes(im))
    else:
      images.append({"path": os.fspath(im)})
  header = {k: record[k] for k in ("id", "stream", "text", "answer", "meta")}
  header["turns"] = list(record.get("turns", ()))
  header["images"] = images
  head = json.dumps(header, sort_keys=True).encode("utf-8")
  return struct.pack("<I", len(head)) + head + b"".join(blobs)


def decode_record(data: bytes) -> dict[str, Any]:
  """Inverse of `encode_record`."""
  (n,) = struct.unpack_from("<I", data)
  header = json.loads(data[4 : 4 + n].decode("utf-8"))
  pos, images = 4 + n, []
  for im in header.pop("images"):
    if "path" in im:
      images.append(im["path"])
    elif "bytes" in im:
      images.append(data[pos : pos + im["bytes"]])
      pos += im["bytes"]
    else:
      dtype, shape = np.dtype(im["array"]), tuple(im["shape"])
      size = int(np.prod(shape)) * dtype.itemsize
      images.append(np.frombuffer(data, dtype, count=int(np.prod(shape)), offset=pos).reshape(shape))
      pos += size
  return {"turns": [], **header, "images": images}  # files written before `turns` existed have none


def write_array_record(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> int:
  """Writes canonical records to one ArrayRecord file; returns how many."""
  from array_record.python.array_record_module import ArrayRecordWriter

  writer = ArrayRecordWriter(os.fspath(path), "group_size:1")
  n = 0
  try:
    for r in records:
      writer.write(encode_record(r))
      n += 1
  finally:
    writer.close()
  return n


class ArrayRecordSource:
  """Canonical records from ArrayRecord files written by `write_array_record` (unreadable -> skip marker)."""

  def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike]):
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    self.paths = [os.fspath(p) for p in paths]
    self._source = grain.sources.ArrayRecordDataSource(self.paths)
    self.skipped: collections.Counter[str] = collections.Counter()

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    try:
      return decode_record(self._source[index])
    except (ValueError, KeyError, TypeError, struct.error) as e:  # json errors are ValueErrors
      return skipped("bad_record", f"{self.paths}[{index}]: {e}", "")

  def __repr__(self) -> str:
    return f"ArrayRecordSource({self.paths}, {len(self)} records)"


class TfdsSource:
  """A tfds dataset read through `tfds.data_source` (no TensorFlow needed), mapped to canonical records.

  `fields` renames the dataset's features to canonical/alias names, e.g. {"image": "image", "caption":
  "captions/text"} ("/" walks nested features). A uint8 [k h w 3] image tensor counts as k images.
  """

  def __init__(self, name: str, split: str, stream: str, *, data_dir: str | None = None,
               fields: Mapping[str, str] | None = None):
    import tensorflow_datasets as tfds

    self.name, self.split, self.stream, self.fields = name, split, stream, dict(fields or {})
    self._source = tfds.data_source(name, split=split, data_dir=data_dir)
    self.skipped: collections.Counter[str] = collections.Counter()

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    raw = dict(self._source[index])
    for dst, src in self.fields.items():
      v: Any = raw
      for part in src.split("/"):
        v = v[part]
      raw[dst] = v
    if isinstance(raw.get("images"), np.ndarray) and raw["images"].ndim == 4:
      raw["images"] = list(raw["images"])
    rid = f"{self.name}/{self.split}/{index}"
    try:
      return canonical(raw, self.stream, rid=rid)
    except RecordError:
      return skipped("bad_record", rid, self.stream)

  def __repr__(self) -> str:
    return f"TfdsSource({self.name!r}, {self.split!r}, {self.stream!r}, {len(self)} records)"


SPEC_KINDS = ("jsonl", "folder", "array_record", "tfds")


def from_spec(spec: str, stream: str, *, key: str = "source") -> Any:
  """A source from a one-line spec, the form configs and command lines give (`key` names it in errors):

    jsonl:PATH                    a JSONL manifest (ManifestSource)
    folder:DIR                    an image folder (FolderSource)
    array_record:PATH[,PATH...]   ArrayRecord files; a path may be a glob
    tfds:NAME:SPLIT[:DATA_DIR]    a prepared tfds dataset (TfdsSource)
  """
  kind, sep, rest = spec.partition(":")
  if not sep or kind not in SPEC_KINDS or not rest:
    raise ValueError(f"{key}={spec!r}: expected one of {[k + ':...' for k in SPEC_KINDS]}")
  if stream not in STREAMS:
    raise ValueError(f"{key}: unknown stream {stream!r}; expected one of {STREAMS}")
  if kind == "tfds":
    name, _, rest = rest.partition(":")
    split, _, data_dir = rest.partition(":")
    if not name or not split:
      raise ValueError(f"{key}={spec!r}: expected tfds:NAME:SPLIT[:DATA_DIR]")
    return TfdsSource(name, split, stream, data_dir=data_dir or None)
  if kind == "array_record":
    paths = []
    for p in rest.split(","):
      found = sorted(glob.glob(p))
      if not found:
        raise FileNotFoundError(f"{key}={spec!r}: no file matches {p!r}")
      paths += found
    return ArrayRecordSource(paths)
  if not os.path.exists(rest):
    raise FileNotFoundError(f"{key}={spec!r}: {rest!r} does not exist")
  return ManifestSource(rest, stream) if kind == "jsonl" else FolderSource(rest, stream)
