"""Layers written once and shared by every model family."""

from unimm_jax.layers.attention import Attention, JointAttention
from unimm_jax.layers.embed import Embed, scatter_placeholders
from unimm_jax.layers.linear import DenseGeneral
from unimm_jax.layers.mlp import MLP, GatedMLP, activation
from unimm_jax.layers.norms import LayerNorm, RMSNorm
from unimm_jax.layers.conv import CausalConv3D, Conv
from unimm_jax.layers.norms import GroupNorm, L2Norm
from unimm_jax.layers.rope import apply_rope, inv_frequencies, rope_angles, rope_angles_mrope

__all__ = [
    "Attention", "JointAttention", "DenseGeneral", "Embed", "GatedMLP", "LayerNorm", "MLP", "RMSNorm", "activation",
    "scatter_placeholders",
    "apply_rope", "inv_frequencies", "rope_angles", "rope_angles_mrope",
    "CausalConv3D", "Conv", "GroupNorm", "L2Norm",
]
