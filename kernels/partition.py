"""The Pallas attention under a device mesh: each device runs the kernels on its own batch rows and heads.

`pallas_call` has no SPMD partitioning rule, so under a mesh XLA would gather q/k/v onto every device and
compute the whole attention there. `sharded` wraps the kernels (forward and the custom VJP) in a
`shard_map` whose specs come from the ambient context: the mesh set by `jax.set_mesh` and the logical rules
bound by `nn.logical_axis_rules`, read for the names the attention layer constrains q/k/v with
(`act_batch`, `act_heads`, `act_kv_heads`). No mesh axis is named here.

Shapes: b batch, t|s query|key tokens, h|k query|kv heads, g = h / k, e head dim; nb|nh the number of
devices along the batch|heads mesh axes.
- batch: the longest prefix of act_batch's mesh axes whose size divides b (a batch of 1 in decoding is
  not split);
- heads: act_heads' mesh axes if their size nh divides h, else none (q is then gathered over them);
- kv heads: split with the query heads when act_kv_heads maps to the same axes and nh divides k, so each
  device keeps its h/nh query heads and their k/nh kv heads. Otherwise (e.g. 2 kv heads on 4 tensor
  devices; flax's constraint then leaves k/v replicated on those axes) k/v enter whole over the heads
  axes and each device takes, for each of its h/nh query heads, that head's kv head (a kv head shared by
  several local query heads is copied, so the local problem is plain multi-head attention).
Sequence and head-dim axes are never split (no context parallelism): if the rules shard act_length or
act_head_dim, the operands are gathered along them at the kernel boundary.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

Q_AXES = ("act_batch", "act_length", "act_heads", "act_head_dim")  # as unimm_jax/layers/attention.py
KV_AXES = ("act_batch", "act_length", "act_kv_heads", "act_head_dim")

@dataclasses.dataclass(frozen=True)
class ShardPlan:
  """Mesh axes (each a tuple, major first) that split the batch, the query heads and the kv heads."""

  batch: tuple[str, ...]
  heads: tuple[str, ...]
  kv_heads: tuple[str, ...]  # == heads, or () when k/v enter whole over the heads axes

  @property
  def q_spec(self) -> P:
    return P(self.batch or None, None, self.heads or None, None)

  @property
  def kv_spec(self) -> P:
    return P(self.batch or None, None, self.kv_heads or None, None)

  @property
  def ids_spec(self) -> P:
    return P(self.batch or None, None)


def _axes(entry, usable: dict[str, int]) -> tuple[str, ...]:
  names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
  return tuple(a for a in names if a in usable)


def plan(b: int, h: int, kh: int) -> ShardPlan | None:
  """The split of a [b t h e] / [b s k e] attention under the ambient mesh and rules; None: nothing to split.

  Only mesh axes of size > 1 that are not already manual (inside another shard_map) are used.
  """
  mesh = jax.sharding.get_abstract_mesh()
  rules = nn.get_logical_axis_rules()
  if mesh.empty or mesh.size == 1 or not rules:
    return None
  manual = jax.sharding.AxisType.Manual
  usable = {a: n for a, n, kind in zip(mesh.axis_names, mesh.axis_sizes, mesh.axis_types) if n > 1 and kind != manual}
  q_spec, kv_spec = nn.logical_to_mesh_axes(Q_AXES, rules), nn.logical_to_mesh_axes(KV_AXES, rules)
  batch = _axes(q_spec[0], usable)
  while batch and b % math.prod(usable[a] for a in batch):
    batch = batch[:-1]
  heads = _axes(q_spec[2], usable)
  if h % math.prod(usable[a] for a in heads):
    heads = ()
  kv_heads = heads if _axes(kv_spec[2], usable) == heads and kh % math.prod(usable[a] for a in heads) == 0 else ()
  if not batch and not heads:
    return None
  return ShardPlan(batch, heads, kv_heads)


def _local_kv_heads(k: jax.Array, v: jax.Array, heads_axes: tuple[str, ...], h: int, nh: int):
  """Inside the shard_map, k/v whole over the heads axes: [b s k e] -> [b s h/nh e], the kv head of each of
  this device's query heads."""
  local = h // nh
  groups = h // k.shape[2]
  first = jax.lax.axis_index(heads_axes) * local  # heads_axes in spec order: major first, as the split of q
  index = (first + jnp.arange(local)) // groups
  return jnp.take(k, index, axis=2), jnp.take(v, index, axis=2)


def sharded(fn: Callable, shard: ShardPlan, q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
            kv_segment_ids: jax.Array, span_ids: jax.Array | None) -> jax.Array:
  """fn(q, k, v, segment_ids, kv_segment_ids, span_ids) -> out, run per device under `shard`.

  check_vma is off: pallas_call's outputs carry no varying-axes type. Gradients of k/v that enter whole
  over the heads axes are summed over those axes by shard_map's transpose.
  """
  h = q.shape[2]
  nh = math.prod(jax.sharding.get_abstract_mesh().shape[a] for a in shard.heads)

  def body(q, k, v, segment_ids, kv_segment_ids, span_ids):
    if shard.heads and not shard.kv_heads:
      k, v = _local_kv_heads(k, v, shard.heads, h, nh)
    return fn(q, k, v, segment_ids, kv_segment_ids, span_ids)

  specs = (shard.q_spec, shard.kv_spec, shard.kv_spec, shard.ids_spec, shard.ids_spec,
           None if span_ids is None else shard.ids_spec)
  return jax.shard_map(body, mesh=None, in_specs=specs, out_specs=shard.q_spec, check_vma=False)(
      q, k, v, segment_ids, kv_segment_ids, span_ids)
