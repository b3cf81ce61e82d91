"""Feed-forward blocks: gated (SwiGLU, Qwen), plain two-layer (ViT) and the convolutional Mix-FFN (SANA, DC-AE)."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from unimm_jax.layers.conv import Conv
from unimm_jax.layers.linear import DenseGeneral
from unimm_jax.layers.norms import RMSNorm

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),   # transformers' name for the tanh form (T5 v1.1)
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


class GLUMBConv(nn.Module):
  """SANA's Mix-FFN (GLU mobile inverted bottleneck conv) over an image of tokens: [b h w d] -> [b h w o].

  conv_inverted (1x1, d -> 2f) -> SiLU -> conv_depth (depthwise 3x3 over the 2f channels) -> GLU
  (first half * SiLU(second half)) -> conv_point (1x1, f -> o, no bias) [-> RMSNorm with bias] [+ x]. The 1x1
  convs are dense layers over channels (kernels [d 2f], [f o]); DC-AE's EfficientViT blocks add the norm and
  the residual. Reference: diffusers models/transformers/sana_transformer.py GLUMBConv.
  """

  features: int
  hidden: int
  norm_eps: float | None = None   # None: no output norm (SANA); DC-AE: 1e-5
  residual: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    act = ("act_batch", "act_height", "act_width", "act_mlp")
    h = DenseGeneral((x.shape[-1],), (2 * self.hidden,), ("embed", "mlp"), True, name="conv_inverted", **kw)(x)
    h = nn.with_logical_constraint(jax.nn.silu(h), act)
    h = Conv(2 * self.hidden, (3, 3), groups=2 * self.hidden, name="conv_depth", **kw)(h)
    h, gate = jnp.split(h, 2, axis=-1)
    h = nn.with_logical_constraint(h * jax.nn.silu(gate), act)
    y = DenseGeneral((self.hidden,), (self.features,), ("mlp", "embed"), False, name="conv_point", **kw)(h)
    if self.norm_eps is not None:
      y = RMSNorm(self.features, self.norm_eps, use_bias=True, name="norm", **kw)(y)
    return y + x.astype(y.dtype) if self.residual else y
