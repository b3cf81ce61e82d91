"""The contract between the trainer and a model: what to build, how to score a batch, how much it costs.

The trainer knows nothing about any model. A task gives it:

  init_fn(rng) -> boxed params          linen `init(...)["params"]`, still wrapped in the logical
                                        partitioning metadata (the trainer reads the annotations from
                                        `jax.eval_shape(init_fn)` and jits init with those shardings)
  normalizers(batch) -> {name: scalar}  denominators of the loss terms over the *whole* global batch
                                        (e.g. the number of target tokens), computed before the batch is
                                        split for gradient accumulation
  loss_fn(params, batch, rng, norms) -> (loss, metrics)
                                        `loss` and every metric must be sums over the (micro)batch
                                        divided by `norms`, so that summing them over microbatches gives
                                        exactly the full-batch value (accumulation == large batch)

Batches are dicts of arrays whose leading axis is the example axis (sharded over the batch mesh axes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax

Params = Any
Batch = Mapping[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Task:
  """Everything model-specific the trainer needs.

  flops_per_example: analytic training FLOPs (forward + backward) for one example, for MFU.
  tokens_per_example / images_per_example: throughput units (images 0 when the task has none).
  frozen: path regexes (`re.fullmatch` on "a/b/c" param paths) frozen by this task on top of the
    config's `optim.freeze` (stage-wise training).
  load_params: pretrained params (unboxed, same tree as init) from a checkpoint path, or None.
  """

  name: str
  module: nn.Module
  init_fn: Callable[[jax.Array], Params]
  loss_fn: Callable[[Params, Batch, jax.Array, Mapping[str, jax.Array]], tuple[jax.Array, dict[str, jax.Array]]]
  normalizers: Callable[[Batch], dict[str, jax.Array]]
  flops_per_example: float
  tokens_per_example: int
  images_per_example: int = 0
  frozen: tuple[str, ...] = ()
  load_params: Callable[[str], Params] | None = None
