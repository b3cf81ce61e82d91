"""The annotation check every model's tests run: each param carries logical names from the vocabulary."""

import flax.linen as nn
import jax

from unimm_jax import sharding


def assert_every_param_annotated(boxed, scan: bool = False) -> None:
  """`boxed`: params from `jax.eval_shape(module.init, ...)["params"]` (still boxed). Under scan, stacked layer
  params lead with the "layers" axis."""
  leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  for path, leaf in leaves:
    where = jax.tree_util.keystr(path)
    assert isinstance(leaf, nn.Partitioned), f"{where} has no logical names"
    assert len(leaf.names) == leaf.value.ndim, f"{where}: names {leaf.names} for shape {leaf.value.shape}"
    sharding.check_logical_names(leaf.names, where)
    if scan and "layers" in where:
      assert leaf.names[0] == "layers", f"{where}: scanned param without the leading layers axis"
