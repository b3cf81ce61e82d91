"""Task "openuni": the original's text2image flow-matching loss over the trainer, in its two stages.

Reference: wusize/OpenUni internvl3_sana_hf.py text2image_loss / diff_loss; configs/pretrain, configs/finetune.
Batches (data/openuni_data.py): prompt ids / mask [b t] (right-padded) and images [b S S 3] in [-1, 1]. In the step:
latents = the frozen DC-AE's encode * scaling_factor, eps ~ N(0, 1) and u ~ U[0, 1) from the step's rng (a resumed
run redraws the same), x_t = (1 - sigma) x0 + sigma eps with the FlowMatchEuler (shift 1) index floor(1000 u),
target eps - x0, loss = mean over elements per example, mean over the batch.
Stages: "pretrain" trains the meta queries, connector and projector (InternVL3, SANA and DC-AE frozen: no optimizer
state); "finetune" also trains SANA.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections

from unimm_jax.models import openuni
from unimm_jax.training.lm import train_flops_per_token
from unimm_jax.training.task import Batch, Params, Task

FROZEN = {"pretrain": (r"lmm/.*", r"transformer/.*", r"vae/.*"), "finetune": (r"lmm/.*", r"vae/.*")}


def normalizers(batch: Batch) -> dict[str, jax.Array]:
  return {"examples": jnp.float32(batch["input_ids"].shape[0])}


def draw(rng: jax.Array, cfg: openuni.OpenUniConfig, images_shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """diff_loss's randoms from the step's rng: eps ~ N(0, 1) at the DC-AE latents' shape [b h w c] of images
  [b H W 3], u [b] ~ U[0, 1)."""
  b, height, width, _ = images_shape
  f = cfg.vae.spatial_downscale
  k_noise, k_u = jax.random.split(rng)
  noise = jax.random.normal(k_noise, (b, height // f, width // f, cfg.vae.latent_channels), jnp.float32)
  return noise, jax.random.uniform(k_u, (b,))


def per_example_loss(module: openuni.OpenUni, params: Params, batch: Batch, noise: jax.Array, u: jax.Array
                     ) -> jax.Array:
  """text2image_loss before its batch mean, given diff_loss's randoms: batch ids / mask [b t], images [b S S 3] in
  [-1, 1]; noise [b h w c] and u [b] as `draw` makes them (or as the original drew them) -> loss [b]."""
  p = {"params": params}
  x0 = jax.lax.stop_gradient(module.apply(p, batch["images"], method=openuni.OpenUni.encode))
  timestep, _, noisy, target = openuni.flow_training_inputs(x0, noise, u)
  embeds = module.apply(p, batch["input_ids"], batch["attention_mask"], method=openuni.OpenUni.condition).prompt_embeds
  pred = module.apply(p, noisy, embeds, timestep, method=openuni.OpenUni.velocity)
  return jnp.mean(jnp.square(pred - target), axis=(1, 2, 3))


def build(config: ml_collections.ConfigDict) -> Task:
  cfg = openuni.OpenUniConfig.from_dict(config.model.to_dict())
  stage = str(config.stage)
  if stage not in FROZEN:
    raise ValueError(f"config.stage {stage!r} is not one of {sorted(FROZEN)}")
  module = openuni.OpenUni(cfg)
  seq_len, size = int(config.data.seq_len), int(config.data.image_size)

  def init_fn(rng: jax.Array) -> Params:
    return module.init(rng, *openuni.example_inputs(cfg))["params"]

  def loss_fn(params: Params, batch: Batch, rng: jax.Array, norms: Mapping[str, jax.Array]):
    noise, u = draw(rng, cfg, batch["images"].shape)
    loss = jnp.sum(per_example_loss(module, params, batch, noise, u)) / norms["examples"]
    return loss, {"flow_loss": loss}

  def load_params(path: str) -> Params:
    import unimm_jax  # the loader pulls in conversion; only needed when initialising from a converted release
    loaded = unimm_jax.load(path)
    if loaded.family != "openuni" or loaded.config != cfg:
      raise ValueError(f"init_from {path}: checkpoint ({loaded.family}) config {loaded.config} differs from "
                       f"config.model {cfg}")
    return loaded.params

  tokens = seq_len + cfg.num_queries
  latent_px = (size // cfg.vae.spatial_downscale) ** 2
  # SANA per latent token and layer: ~14 d^2 weights in matmuls (linear attention 4, cross q / o 2, GLUMBConv 7.5)
  sana_flops = 6.0 * 14 * cfg.transformer.num_layers * cfg.transformer.inner_dim ** 2 * latent_px
  flops = train_flops_per_token(cfg.lmm.llm, tokens) * tokens + sana_flops
  return Task(name="openuni", module=module, init_fn=init_fn, loss_fn=loss_fn, normalizers=normalizers,
              flops_per_example=flops, tokens_per_example=tokens, images_per_example=1, frozen=FROZEN[stage],
              load_params=load_params)
