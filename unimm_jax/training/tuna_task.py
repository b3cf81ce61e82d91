"""Task "tuna": TUNA's flow-matching + next-token objective for the trainer.

Batches are packed TUNA rows with clean patches (data.tuna_sequences.to_batch): noise and times are
drawn inside the step from the step's rng, so a resumed run redraws exactly the same noise.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import ml_collections

from unimm_jax import schema
from unimm_jax.models import tuna
from unimm_jax.training import tuna_objective as obj
from unimm_jax.training.lm import train_flops_per_token
from unimm_jax.training.task import Batch, Params, Task


def config_from(config: ml_collections.ConfigDict) -> tuna.TunaConfig:
  return tuna.TunaConfig.from_dict(config.model.to_dict())


def train_flops_per_example(cfg: tuna.TunaConfig, seq_len: int) -> float:
  """Analytic training FLOPs of one packed row: 6 * matmul weights * tokens + attention, for the LLM,
  the flow head (its AdaLN runs per image, negligible) and the representation encoder over every
  position of the row (the packed encoder computes all of them)."""
  h = cfg.head
  head_attn = h.embed * h.head_dim * (2 * h.heads + 2 * h.kv_heads)
  head = 6.0 * h.depth * (head_attn + 3 * h.embed * h.mlp) + 12.0 * h.depth * h.heads * h.head_dim * seq_len
  llm = train_flops_per_token(cfg.llm, seq_len)
  if cfg.encoder == "siglip":
    s = cfg.siglip
    enc = 6.0 * s.num_layers * (4 * s.embed * s.embed + 2 * s.embed * s.mlp) + 12.0 * s.num_layers * s.embed * seq_len
    enc += 6.0 * (cfg.token_features * s.embed + s.embed * cfg.llm.embed + cfg.llm.embed ** 2)
  else:
    enc = 6.0 * cfg.token_features * cfg.llm.embed
  return (llm + head + enc + 6.0 * h.embed * cfg.token_features) * seq_len


def build(config: ml_collections.ConfigDict) -> Task:
  cfg = config_from(config)
  module = tuna.Tuna(cfg)
  flow = obj.FlowConfig(**config.flow.to_dict())
  row, spans = int(config.data.seq_len), int(config.data.max_spans)

  def init_fn(rng: jax.Array) -> Params:
    return module.init(rng, schema.example_inputs(cfg.token_features, row, spans))["params"]

  def loss_fn(params: Params, batch: Batch, rng: jax.Array, norms: Mapping[str, jax.Array]):
    noised = obj.noise_batch(batch, rng, flow)
    out = module.apply({"params": params}, noised)
    return obj.tuna_loss(out, noised, norms, flow, cfg.prediction)

  def load_params(path: str) -> Params:
    import unimm_jax  # the loader pulls in conversion; only needed when initialising from pretrained
    loaded = unimm_jax.load(path)
    if loaded.family != "tuna" or loaded.config != cfg:
      raise ValueError(f"init_from {path}: checkpoint ({loaded.family}) config {loaded.config} differs from "
                       f"config.model {cfg}")
    return loaded.params

  return Task(name="tuna", module=module, init_fn=init_fn, loss_fn=loss_fn, normalizers=obj.normalizers,
              load_params=load_params,
              flops_per_example=train_flops_per_example(cfg, row), tokens_per_example=row,
              images_per_example=int(config.data.get("images_per_row", spans)))
