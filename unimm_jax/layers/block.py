"""The pre-LN transformer encoder block of ViT, SigLIP and CLIP, written once.

Shapes: b batch, t tokens, d embed. Names follow transformers (`layer_norm1`, `self_attn`, `layer_norm2`,
`mlp` with fc1/fc2), so the SigLIP and CLIP key maps are renames.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from unimm_jax.layers.attention import Attention
from unimm_jax.layers.mlp import MLP
from unimm_jax.layers.norms import LayerNorm


class PreLNBlock(nn.Module):
  """x + attn(ln1(x)); x + mlp(ln2(x)): [b t d] -> [b t d], a `layers/stack.py` block.

  q/k/v/o and fc1/fc2 have biases; `causal` masks future tokens (CLIP's text tower).
  """

  features: int
  heads: int
  mlp: int
  act: str
  norm_eps: float
  causal: bool = False
  impl: str = "auto"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, own: None, segment_ids: jax.Array | None,
               kv_segment_ids: jax.Array | None = None) -> tuple[jax.Array, None]:
    """segment_ids [b t] (packing, 0 = padding) and/or kv_segment_ids [b t] (a key padding mask; padded
    queries still attend, as in transformers); see layers.Attention."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d = self.features
    h = LayerNorm(d, self.norm_eps, name="layer_norm1", **kw)(x)
    h, _ = Attention(d, self.heads, self.heads, d // self.heads, qkv_bias=True, o_bias=True, impl=self.impl,
                     name="self_attn", **kw)(h, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                                             causal=self.causal)
    x = x + h
    h = LayerNorm(d, self.norm_eps, name="layer_norm2", **kw)(x)
    x = x + MLP(d, self.mlp, self.act, name="mlp", **kw)(h)
    x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
    return x, own
