"""Rotary position embeddings: angle builders (1D, multimodal M-RoPE, per-axis t/h/w blocks) and rotations.

Angles are computed in fp32: [... t] positions -> [... t e/2] angles. `apply_rope` rotates [b t h e]
features either in halves (`rotate_half`, HF LLaMA/Qwen layout) or in interleaved pairs (2p, 2p+1).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def inv_frequencies(dim: int, theta: float) -> jax.Array:
  """[dim/2] inverse frequencies theta^(-2i/dim)."""
  return 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))


def rope_angles(pos: jax.Array, dim: int, theta: float) -> jax.Array:
  """[b t] positions -> [b t dim/2] angles."""
  return pos.astype(jnp.float32)[..., None] * inv_frequencies(dim, theta)


def rope_angles_mrope(pos: jax.Array, dim: int, theta: float, sections: Sequence[int]) -> jax.Array:
  """Qwen2-VL multimodal RoPE: [b t 3] (temporal, height, width) positions -> [b t dim/2] angles.

  Frequency j of the dim/2 takes its position from component c where j falls in the c-th block of
  `sections` (e.g. (16, 24, 24) for head_dim 128), exactly as transformers' `mrope_section`.
  """
  if sum(sections) != dim // 2:
    raise ValueError(f"mrope sections {tuple(sections)} must sum to head_dim/2 = {dim // 2}")
  angles = pos.astype(jnp.float32)[..., :, None] * inv_frequencies(dim, theta)  # [b t 3 dim/2]
  component = jnp.repeat(jnp.arange(len(sections)) % 3, jnp.asarray(sections), total_repeat_length=dim // 2)
  return jnp.take_along_axis(angles, component[None, None, None, :], axis=-2)[..., 0, :]


def apply_rope(x: jax.Array, angles: jax.Array, interleaved: bool = False) -> jax.Array:
  """Rotates x [b t h e] by angles [b t e/2] (broadcast over heads); output in x.dtype."""
  cos = jnp.cos(angles)[:, :, None, :].astype(x.dtype)
  sin = jnp.sin(angles)[:, :, None, :].astype(x.dtype)
  if interleaved:
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.reshape(x.shape)
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def llama3_inv_frequencies(dim: int, theta: float, factor: float, low_freq_factor: float,
                           high_freq_factor: float, original_max_positions: int) -> jax.Array:
  """[dim/2] inverse frequencies with LLaMA-3 scaling (transformers' `_compute_llama3_parameters`)."""
  inv_freq = inv_frequencies(dim, theta)
  wavelen = 2 * jnp.pi / inv_freq
  low_wavelen = original_max_positions / low_freq_factor
  high_wavelen = original_max_positions / high_freq_factor
  scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
  smooth = (original_max_positions / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return jnp.where(medium, smoothed, scaled)


def rope_angles_axes(pos: jax.Array, dims: Sequence[int], theta: float) -> jax.Array:
  """[... t n] positions on n axes -> [... t sum(dims)/2] angles: axis i rotates its own dims[i] features,
  the blocks concatenated in axis order (FLUX's `axes_dims_rope` over (t, h, w) ids; TUNA's 3D RoPE)."""
  if pos.shape[-1] != len(dims) or any(d % 2 for d in dims):
    raise ValueError(f"rope_angles_axes: positions {pos.shape} need one axis per dims {tuple(dims)}, each even")
  return jnp.concatenate([rope_angles(pos[..., i], d, theta) for i, d in enumerate(dims)], axis=-1)


def rope_angles_thw(pos: jax.Array, dim: int, theta: float, split: Sequence[int] = (2, 3, 3)) -> jax.Array:
  """[b t 3] (t, y, x) positions -> [b t dim/2] angles; head_dim split t:y:x = 2:3:3 (TUNA's 3D RoPE)."""
  dims = [dim * s // sum(split) for s in split]
  if sum(dims) != dim or any(d % 2 for d in dims):
    raise ValueError(f"rope_angles_thw: head_dim {dim} does not split {tuple(split)} into even parts")
  return rope_angles_axes(pos, dims, theta)
