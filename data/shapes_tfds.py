"""The shapes dataset as a tfds builder, written as ArrayRecord so it reads without TensorFlow.

    names = prepare(DIR, size=32, num_records=10_000)      # {"t2i": "unimm_shapes/t2i_32_10000", ...}
    source = TfdsSource(names["t2i"], "train", "t2i", data_dir=DIR)   # sources.py

Records equal `shapes.shapes_record(stream, i, size=..., seed=...)` for i in [0, num_records) (tfds stores
them in its own shuffled order; `id` names the index). Images are stored as one uint8 [k S S 3] tensor.
The class skips tfds' global registry, so importing it registers nothing; prepared data is found by
directory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from unimm_jax.data import shapes


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
  stream: str = "t2i"
  size: int = 32
  num_records: int = 10_000
  seed: int = 0

  @classmethod
  def make(cls, stream: str, size: int, num_records: int, seed: int = 0) -> ShapesConfig:
    """A config named `{stream}_{size}_{num_records}` (plus `_s{seed}` for a non-zero seed)."""
    name = f"{stream}_{size}_{num_records}" + (f"_s{seed}" if seed else "")
    return cls(name=name, stream=stream, size=size, num_records=num_records, seed=seed,
               description=f"shapes {stream} records at {size}x{size}, seed {seed}")


class ShapesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Synthetic shapes: captions, questions/answers, edit triplets and texts, generated from a seed."""

  name = "unimm_shapes"
  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {"1.1.0": "mmu records are conversations: earlier question/answer turns in `turns`.",
                   "2.0.0": "shapes sit on a 2x2 grid (was 3x3): one cell is one 16-px patch at 32x32."}
  BUILDER_CONFIGS = [ShapesConfig.make(s, z, 10_000) for s in shapes.STREAMS for z in shapes.SIZES]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds 4.9.10 derives this from the package with `importlib_resources`, a dependency it only declares
    # for Python < 3.9, so the default raises ModuleNotFoundError; the file is the answer anyway.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    z = self.builder_config.size
    # DatasetInfo directly: `dataset_info_from_configs` looks for metadata files next to the module.
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.builder_config.description,
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "stream": tfds.features.Text(),
            "images": tfds.features.Tensor(shape=(None, z, z, 3), dtype=np.uint8),
            "text": tfds.features.Text(),
            "answer": tfds.features.Text(),
            "turns": tfds.features.Sequence(tfds.features.Text()),
            "meta": tfds.features.Text(),
        }),
        homepage="https://github.com/unimm-jax/unimm-jax",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
    del dl_manager  # generated, nothing to download
    return {"train": self._generate_examples()}

  def _generate_examples(self) -> Iterator[tuple[int, dict[str, Any]]]:
    c = self.builder_config
    for i in range(c.num_records):
      r = shapes.shapes_record(c.stream, i, size=c.size, seed=c.seed)
      images = np.stack(r["images"]) if r["images"] else np.zeros((0, c.size, c.size, 3), np.uint8)
      yield i, {**r, "images": images}


def prepare(data_dir: str, *, size: int = 32, num_records: int = 10_000, seed: int = 0,
            streams: tuple[str, ...] = shapes.STREAMS) -> dict[str, str]:
  """Builds the shapes streams under `data_dir` (skipping prepared ones); returns stream -> tfds name."""
  names = {}
  for stream in streams:
    config = ShapesConfig.make(stream, size, num_records, seed)
    ShapesBuilder(config=config, data_dir=data_dir).download_and_prepare(file_format="array_record")
    names[stream] = f"{ShapesBuilder.name}/{config.name}"
  return names
