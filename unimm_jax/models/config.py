"""What every frozen model config shares: a JSON-able dict form and a strict way back, written once.

Configs travel through unimm_config.json, ml_collections ConfigDicts and HF config.json files, all of
which turn tuples into lists and nested configs into dicts; the frozen dataclasses need tuples back to stay
hashable (they are static arguments of jitted functions) and their nested configs rebuilt, and an unknown
field is a typo or a newer version, so it is refused.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar

from unimm_jax.layers.stack import check_remat


RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat", "attention_impl")


def push_runtime(cfg: Any, parts: tuple[str, ...], fields: tuple[str, ...] = RUNTIME_FIELDS) -> None:
  """Copies a composite config's runtime fields (speed and memory, never the numbers) onto its part configs.

  Called from the composite's `__post_init__`: the configs are frozen, so the parts are replaced once, there.
  """
  runtime = {k: getattr(cfg, k) for k in fields}
  for part in parts:
    object.__setattr__(cfg, part, dataclasses.replace(getattr(cfg, part), **runtime))


class DictConfig:
  """Mixin for `@dataclasses.dataclass(frozen=True)` configs: `to_dict` and the strict `from_dict`.

  Fields typed as another DictConfig (or `X | None`) are rebuilt recursively. RETIRED_FIELDS lists fields older
  versions wrote and this one no longer has: dropped on read, so old checkpoints still load.
  """

  RETIRED_FIELDS: ClassVar[tuple[str, ...]] = ()

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]):
    d = {k: v for k, v in d.items() if k not in cls.RETIRED_FIELDS}
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _value(hints[k], v) for k, v in d.items()})


def _value(hint: Any, v: Any) -> Any:
  if isinstance(v, Mapping):
    nested = [t for t in (typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,))
              if isinstance(t, type) and issubclass(t, DictConfig)]
    if nested:
      return nested[0].from_dict(v)
  return tuple(v) if isinstance(v, list) else v


class EncoderConfig(DictConfig):
  """Mixin for vision-encoder configs with `embed`, `heads`, `depth`, `feature_layer` and `remat` fields: the head
  size, the layers a feature layer keeps, and the checks they share (call `check_encoder` in __post_init__)."""

  @property
  def head_dim(self) -> int:
    return self.embed // self.heads

  @property
  def num_layers(self) -> int:
    """Layers built and run: hidden_states[feature_layer] (HF indexing: 0 = the embeddings, -1 = the last layer's
    output) is the output of this many layers; later layers are not built."""
    if self.feature_layer is None:
      return self.depth
    return self.feature_layer if self.feature_layer >= 0 else self.depth + 1 + self.feature_layer

  def check_encoder(self) -> None:
    name = type(self).__name__
    if self.embed % self.heads:
      raise ValueError(f"{name}: embed {self.embed} is not a multiple of heads {self.heads}")
    check_remat(self.remat, name)
    if not 1 <= self.num_layers <= self.depth:
      raise ValueError(f"{name}: feature_layer {self.feature_layer} selects {self.num_layers} of "
                       f"{self.depth} layers; it must select at least one")
