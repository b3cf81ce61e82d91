"""Feed-forward blocks: gated (SwiGLU, Qwen) and plain two-layer (ViT)."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from unimm_jax.layers.linear import DenseGeneral

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


class GatedMLP(nn.Module):
  """down(act(gate(x)) * up(x)): [b t d] -> [b t d]."""

  features: int
  hidden: int
  act: str = "silu"
  use_bias: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
    gate = DenseGeneral((self.features,), (self.hidden,), ("embed", "mlp"), name="gate_proj", **kw)(x)
    up = DenseGeneral((self.features,), (self.hidden,), ("embed", "mlp"), name="up_proj", **kw)(x)
    h = nn.with_logical_constraint(activation(self.act)(gate) * up, ("act_batch", "act_length", "act_mlp"))
    return DenseGeneral((self.hidden,), (self.features,), ("mlp", "embed"), name="down_proj", **kw)(h)


class MLP(nn.Module):
  """fc2(act(fc1(x))): [... d] -> [... out_features] (default d); fc1 [d f], fc2 [f out_features]."""

  features: int
  hidden: int
  act: str = "gelu_tanh"
  use_bias: bool = True
  out_features: int | None = None    # a projection between widths (FLUX's pooled-text embedder: 768 -> 3072)
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
    h = DenseGeneral((self.features,), (self.hidden,), ("embed", "mlp"), name="fc1", **kw)(x)
    axes = ("act_batch",) + ("act_length",) * (h.ndim - 2) + ("act_mlp",)
    h = nn.with_logical_constraint(activation(self.act)(h), axes)
    return DenseGeneral((self.hidden,), (self.out_features or self.features,), ("mlp", "embed"), name="fc2",
                        **kw)(h)
