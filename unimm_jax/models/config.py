"""What every frozen model config shares: a JSON-able dict form and a strict way back.

Configs travel through unimm_config.json, ml_collections ConfigDicts and HF config.json files, all of
which turn tuples into lists; the frozen dataclasses need tuples back to stay hashable (they are static
arguments of jitted functions), and an unknown field is a typo or a newer version, so it is refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


class DictConfig:
  """Mixin for `@dataclasses.dataclass(frozen=True)` configs: `to_dict` and the strict `from_dict`."""

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]):
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
