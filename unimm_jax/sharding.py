"""Logical axis vocabulary and the default mapping of logical names onto the mesh.

Models annotate every parameter and activation with the logical names below and never name a
mesh axis; the entry point binds rules (`nn.logical_axis_rules`) and a mesh (`jax.set_mesh`).
Mesh axes: `data`, `fsdp`, `tensor`.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

PARAM_AXES = (
    "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "conv_in", "conv_out", "norm", "layers",
)
ACTIVATION_AXES = (
    "act_batch", "act_length", "act_embed", "act_heads", "act_kv_heads", "act_head_dim", "act_mlp",
    "act_vocab", "act_frames", "act_height", "act_width", "act_channels",
)
MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("act_batch", ("data", "fsdp")), ("embed", "fsdp"), ("conv_in", "fsdp"),
    ("vocab", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"),
    ("conv_out", "tensor"), ("act_heads", "tensor"), ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"), ("act_vocab", "tensor"),
)  # unlisted names stay replicated; configs override via config.sharding.rules


def check_logical_names(names: Sequence[str | None], where: str) -> None:
  """Raises if `names` uses a logical axis outside the vocabulary."""
  for name in names:
    if name is not None and name not in PARAM_AXES + ACTIVATION_AXES:
      raise ValueError(f"{where}: logical axis {name!r} is not in unimm_jax.sharding's vocabulary")


def logical_shardings(abstract_tree, mesh: jax.sharding.Mesh, rules=DEFAULT_RULES):
  """Boxed abstract variables (from `jax.eval_shape(model.init, ...)`) -> tree of NamedSharding."""
  return nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract_tree), mesh, rules)
