"""Task "ovis_u1": Ovis-U1's training stages over the trainer (paper, seed 001, table 2 / figure 3).

Stages (config.stage), each with its frozen parts out of the optimizer state:
  "refiner_decoder"  stages 0 and 4: the refiner and the Yak decoder learn text-to-image from the frozen LLM's
                     condition; the LLM, the visual tokenizer, vte and the SDXL VAE frozen.
  "decoder"          stage 5's text-to-image part: the decoder alone (the refiner frozen too).
  "edit"             the editing data of stages 4-5 (refiner and decoder, frozen as "refiner_decoder"): the source
                     image's VAE tokens (ids (1, y, x)) join the noise tokens, as the sampler's edit does.
  "understanding"    stage 3: the visual tokenizer, vte and the LLM learn the answers (next-token cross-entropy,
                     training/lm.py); the decoder and the VAE frozen.

The decoder stages' loss, as far as the reference goes: the paper trains the decoder with flow matching over the
frozen SDXL VAE and the release ships no training code, so the rest is our reading, chosen to match what the
release samples (YakModel.get_schedule / denoise, sampling/ovis_u1.py):
  x0 = pack(posterior sample of vae.encode(image) * scaling_factor) (the release has no shift factor), the
  2x2-packed tokens the decoder denoises; u ~ U[0, 1) (config.ovis.sigma = "uniform") or sigmoid(N(0, 1))
  ("logit_normal", SD3); sigma = the sampler's time shift of u (e^mu / (e^mu + 1/u - 1), mu linear in the noise
  tokens through (256, base_shift) and (4096, max_shift)) when the decoder config has timestep_shift, so training
  sees the noise levels the shifted Euler grid visits; x_t = (1 - sigma) x0 + sigma eps, the decoder's time input
  sigma (x 1000 inside, as the sampler feeds it); target eps - x0 (the velocity the sampler integrates from
  t = 1 to 0); per example the mean squared error, then the batch mean.
  The condition is the LLM's cat(hidden_states[-1], hidden_states[-2]) of the generation prompt with the white
  canvas (data/ovis_data.py); with probability config.ovis.cond_dropout a row takes the null prompt "Generate an
  image." instead (the unconditional branch that text CFG contrasts with). An edit row keeps its source image
  (canvas and VAE tokens) when its instruction is dropped: that is the sampler's image-only branch; the fully
  unconditional branch (white image, no VAE tokens) is what the text-to-image stages learn.
Batches: data/ovis_data.py.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections

from unimm_jax.convert.maps.ovis_u1 import FAMILY
from unimm_jax.data.ovis_data import vision_inputs
from unimm_jax.models import ovis_u1
from unimm_jax.models.flux import image_ids, pack_latents
from unimm_jax.sampling.ovis_u1 import SHIFT_TOKENS
from unimm_jax.training import flow
from unimm_jax.training.lm import next_token_targets, token_loss, train_flops_per_token
from unimm_jax.training.task import Batch, Params, Task

_GENERATION_FROZEN = (r"llm/.*", r"visual_tokenizer/.*", r"vte", r"vae/.*")
FROZEN = {"refiner_decoder": _GENERATION_FROZEN, "decoder": _GENERATION_FROZEN + (r"visual_generator/txt_in/.*",),
          "edit": _GENERATION_FROZEN, "understanding": (r"visual_generator/.*", r"vae/.*")}
SIGMAS = ("uniform", "logit_normal")


def draw_sigma(rng: jax.Array, b: int, noise_tokens: int, cfg: ovis_u1.OvisU1Config, kind: str) -> jax.Array:
  """[b] noise levels: u from `kind`, then the sampler's resolution shift when the decoder uses one."""
  u = jax.random.uniform(rng, (b,)) if kind == "uniform" else flow.logit_normal(rng, (b,))
  g = cfg.generator
  if not g.timestep_shift:
    return u
  (x1, x2), (y1, y2) = SHIFT_TOKENS, (g.base_shift, g.max_shift)
  return flow.time_shift(u, flow.shift_mu(noise_tokens, y1, y2, x1, x2))


def t2i_loss(module: ovis_u1.OvisU1, params: Params, batch: Batch, rng: jax.Array, dropout: float, sigma_kind: str
             ) -> jax.Array:
  """The decoder stages' flow-matching loss before the batch mean (module docstring) -> [b]; a batch with
  `source` images is an edit batch."""
  cfg = module.cfg
  p = {"params": params}
  k_post, k_noise, k_sigma, k_drop = jax.random.split(rng, 4)
  k_post, k_src = jax.random.split(k_post)

  def tokens(images, key):   # the frozen VAE's posterior sample, scaled and 2x2-packed (the sampler's tokens)
    post = module.apply(p, images, method=lambda m, x: m.vae.encode(x))
    z = post.mean + post.std * jax.random.normal(key, post.mean.shape, post.mean.dtype)
    z = (z - (cfg.vae.shift_factor or 0.0)) * cfg.vae.scaling_factor
    return jax.lax.stop_gradient(pack_latents(z.astype(jnp.float32))), z.shape[:3]

  x0, (b, h, w) = tokens(batch["images"], k_post)
  cond_tokens, cond_ids = None, None
  if "source" in batch:   # an edit: the source's tokens at ids (1, y, x), the target's size
    cond_tokens, _ = tokens(batch["source"], k_src)
    cond_ids = jnp.asarray(image_ids(h, w, frame=1))
  keep = (jax.random.uniform(k_drop, (b,)) >= dropout)[:, None]
  ids = jnp.where(keep, batch["input_ids"], batch["null_ids"])
  mask = jnp.where(keep, batch["txt_mask"], batch["null_mask"])
  # the LLM and the tokenizer are frozen in every decoder stage: no gradient flows into the condition
  cond = jax.lax.stop_gradient(module.apply(p, ids, vision_inputs(batch, cfg), method=ovis_u1.OvisU1.condition))
  noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
  sigma = draw_sigma(k_sigma, b, x0.shape[1], cfg, sigma_kind)
  x_t = flow.add_noise(x0, noise, sigma[:, None, None])
  v = module.apply(p, x_t, jnp.asarray(image_ids(h, w)), cond, sigma, cond_tokens, cond_ids, mask,
                   method=ovis_u1.OvisU1.velocity)
  return jnp.mean(jnp.square(v.astype(jnp.float32) - flow.velocity_target(x0, noise)), axis=(1, 2))


def build(config: ml_collections.ConfigDict) -> Task:
  cfg = ovis_u1.OvisU1Config.from_dict(config.model.to_dict())
  stage = str(config.stage)
  if stage not in FROZEN:
    raise ValueError(f"config.stage {stage!r} is not one of {sorted(FROZEN)}")
  dropout, sigma_kind = float(config.ovis.cond_dropout), str(config.ovis.sigma)
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"config.ovis.cond_dropout {dropout} must be in [0, 1)")
  if sigma_kind not in SIGMAS:
    raise ValueError(f"config.ovis.sigma {sigma_kind!r} is not one of {SIGMAS}")
  module = ovis_u1.OvisU1(cfg)
  seq_len, size = int(config.data.seq_len), int(config.data.image_size)
  understanding = stage == "understanding"

  def init_fn(rng: jax.Array) -> Params:
    return module.init(rng, *FAMILY.example_inputs(cfg))["params"]

  def normalizers(batch: Batch) -> dict[str, jax.Array]:
    if understanding:
      return {"tokens": jnp.maximum(next_token_targets(batch)[1].sum(), 1).astype(jnp.float32)}
    return {"examples": jnp.float32(batch["input_ids"].shape[0])}

  def loss_fn(params: Params, batch: Batch, rng: jax.Array, norms: Mapping[str, jax.Array]):
    if not understanding:
      loss = jnp.sum(t2i_loss(module, params, batch, rng, dropout, sigma_kind)) / norms["examples"]
      return loss, {"flow_loss": loss}
    out = module.apply({"params": params}, batch["input_ids"], vision_inputs(batch, cfg))
    return token_loss(out.logits, batch, norms)

  def load_params(path: str) -> Params:
    import unimm_jax  # the loader pulls in conversion; only needed when initialising from a converted release
    loaded = unimm_jax.load(path)
    if loaded.family != "ovis_u1" or loaded.config != cfg:
      raise ValueError(f"init_from {path}: checkpoint ({loaded.family}) config differs from config.model; set "
                       f"config.model from the checkpoint's config")
    return loaded.params

  # visual tokens of one image are counted into seq_len; the tower runs over each image's patches
  patches = (size // cfg.vision.patch) ** 2
  vision = 2.0 * cfg.vision.depth * 12 * cfg.vision.embed ** 2 * patches
  if understanding:
    flops = train_flops_per_token(cfg.llm, seq_len) * seq_len + 3 * vision
  else:
    # the frozen LLM and tokenizer run forward only; the decoder forward + backward
    noise_tokens = (size // cfg.vae.spatial_downscale // 2) ** 2 * (2 if stage == "edit" else 1)   # + the source's
    flops = train_flops_per_token(cfg.llm, seq_len) * seq_len / 3 + vision + 3 * cfg.generator.forward_flops(
        noise_tokens, seq_len)
  return Task(name="ovis_u1", module=module, init_fn=init_fn, loss_fn=loss_fn, normalizers=normalizers,
              flops_per_example=flops, tokens_per_example=seq_len, images_per_example=0 if understanding else 1,
              frozen=FROZEN[stage], load_params=load_params)
