"""Next-token cross-entropy on packed rows for the Qwen decoder.

Batch (see unimm_jax.data.synthetic): input_ids [b t], labels [b t] (IGNORE = ignore), optional
segment_ids [b t] (0 = padding; documents never predict across a boundary), positions [b t], and
loss_mask [b t] (1 = the token at this position is a target). Position t predicts labels[t + 1].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax

from unimm_jax.schema import IGNORE
from unimm_jax.models.qwen import Qwen, QwenConfig
from unimm_jax.training.task import Batch, Params, Task

def next_token_targets(batch: Batch) -> tuple[jax.Array, jax.Array]:
  """-> targets [b t-1] (labels shifted left; 0 where ignored), valid [b t-1] bool."""
  labels = batch["labels"][:, 1:]
  valid = labels != IGNORE
  if "segment_ids" in batch:
    seg = batch["segment_ids"]
    valid &= (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
  if "loss_mask" in batch:
    valid &= batch["loss_mask"][:, 1:].astype(bool)
  return jnp.where(valid, labels, 0), valid


def token_loss(logits: jax.Array, batch: Batch, norms: Mapping[str, jax.Array]
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Logits [b t v] of a decoder over batch["input_ids"] -> (cross-entropy, {"ce", "accuracy"}) summed over the
  next-token targets and divided by norms["tokens"] (their count over the whole batch)."""
  targets, valid = next_token_targets(batch)
  logits = logits[:, :-1].astype(jnp.float32)                           # [b t-1 v]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # [b t-1]
  loss = jnp.sum(jnp.where(valid, ce, 0.0)) / norms["tokens"]
  correct = jnp.sum((jnp.argmax(logits, -1) == targets) & valid) / norms["tokens"]
  return loss, {"ce": loss, "accuracy": correct}


def train_flops_per_token(cfg: QwenConfig, seq_len: int) -> float:
  """Analytic training FLOPs per token: 6 * N_matmul + 12 * L * h * e * T.

  N_matmul counts the weights that enter a matmul (q/k/v/o, gate/up/down, the output projection;
  not the embedding gather or norms). 6 = 2 (multiply-add) * 3 (forward + two backward matmuls).
  The attention term is QK^T and PV over all T keys (2 * 2 * T * h * e forward, times 3), the
  convention of the PaLM paper's MFU; causal masking does not halve what the XLA kernel computes.
  """
  attn = cfg.embed * cfg.head_dim * (2 * cfg.heads + 2 * cfg.kv_heads)
  n_matmul = cfg.depth * (attn + 3 * cfg.embed * cfg.mlp) + cfg.vocab * cfg.embed
  return 6.0 * n_matmul + 12.0 * cfg.depth * cfg.heads * cfg.head_dim * seq_len


def build(config: ml_collections.ConfigDict) -> Task:
  """Task "lm": config.model holds QwenConfig fields, config.data.seq_len the row length."""
  cfg = QwenConfig.from_dict(config.model.to_dict())
  module = Qwen(cfg)
  seq_len = int(config.data.seq_len)

  def init_fn(rng: jax.Array) -> Params:
    ids = jnp.zeros((1, seq_len), jnp.int32)
    return module.init(rng, ids)["params"]

  def normalizers(batch: Batch) -> dict[str, jax.Array]:
    _, valid = next_token_targets(batch)
    return {"tokens": jnp.maximum(valid.sum(), 1).astype(jnp.float32)}

  def loss_fn(params: Params, batch: Batch, rng: jax.Array,
              norms: Mapping[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    del rng  # the decoder has no dropout
    out = module.apply({"params": params}, batch["input_ids"], segment_ids=batch.get("segment_ids"),
                       positions=batch.get("positions"))
    return token_loss(out.logits, batch, norms)

  def load_params(path: str) -> Params:
    import unimm_jax  # the loader pulls in conversion; only needed when initialising from pretrained
    runtime = {k: getattr(cfg, k) for k in ("dtype", "param_dtype", "scan_layers", "remat", "attention_impl")}
    loaded = unimm_jax.load(path, **runtime)
    if dataclasses.replace(loaded.config, **runtime) != cfg:
      raise ValueError(f"init_from {path}: checkpoint config {loaded.config} differs from config.model {cfg}")
    return loaded.params

  return Task(
      name="lm", module=module, init_fn=init_fn, loss_fn=loss_fn, normalizers=normalizers,
      flops_per_example=train_flops_per_token(cfg, seq_len) * seq_len, tokens_per_example=seq_len,
      load_params=load_params)

