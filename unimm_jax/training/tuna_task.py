"""Task "tuna": TUNA's flow-matching + next-token objective for the trainer.

Batches are packed TUNA rows with clean patches (data.tuna_sequences.to_batch): noise and times are
drawn inside the step from the step's rng, so a resumed run redraws exactly the same noise.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from unimm_jax.models import tuna
from unimm_jax.training import tuna_objective as obj
from unimm_jax.training.lm import train_flops_per_token
from unimm_jax.training.task import Batch, Params, Task


def config_from(config: ml_collections.ConfigDict) -> tuna.TunaConfig:
  return tuna.TunaConfig.from_dict(config.model.to_dict())


def example_batch(cfg: tuna.TunaConfig, row_length: int, max_spans: int, batch: int = 1) -> dict[str, np.ndarray]:
  """A zero batch of the model's input shapes (for init and abstract shapes)."""
  o = cfg.token_features
  return {
      "tokens": np.zeros((batch, row_length), np.int32), "labels": np.full((batch, row_length), -100, np.int32),
      "segment_ids": np.ones((batch, row_length), np.int32), "positions": np.zeros((batch, row_length), np.int32),
      "span_ids": np.zeros((batch, row_length), np.int32), "time_slot": np.zeros((batch, row_length), bool),
      "flow_mask": np.zeros((batch, row_length), bool), "thw": np.zeros((batch, row_length, 3), np.int32),
      "span_hw": np.zeros((batch, max_spans, 2), np.int32), "span_clean": np.zeros((batch, max_spans), bool),
      "x1": np.zeros((batch, row_length, o), np.float32),
  }


def train_flops_per_example(cfg: tuna.TunaConfig, row_length: int) -> float:
  """Analytic training FLOPs of one packed row: 6 * matmul weights * tokens + attention, for the LLM,
  the flow head (its AdaLN runs per image, negligible) and the representation encoder over every
  position of the row (the packed encoder computes all of them)."""
  h = cfg.head
  head_attn = h.embed * h.head_dim * (2 * h.heads + 2 * h.kv_heads)
  head = 6.0 * h.depth * (head_attn + 3 * h.embed * h.mlp) + 12.0 * h.depth * h.heads * h.head_dim * row_length
  llm = train_flops_per_token(cfg.llm, row_length)
  if cfg.encoder == "siglip":
    s = cfg.siglip
    enc = 6.0 * s.num_layers * (4 * s.embed * s.embed + 2 * s.embed * s.mlp) + 12.0 * s.num_layers * s.embed * row_length
    enc += 6.0 * (cfg.token_features * s.embed + s.embed * cfg.llm.embed + cfg.llm.embed ** 2)
  else:
    enc = 6.0 * cfg.token_features * cfg.llm.embed
  return (llm + head + enc + 6.0 * h.embed * cfg.token_features) * row_length


def build(config: ml_collections.ConfigDict) -> Task:
  cfg = config_from(config)
  module = tuna.Tuna(cfg)
  flow = obj.FlowConfig(**config.flow.to_dict())
  row, spans = int(config.data.seq_len), int(config.data.max_spans)

  def init_fn(rng: jax.Array) -> Params:
    b = {k: jnp.asarray(v) for k, v in example_batch(cfg, row, spans).items()}
    return module.init(rng, {**b, "x_t": b["x1"], "span_t": jnp.ones((1, spans))})["params"]

  def loss_fn(params: Params, batch: Batch, rng: jax.Array, norms: Mapping[str, jax.Array]):
    noised = obj.noise_batch(batch, rng, flow)
    out = module.apply({"params": params}, noised)
    return obj.tuna_loss(out, noised, norms, flow, cfg.prediction)

  return Task(name="tuna", module=module, init_fn=init_fn, loss_fn=loss_fn, normalizers=obj.normalizers,
              flops_per_example=train_flops_per_example(cfg, row), tokens_per_example=row,
              images_per_example=int(config.data.get("images_per_row", spans)))
