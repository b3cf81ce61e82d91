"""A stack of identical blocks, written once for every tower: loop or `nn.scan` layout, remat, per-layer outputs.

A block is a linen Module called as `block(x, own, *shared) -> (x, own_out)`: `own` is the layer's own input
(its slice of a KV cache, or None), scanned over the layer axis; `shared` (masks, RoPE angles, conditioning)
is the same for every layer. Built in a parent's `setup()`, the stack keeps the checkpoint layout of the
loop (`{name}_{i}` submodules of the parent) or of the scan (one `{name}` submodule whose params carry a
leading layer axis, annotated "layers"); `unimm_jax.checkpoint.stack_layers` converts between them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax

# remat policies by config name: none | full (recompute everything) | dots (save matmul outputs)
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def check_remat(remat: str, where: str) -> None:
  if remat not in REMAT_POLICIES:
    raise ValueError(f"{where}.remat {remat!r} is not one of {tuple(REMAT_POLICIES)}")


def _collecting(block: type[nn.Module]) -> type[nn.Module]:
  """The block, also returning its output as a per-layer value (the hidden states under scan). A subclass,
  not a wrapper module, so the parameter names stay the block's own."""

  class Collect(block):
    def __call__(self, x, own, *shared):
      x, own = super().__call__(x, own, *shared)
      return x, (own, x)

  Collect.__name__ = block.__name__
  return Collect


def build_layers(block: type[nn.Module], depth: int, *args: Any, scan: bool, remat: str = "none",
                 shared: int = 0, name: str = "layers", **kwargs: Any) -> nn.Module | list[nn.Module]:
  """`depth` blocks `block(*args, **kwargs)` to assign in a parent's setup(); `shared` is how many shared
  inputs a block takes after `own`."""
  check_remat(remat, name)
  cls = _collecting(block)
  if remat != "none":
    cls = nn.remat(cls, policy=REMAT_POLICIES[remat], prevent_cse=not scan)
  if scan:
    return nn.scan(cls, variable_axes={"params": 0}, split_rngs={"params": True}, length=depth,
                   in_axes=(0,) + (nn.broadcast,) * shared,
                   metadata_params={nn.PARTITION_NAME: "layers"})(*args, name=name, **kwargs)
  return [cls(*args, name=f"{name}_{i}", **kwargs) for i in range(depth)]


def run_layers(layers: nn.Module | Sequence[nn.Module], x: jax.Array, own: Any, *shared: Any,
               hidden_states: bool = False) -> tuple[jax.Array, tuple, Any]:
  """-> (output, the output of every layer if `hidden_states` (else ()), the layers' own outputs).

  `own` is None, or per layer: a dict {block name: value} in the loop layout, a tree stacked on axis 0 under scan.
  """
  if not isinstance(layers, (list, tuple)):
    x, (own_out, stacked) = layers(x, own, *shared)
    return x, tuple(stacked[i] for i in range(stacked.shape[0])) if hidden_states else (), own_out
  outs, own_out = [], {}
  for layer in layers:
    x, (own_out[layer.name], _) = layer(x, None if own is None else own[layer.name], *shared)
    outs.append(x)
  return x, tuple(outs) if hidden_states else (), None if own is None else own_out
