"""Ovis-U1 image sampling: the original's shifted schedule, Euler steps over the Yak velocity with text CFG
(text-to-image) or three-branch image / text guidance (editing), the VAE condition of an edit, and the decode
to uint8 (YakModel.get_schedule / denoise / edit_denoise / compute_vae_encodings, README 4.6).

Conventions (sampling/flow.py): t = 1 is noise; the Euler step is x += (t_next - t_cur) v. Latents are NHWC
here; the tokens are FLUX's 2x2 packing (feature = c*4 + dy*2 + dx, tokens row-major), ids (0, y, x) for the
noise and (1, y, x) for the edit condition. Shapes: b batch, n noise tokens, m condition tokens, T text tokens.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unimm_jax.models import ovis_u1
from unimm_jax.models.flux import image_ids, pack_latents, unpack_latents
from unimm_jax.models.yak import YakConfig
from unimm_jax.sampling import flow

SHIFT_TOKENS = (256, 4096)   # token counts at which mu = base_shift and mu = max_shift


def schedule(steps: int, noise_tokens: int, cfg: YakConfig) -> np.ndarray:
  """steps + 1 times from 1 to 0; with timestep_shift, t' = e^mu t / (1 + (e^mu - 1) t) (= the original's
  e^mu / (e^mu + 1/t - 1)), mu linear in the count of NOISE tokens (256 -> base_shift, 4096 -> max_shift)."""
  if steps < 1:
    raise ValueError(f"ovis_u1 schedule: steps must be >= 1, got {steps}")
  grid = np.linspace(1.0, 0.0, steps + 1, dtype=np.float64)
  if not cfg.timestep_shift:
    return grid
  (x1, x2), (y1, y2) = SHIFT_TOKENS, (cfg.base_shift, cfg.max_shift)
  mu = y1 + (noise_tokens - x1) * (y2 - y1) / (x2 - x1)
  return flow.shift_sigmas(grid, math.exp(mu))


@dataclasses.dataclass(frozen=True)
class Branch:
  """One forward of a guided step: the LLM condition txt [b T k] and, for edit, condition tokens [b m c]."""

  txt: jax.Array
  cond: jax.Array | None = None


@dataclasses.dataclass
class Trajectory:
  times: np.ndarray        # [steps] t of each step's forward
  x: list                  # steps x [b n c]: tokens at the start of each step (x[0] = packed noise)
  velocities: list         # steps x [branches] x [b n c]: each branch's velocity
  final: jax.Array         # [b n c] after the last step


class OvisImageSampler:
  """Euler over the decoder of a loaded OvisU1 (module + params); one jitted velocity for every branch."""

  def __init__(self, model: ovis_u1.OvisU1, params: Any):
    self.model, self.params, self.cfg = model, params, model.cfg
    self._velocity = jax.jit(lambda p, *a: model.apply({"params": p}, *a, method=ovis_u1.OvisU1.velocity))
    self._decode = jax.jit(lambda p, z: model.apply({"params": p}, z, method=lambda m, z: m.vae.decode(z)))
    self._encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=lambda m, x: m.vae.encode(x)))

  def sample(self, noise: jax.Array, branches: Sequence[Branch], weights: Sequence[float], grid: np.ndarray,
             on_step: Callable[[int], None] | None = None) -> Trajectory:
    """noise [b h w z] latents -> the guided Euler trajectory: v = sum_i weights[i] v(branch i)
    (flow.text_guidance, flow.image_text_guidance), one forward per branch, in branch order."""
    b, h, w, _ = noise.shape
    x = pack_latents(noise.astype(jnp.float32))
    ids = jnp.asarray(image_ids(h, w))
    cond_ids = jnp.asarray(image_ids(h, w, frame=1))
    xs, vs = [], []
    for i in range(len(grid) - 1):
      t = jnp.full((b,), grid[i], jnp.float32)
      outs = [self._velocity(self.params, x, ids, br.txt, t, *((br.cond, cond_ids) if br.cond is not None else ()))
              for br in branches]
      xs.append(x), vs.append(outs)
      x = x + float(grid[i + 1] - grid[i]) * flow.combine(outs, weights)
      if on_step is not None:
        on_step(i)
    return Trajectory(np.asarray(grid[:-1], np.float32), xs, vs, x)

  def vae_condition(self, pixels: jax.Array, eps: jax.Array | None = None, rng: jax.Array | None = None) -> jax.Array:
    """Edit condition tokens [b m c] of source pixels [b H W 3] in [-1, 1]: pack(sample * scaling_factor), the
    sample mean + std eps (eps given, or drawn from rng; the original draws it; neither: the mean)."""
    post = self._encode(self.params, pixels)
    if eps is None and rng is not None:
      eps = jax.random.normal(rng, post.mean.shape, post.mean.dtype)
    z = post.mean if eps is None else post.mean + post.std * eps
    vae = self.cfg.vae
    return pack_latents((z - (vae.shift_factor or 0.0)) * vae.scaling_factor)   # the release has no shift

  def decode(self, tokens: jax.Array, height: int, width: int) -> tuple[jax.Array, np.ndarray]:
    """Final tokens of a height x width latent -> (raw decoder output [b H W 3], uint8 image [b H W 3]):
    unpack / scaling_factor -> vae.decode -> clamp -> floor(127.5 (x + 1)) (the original truncates)."""
    vae = self.cfg.vae
    z = unpack_latents(tokens, height, width) / vae.scaling_factor + (vae.shift_factor or 0.0)
    raw = self._decode(self.params, z)
    pixels = np.floor(127.5 * (np.clip(np.asarray(raw, np.float32), -1, 1) + 1)).astype(np.uint8)
    return raw, pixels
