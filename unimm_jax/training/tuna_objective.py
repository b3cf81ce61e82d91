"""TUNA's training objective: flow matching (t = 1 clean) on image tokens + next-token CE on text.

Reference: tuna-2 tuna/models/transport/transport.py (lognorm t, time shift), path.py (linear path),
misc.py (next_token_prediction, velocity_prediction), tuna.py (loss weights).
  x_t = t * x1 + (1 - t) * x0,  x0 ~ N(0, I);  velocity target x1 - x0 (x0-prediction: x1)
  t = sigmoid(u), u ~ N(0, 1), then shifted: 1 - t <- e^mu / (e^mu + 1 / (1 - t) - 1), mu = lin(seq_len)
  loss = flow_weight * mean over flow-masked (token, value) elements + ntp_weight * CE(ignore schema.IGNORE)
TUNA-2 (pixel space, x0-prediction) trains the JiT way instead (tuna/models/jit_utils.py): u ~ N(-0.8, 0.8),
no shift, and the x0 error weighted by 1 / max(1 - t, 0.05)^2, which is the velocity error of the
prediction v = (x0_hat - x_t) / (1 - t); `FlowConfig.tuna2()` sets that.
Deviation, on purpose: a batch with no flow token (understanding only) has flow loss 0 (denominator
clamped to 1), not the reference's NaN mean of nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

from unimm_jax import schema
from unimm_jax.models.tuna import TunaOutput
from unimm_jax.training import flow
from unimm_jax.training.lm import next_token_targets


@dataclasses.dataclass(frozen=True)
class FlowConfig:
  flow_weight: float = 1.0
  ntp_weight: float = 0.2
  shift_seq_len: int | None = 1024   # None: no time shift
  base_shift: float = 0.5
  max_shift: float = 1.15
  t_mean: float = 0.0                # t = sigmoid(N(t_mean, t_std^2)) before the shift
  t_std: float = 1.0
  x0_weighting: str = "none"         # x0-prediction: "none" (plain x0 MSE) or "velocity" (JiT, TUNA-2)
  t_eps: float = 0.05                # "velocity": 1 - t is clamped here

  def __post_init__(self):
    if self.x0_weighting not in ("none", "velocity"):
      raise ValueError(f"FlowConfig.x0_weighting must be 'none' or 'velocity', got {self.x0_weighting!r}")

  @classmethod
  def tuna2(cls, **overrides) -> FlowConfig:
    """TUNA-2's pixel-space JiT objective."""
    return cls(**{**dict(shift_seq_len=None, t_mean=-0.8, t_std=0.8, x0_weighting="velocity"), **overrides})


def sample_t(rng: jax.Array, shape: tuple[int, ...], cfg: FlowConfig) -> jax.Array:
  """TUNA's t = 1 - sigma (1 = clean): logit-normal, then the resolution shift applied to sigma."""
  t = flow.logit_normal(rng, shape, cfg.t_mean, cfg.t_std)
  if cfg.shift_seq_len is not None:
    t = 1 - flow.time_shift(1 - t, flow.shift_mu(cfg.shift_seq_len, cfg.base_shift, cfg.max_shift))
  return t


def noise_batch(batch: Mapping[str, jax.Array], rng: jax.Array, cfg: FlowConfig) -> dict[str, jax.Array]:
  """Adds span_t [b n], x_t [b t o], each token's t [b t] and the velocity target to a batch holding clean x1
  (data.tuna_sequences.to_batch)."""
  t_key, noise_key = jax.random.split(rng)
  span_t = jnp.where(batch["span_clean"], 1.0, sample_t(t_key, batch["span_clean"].shape, cfg))
  idx = jnp.clip(batch["span_ids"] - 1, 0, span_t.shape[1] - 1)
  t_tok = jnp.where(batch["span_ids"] > 0, jnp.take_along_axis(span_t, idx, axis=1), 1.0)[..., None]
  x1 = batch["x1"]
  x0 = jax.random.normal(noise_key, x1.shape, x1.dtype)
  image = schema.image_tokens(batch["span_ids"], batch["time_slot"])[..., None]
  x_t = jnp.where(image, flow.add_noise(x1, x0, 1 - t_tok, alpha=t_tok), 0.0)
  # TUNA's velocity dx/dt = x1 - x0 runs against sigma
  return {**batch, "span_t": span_t, "x_t": x_t, "t": t_tok[..., 0], "velocity": -flow.velocity_target(x1, x0)}


def normalizers(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Loss denominators over the whole (global) batch: flow-masked elements and text targets."""
  _, valid = next_token_targets(batch)
  flow = jnp.sum(batch["flow_mask"]).astype(jnp.float32) * batch["x1"].shape[-1]
  return {"flow": jnp.maximum(flow, 1.0), "text": jnp.maximum(valid.sum(), 1).astype(jnp.float32)}


def tuna_loss(out: TunaOutput, batch: Mapping[str, jax.Array], norms: Mapping[str, jax.Array], cfg: FlowConfig,
              prediction: str = "velocity") -> tuple[jax.Array, dict[str, jax.Array]]:
  """Sums divided by `norms` (so microbatches add up to the full batch) -> (loss, metrics).

  With norms = normalizers(batch) the flow term is the reference's global mean over masked
  (token, value) elements and the CE its token mean.
  """
  target = batch["velocity"] if prediction == "velocity" else batch["x1"]
  mask = batch["flow_mask"][..., None]
  sq = jnp.where(mask, jnp.square(out.prediction.astype(jnp.float32) - target.astype(jnp.float32)), 0.0)
  if prediction == "x0" and cfg.x0_weighting == "velocity":
    sq = sq / jnp.square(jnp.maximum(1.0 - batch["t"], cfg.t_eps))[..., None]
  flow_loss = jnp.sum(sq) / norms["flow"]
  targets, valid = next_token_targets(batch)
  ce = optax.softmax_cross_entropy_with_integer_labels(out.logits[:, :-1], targets)
  ntp = jnp.sum(jnp.where(valid, ce, 0.0)) / norms["text"]
  loss = cfg.flow_weight * flow_loss + cfg.ntp_weight * ntp
  return loss, {"loss_flow": flow_loss, "loss_ntp": ntp}
