"""Logical axis vocabulary and the default mapping of logical names onto the mesh.

Models annotate every parameter and activation with the logical names below and never name a
mesh axis; the entry point binds rules (`nn.logical_axis_rules`) and a mesh (`jax.set_mesh`).
Mesh axes: `data`, `fsdp`, `tensor`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

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


# ---------------------------------------------------------------------------------------------
# Entry-point helpers: mesh from config, rules from config, how much of the params is replicated.
# Library code never enters the mesh or the rules; `unimm_jax.training` does, once.
# ---------------------------------------------------------------------------------------------

AXIS_TYPES = {"auto": jax.sharding.AxisType.Auto, "explicit": jax.sharding.AxisType.Explicit}


def resolve_mesh_shape(ici: Sequence[int], dcn: Sequence[int],
                       num_devices: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Fills the one -1 in `ici` (within a slice) and checks ici * dcn covers `num_devices` exactly.

  ici: devices per slice on (data, fsdp, tensor); dcn: slices on the same axes (multi-slice; all 1 on
  one slice). Returns (ici, dcn) with concrete sizes.
  """
  ici, dcn = tuple(int(x) for x in ici), tuple(int(x) for x in dcn)
  if len(ici) != len(MESH_AXES) or len(dcn) != len(MESH_AXES):
    raise ValueError(f"mesh: ici {ici} and dcn {dcn} need one size per axis {MESH_AXES}")
  if any(x < 1 for x in dcn):
    raise ValueError(f"mesh: dcn sizes {dcn} must be >= 1 (-1 is only allowed in ici)")
  slices = int(np.prod(dcn))
  if num_devices % slices:
    raise ValueError(f"mesh: {num_devices} devices do not split into dcn {dcn} = {slices} slices")
  per_slice = num_devices // slices
  fills = [i for i, x in enumerate(ici) if x == -1]
  if len(fills) > 1 or any(x == 0 or x < -1 for x in ici):
    raise ValueError(f"mesh: ici {ici} may hold one -1 (fill) and otherwise positive sizes")
  known = int(np.prod([x for x in ici if x != -1]))
  if fills:
    if per_slice % known:
      raise ValueError(f"mesh: {per_slice} devices per slice are not divisible by ici {ici} without -1")
    ici = tuple(per_slice // known if x == -1 else x for x in ici)
  if int(np.prod(ici)) != per_slice:
    raise ValueError(f"mesh: ici {ici} uses {int(np.prod(ici))} devices, a slice has {per_slice} "
                     f"({num_devices} devices / {slices} slices)")
  return ici, dcn


def make_mesh(ici: Sequence[int] = (1, -1, 1), dcn: Sequence[int] = (1, 1, 1), axis_types: str = "auto",
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """Mesh over (data, fsdp, tensor); axis size = ici * dcn. dcn > 1 lays slices out over DCN."""
  devices = list(jax.devices() if devices is None else devices)
  if axis_types not in AXIS_TYPES:
    raise ValueError(f"mesh.axis_types {axis_types!r} is not one of {tuple(AXIS_TYPES)}")
  ici, dcn = resolve_mesh_shape(ici, dcn, len(devices))
  types = (AXIS_TYPES[axis_types],) * len(MESH_AXES)
  if int(np.prod(dcn)) == 1:
    return jax.make_mesh(ici, MESH_AXES, axis_types=types, devices=devices)
  from jax.experimental import mesh_utils  # multi-slice only: needs devices that know their slice
  grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
  return jax.sharding.Mesh(grid, MESH_AXES, axis_types=types)


def rules_from_config(rules: Sequence[Sequence]) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
  """Validates [(logical name, mesh axis | axes | None), ...]; order matters (first free rule wins)."""
  out = []
  for i, rule in enumerate(rules):
    if len(rule) != 2:
      raise ValueError(f"sharding.rules[{i}] = {rule!r}: expected (logical_name, mesh_axes)")
    name, axes = rule
    check_logical_names([name], f"sharding.rules[{i}]")
    axes_t = (axes,) if isinstance(axes, str) else tuple(axes or ())
    bad = [a for a in axes_t if a not in MESH_AXES]
    if bad:
      raise ValueError(f"sharding.rules[{i}] = {rule!r}: mesh axes {bad} not in {MESH_AXES}")
    out.append((name, None if axes is None else (axes if isinstance(axes, str) else tuple(axes))))
  return tuple(out)


def replicated_fraction(abstract: Any, shardings: Any) -> float:
  """Share of parameter bytes stored whole on every device (spec with no mesh axis > 1)."""
  total = replicated = 0
  for leaf, sh in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings), strict=True):
    nbytes = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    total += nbytes
    if sh.num_devices > 1 and sh.is_fully_replicated:
      replicated += nbytes
  return replicated / max(total, 1)


def bytes_per_device(abstract: Any, shardings: Any) -> int:
  """Parameter bytes the fullest device holds: each leaf's shard (NamedSharding.shard_shape), whole if replicated.
  Computed from shapes alone, so it tells what fits before anything is allocated."""
  per_device: dict[Any, int] = {}
  for leaf, sh in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings), strict=True):
    nbytes = int(np.prod(sh.shard_shape(leaf.shape))) * np.dtype(leaf.dtype).itemsize
    for device in sh.device_set:
      per_device[device] = per_device.get(device, 0) + nbytes
  return max(per_device.values(), default=0)


def check_tolerance(abstract: Any, shardings: Any, tolerance: float, where: str) -> float:
  """Raises if more than `tolerance` of param bytes is replicated on a multi-device mesh (MaxText's
  `sharding_tolerance`): a rule typo would otherwise silently replicate a whole model."""
  frac = replicated_fraction(abstract, shardings)
  if frac > tolerance:
    flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
    big = sorted(((int(np.prod(x.shape)), jax.tree_util.keystr(p)) for (p, x), s in
                  zip(flat, jax.tree.leaves(shardings)) if s.is_fully_replicated), reverse=True)[:5]
    raise ValueError(f"{where}: {frac:.1%} of parameter bytes are replicated (tolerance {tolerance:.1%}); "
                     f"largest replicated: {big}. Check sharding.rules and the mesh.")
  return frac
