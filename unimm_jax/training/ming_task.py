"""Task "ming": Ming-Lite-Uni's text-to-image training over the trainer, the MLLM frozen.

Trained, as the paper names them: the multi-scale queries, proj_in, the connector, proj_out, the SANA-side MLP and
SANA. Frozen (no optimizer state): the MLLM (ViT, LLM, linear_proj) and the DC-AE. The queries enter the frozen LLM,
so gradients flow through its activations (not into its weights).

Flow matching, as the release's SANALoss sets it up (inclusionAI/Ming Ming-unify/Ming_Uni/sana_loss.py): the
training scheduler is FlowMatchEulerDiscreteScheduler read from the release's scheduler/ (SANA's DPM config, so only
num_train_timesteps applies, shift 1) and `get_sigmas` looks the sigma of a drawn timestep up in its 1000-step
table. The release does not ship the loss body; its table lookup is the diffusers flow-matching recipe it is taken
from, whose default weighting "none" draws the index uniformly and weights every element 1:
  index = floor(1000 u), u ~ U[0, 1);  sigma, timestep = table[index];  x_t = (1 - sigma) x0 + sigma eps;
  target eps - x0 (SANA predicts the flow velocity);  per example the mean squared error, then the batch mean.
x0 = DC-AE latents of the image times the scaling factor. The optional REPA mid-layer loss is off in the release
(repa_loss=False) and not built here.

Multi-scale (paper: each of the 4x4 / 8x8 / 16x16 query levels conditions SANA at the image's native resolution,
and a scale-consistency loss keeps every level's result consistent with the final one): one SANA run per scale at
the same x_t and timestep, the flow loss on each (averaged over scales), plus
  consistency = mean over the coarser scales of MSE(v_s, stop_gradient(v_final)),  v_final the 16x16 run (the one
  the release samples), added with weight `config.ming.consistency_weight`.
Condition dropout (`config.ming.cond_dropout`) zeroes a row's conditions before the SANA-side MLP: the MLP of zeros is
exactly the unconditional branch the sampler contrasts with (sampling/ming.py).

Batches (data/ming_data.py): input_ids [b t], positions [b t 3], query_index [b q], images [b S S 3] in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from unimm_jax.convert.maps import ming as ming_map
from unimm_jax.convert.maps import sana as sana_map
from unimm_jax.models import dc_ae, ming, qwen, sana
from unimm_jax.models.config import RUNTIME_FIELDS
from unimm_jax.models.openuni import flow_training_inputs
from unimm_jax.training.task import Batch, Params, Task

FROZEN = (r"ming/(visual|llm|linear_proj_0|linear_proj_2)/.*", r"vae/.*")   # the MLLM and the autoencoder


class MingT2I(nn.Module):
  """What trains: the Ming conditioning side, the SANA DiT it conditions and the (frozen) DC-AE encoder."""

  cfg: ming.MingConfig
  dit_cfg: sana.SanaConfig
  vae_cfg: dc_ae.AutoencoderDCConfig

  def setup(self):
    self.ming = ming.Ming(self.cfg)
    self.dit = sana.SanaTransformer(self.dit_cfg)
    self.vae = dc_ae.AutoencoderDC(self.vae_cfg)

  def encode(self, images: jax.Array) -> jax.Array:
    """[b S S 3] in [-1, 1] -> SANA latents (vae.encode(x).latent * scaling_factor)."""
    return self.vae.normalize(self.vae.encode(images).mode())

  def __call__(self, batch: Batch, x_t: jax.Array, timestep: jax.Array, keep: jax.Array) -> dict[str, jax.Array]:
    """-> {scale name: velocity [b h w c]} at x_t, one SANA run per scale; rows with keep False get the zero
    condition (the unconditional caption)."""
    out = self.ming(batch["input_ids"], batch["positions"], batch["query_index"])
    t = timestep * self.dit_cfg.timestep_scale   # what the pipeline passes the transformer
    v = {}
    for s in self.cfg.scales:
      cond = jnp.where(keep[:, None, None], out[f"{s}x{s}"]["cond"], 0.0)
      v[f"{s}x{s}"] = self.dit(x_t, self.ming.mlp(cond), t)
    return v


def objective(velocity: Mapping[str, jax.Array], target: jax.Array, norms: Mapping[str, jax.Array],
              consistency_weight: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Per-scale velocities (coarse to fine) and the flow target -> (loss, metrics), sums over the examples divided by
  norms["examples"] (so microbatches add up to the batch mean)."""
  names = list(velocity)

  def per_example(a, b):
    return jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)), axis=tuple(range(1, a.ndim)))

  flow = {k: jnp.sum(per_example(velocity[k], target)) / norms["examples"] for k in names}
  final = jax.lax.stop_gradient(velocity[names[-1]])
  coarse = names[:-1]
  consistency = (sum(jnp.sum(per_example(velocity[k], final)) for k in coarse) / (len(coarse) * norms["examples"])
                 if coarse else jnp.zeros((), jnp.float32))
  flow_loss = sum(flow.values()) / len(names)
  loss = flow_loss + consistency_weight * consistency
  return loss, {"flow": flow_loss, "consistency": consistency, **{f"flow_{k}": flow[k] for k in names}}


def normalizers(batch: Batch) -> dict[str, jax.Array]:
  return {"examples": jnp.float32(batch["input_ids"].shape[0])}


def configs_from(config: ml_collections.ConfigDict
                 ) -> tuple[ming.MingConfig, sana.SanaConfig, dc_ae.AutoencoderDCConfig]:
  cfg = ming.MingConfig.from_dict(config.model.to_dict())
  dit = sana.SanaConfig.from_dict(config.dit.to_dict())
  vae = dc_ae.AutoencoderDCConfig.from_dict(config.vae.to_dict())
  if dit.caption_channels != cfg.caption_channels:
    raise ValueError(f"config.dit.caption_channels {dit.caption_channels} != config.model.caption_channels "
                     f"{cfg.caption_channels} (the SANA-side MLP's output width)")
  if dit.in_channels != vae.latent_channels:
    raise ValueError(f"config.dit.in_channels {dit.in_channels} != config.vae.latent_channels {vae.latent_channels}")
  return cfg, dit, vae


def _matmul_params(cfg: qwen.QwenConfig) -> int:
  """A decoder's weights used as matmuls here: no token embeddings (a lookup) and no lm_head (neither runs)."""
  return cfg.num_params() - cfg.vocab * cfg.embed * (1 if cfg.tie_embeddings else 2)


def _dit_flops_per_token(cfg: sana.SanaConfig, caption_tokens: int) -> float:
  """Training FLOPs (6 x matmul weights) of SANA per latent token: self-attention q k v o (4 d^2, linear attention),
  cross-attention q o (2 d^2) and its scores over the caption, GLUMBConv d -> 2 h -> d (3 d h)."""
  d, h = cfg.inner_dim, cfg.mlp_hidden
  return 6.0 * cfg.num_layers * (6 * d * d + 3 * d * h + 2 * d * caption_tokens)


def build(config: ml_collections.ConfigDict) -> Task:
  cfg, dit_cfg, vae_cfg = configs_from(config)
  module = MingT2I(cfg, dit_cfg, vae_cfg)
  weight, dropout = float(config.ming.consistency_weight), float(config.ming.cond_dropout)
  steps = int(config.ming.num_train_timesteps)
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"config.ming.cond_dropout {dropout} must be in [0, 1)")
  seq_len, size = int(config.data.seq_len), int(config.data.image_size)

  def init_fn(rng: jax.Array) -> Params:
    # every part as its own family builds it (the ViT and chat head included: frozen, unused by T2I training)
    k_ming, k_dit, k_vae = jax.random.split(rng, 3)
    f = vae_cfg.spatial_downscale
    return {"ming": ming.Ming(cfg).init(k_ming, *ming_map.example_inputs(cfg))["params"],
            "dit": sana.SanaTransformer(dit_cfg).init(k_dit, *sana_map.example_inputs(dit_cfg))["params"],
            "vae": dc_ae.AutoencoderDC(vae_cfg).init(k_vae, jnp.zeros((1, f, f, vae_cfg.in_channels)))["params"]}

  def loss_fn(params: Params, batch: Batch, rng: jax.Array, norms: Mapping[str, jax.Array]):
    p = {"params": params}
    x0 = jax.lax.stop_gradient(module.apply(p, batch["images"], method=MingT2I.encode))
    k_noise, k_u, k_drop = jax.random.split(rng, 3)
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
    u = jax.random.uniform(k_u, (x0.shape[0],))
    timestep, _, x_t, target = flow_training_inputs(x0, noise, u, steps)
    keep = jax.random.uniform(k_drop, (x0.shape[0],)) >= dropout
    return objective(module.apply(p, batch, x_t, timestep, keep), target, norms, weight)

  def load_params(path: str) -> Params:
    """A converted Ming directory (scripts/convert.py --ming): the MLLM side, transformer/ and vae/."""
    import os

    import unimm_jax  # the loader pulls in conversion; only needed when initialising from a converted release
    from unimm_jax.convert import ming as ming_convert
    parts = {"model": (path, cfg), "dit": (os.path.join(path, ming_convert.DIT_DIR), dit_cfg),
             "vae": (os.path.join(path, ming_convert.VAE_DIR), vae_cfg)}
    out = {}
    for field, (where, want) in parts.items():
      loaded = unimm_jax.load(where, **{k: getattr(want, k) for k in RUNTIME_FIELDS if hasattr(want, k)})
      if loaded.config != want:
        got = loaded.config.to_dict()
        diff = sorted(k for k, v in want.to_dict().items() if got.get(k) != v)
        raise ValueError(f"init_from {where}: the checkpoint's config differs from config.{field} in {diff}; set "
                         f"them as the checkpoint has them")
      out[{"model": "ming"}.get(field, field)] = loaded.params
    return out

  latent_tokens = (size // vae_cfg.spatial_downscale // dit_cfg.patch_size) ** 2
  # the frozen LLM: forward + the activation gradients the queries need (no weight gradients)
  llm = 4.0 * _matmul_params(cfg.text) * seq_len
  connector = 6.0 * _matmul_params(cfg.connector) * cfg.queries
  dit = sum(_dit_flops_per_token(dit_cfg, s * s) for s in cfg.scales) * latent_tokens
  return Task(name="ming", module=module, init_fn=init_fn, loss_fn=loss_fn, normalizers=normalizers,
              flops_per_example=llm + connector + dit, tokens_per_example=seq_len, images_per_example=1,
              frozen=FROZEN, load_params=load_params)
