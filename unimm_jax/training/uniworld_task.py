"""Task "uniworld": UniWorld-V1's denoiser training over the trainer, in its two stages.

Reference: PKU-YuanGroup/UniWorld-V1 train_denoiser.py (the step: L930-1282; trainable parts: get_trainable_params
and L572-640), scripts/denoiser/flux_qwen2p5vl_7b_vlm_stage{1,2}_512.yaml. Batches: data/uniworld_data.py.

Stages (config.stage):
  stage1  only_tune_mlp2: the denoise_projector trains; Qwen2.5-VL, FLUX, SigLIP and the VAE are frozen (no
          optimizer state). The stage-1 yaml loads no SigLIP, so the condition is the projected VLM states alone.
  stage2  with_tune_mlp2 + with_tune_siglip_mlp + only_tune_image_branch over all 57 blocks: the denoise_projector,
          the siglip_projector and FLUX's image branch (get_trainable_params: in the double blocks norm1.linear and
          attn.to_q / to_k / to_v / to_out / norm_q / norm_k, ours img_{q,k,v,o}_proj, img_{q,k}_norm; in the single
          blocks norm.linear and attn.to_q / to_k / to_v / norm_q / norm_k); the SigLIP tokens of the reference are
          inserted before its <|vision_end|>. Everything else frozen.
Step (discrete_timestep false): x0 = (VAE posterior sample - shift) * scale of the target; eps ~ N(0, 1);
sigma = sigmoid(N(0, 1)) shifted by FLUX's resolution shift, mu linear in the packed token count (h/2)(w/2) through
the scheduler's (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift) (training/flow.py);
x_t = (1 - sigma) x0 + sigma eps; FLUX at timestep sigma with distilled guidance `uniworld.train_guidance` (1.0),
pooled_projections = CLIP("") (drop_t5_rate 1.0 deletes T5 and CLIP after encoding the empty prompt; here the frozen
param `empty_pooled`, CLIP("") of a converted release in `load_params`, zeros from scratch) and no T5 tokens;
target eps - x0; loss = mean over latent elements of w * (pred - target)^2 per example (w the region weights of
data/uniworld_data.py, broadcast over channels; weighting_scheme gives 1 for logit-normal draws), mean over the batch.
Our reading, where the original does not say: with a batch of unequal prompts the padding is masked out of FLUX's
joint attention, so each row trains as it would alone (the yamls train at batch 1, with no padding); the region
mask is drawn at the VAE's image size (data/uniworld_data.py).
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from unimm_jax.data.qwen_vl import pack_vision
from unimm_jax.models import flux, uniworld, vae_kl
from unimm_jax.models.qwen_vl import VisionInputs
from unimm_jax.training import flow
from unimm_jax.training.task import Batch, Params, Task

# FLUX's image branch in our parameter names (train_denoiser.get_trainable_params with only_img_branch)
IMAGE_BRANCH = (r"(transformer_blocks_\d+/(attn/img_[qkvo]_proj|attn/img_[qk]_norm|norm1/linear)"
                r"|single_transformer_blocks_\d+/(attn/[qkv]_proj|attn/[qk]_norm|norm/linear))/")
FROZEN = {
    "stage1": (r"uniworld/(?!denoise_projector/).*", r"vae/.*", r"empty_pooled"),
    "stage2": (r"uniworld/(?!denoise_projector/|siglip_projector/|denoiser/).*",
               rf"uniworld/denoiser/(?!{IMAGE_BRANCH}).*", r"vae/.*", r"empty_pooled"),
}
USES_SIGLIP = {"stage1": False, "stage2": True}


class UniWorldDenoiser(nn.Module):
  """What the step runs: the UniWorld checkpoint, FLUX's VAE (frozen) and CLIP("") as a frozen vector."""

  cfg: uniworld.UniWorldConfig
  vae_cfg: vae_kl.AutoencoderKLConfig
  vlm_grid: tuple[int, int, int]   # (1, h, w) patches of every reference image (the processor's fixed size)

  def setup(self):
    self.uniworld = uniworld.UniWorld(self.cfg)
    self.vae = vae_kl.AutoencoderKL(self.vae_cfg)
    self.empty_pooled = self.param("empty_pooled", nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
                                   (self.cfg.denoiser.pooled_dim,), jnp.float32)

  def encode(self, images: jax.Array, rng: jax.Array) -> jax.Array:
    """[b S S 3] in [-1, 1] -> FLUX latents [b S/f S/f z]: a posterior sample, (z - shift) * scale."""
    return self.vae.normalize(self.vae.encode(images).sample(rng))

  def vision(self, patches: jax.Array, has_ref: jax.Array) -> VisionInputs:
    """Every row's image patches [b N P] (zeros without a reference) -> the tower's inputs, one row per image;
    the placeholders (row-major) take the merged tokens of the rows that have a reference, in order."""
    b = patches.shape[0]
    vcfg = self.cfg.vlm.vision
    packing = pack_vision([self.vlm_grid] * b, merge=vcfg.merge, window=vcfg.window, seq_len=patches.shape[1])
    rows = jnp.take(patches.reshape(-1, patches.shape[-1]), jnp.asarray(np.maximum(packing.source, 0)), axis=0)
    rows = jnp.where(jnp.asarray(packing.source >= 0)[..., None], rows, 0)
    order = jnp.argsort(~has_ref, stable=True)   # rows with a reference first, in row order
    tokens = jnp.take(jnp.asarray(packing.merged).reshape(b, -1), order, axis=0).reshape(-1)
    return VisionInputs(rows, jnp.asarray(packing.positions), jnp.asarray(packing.frame_ids),
                        jnp.asarray(packing.window_ids), tokens, jnp.zeros((0,), jnp.int32))

  def condition(self, batch: Batch, use_siglip: bool) -> tuple[jax.Array, jax.Array]:
    """-> FLUX's text stream [b T c] and its mask [b T]: the projected VLM states (stage 1), or those with the
    projected SigLIP tokens of the reference inserted before its <|vision_end|> (stage 2)."""
    m = self.uniworld
    mask = batch["attention_mask"]
    hidden = m.hidden(batch["input_ids"], self.vision(batch["vlm_patches"], batch["has_ref"]),
                      positions=batch["positions"], segment_ids=mask)
    text = m.denoise_projector(hidden)
    if not use_siglip:
      return text, mask
    image = m.siglip_features(batch["siglip_pixels"]).astype(text.dtype)
    rows = jnp.concatenate([text, image, jnp.zeros_like(text[:, :1])], axis=1)
    return jnp.take_along_axis(rows, batch["insertion_index"][..., None], axis=1), batch["insertion_mask"]

  def velocity(self, x_t: jax.Array, context: jax.Array, mask: jax.Array, sigma: jax.Array,
               guidance: float) -> jax.Array:
    """FLUX's prediction [b h w z] at x_t [b h w z] and noise level sigma [b]."""
    b, h, w, _ = x_t.shape
    g = jnp.full((b,), guidance, jnp.float32) if self.cfg.denoiser.guidance_embeds else None
    pooled = jnp.broadcast_to(self.empty_pooled, (b, self.empty_pooled.shape[0]))
    out = self.uniworld.denoiser(flux.pack_latents(x_t), context, pooled, sigma, jnp.asarray(flux.image_ids(h, w)),
                                 jnp.asarray(flux.text_ids(context.shape[1])), g, txt_mask=mask)
    return flux.unpack_latents(out, h, w)

  def __call__(self, batch: Batch, x_t: jax.Array, sigma: jax.Array, use_siglip: bool = True,
               guidance: float = 1.0) -> jax.Array:
    context, mask = self.condition(batch, use_siglip)
    return self.velocity(x_t, context, mask, sigma, guidance)


def sigma_shift(latent_hw: tuple[int, int], scheduler: Mapping) -> float:
  """apply_flux_schedule_shift's mu for a latent of latent_hw: (h w) / 4 packed tokens on the scheduler's line."""
  h, w = latent_hw
  return flow.shift_mu(h * w // 4, scheduler.get("base_shift", 0.5), scheduler.get("max_shift", 1.15),
                       scheduler.get("base_image_seq_len", 256), scheduler.get("max_image_seq_len", 4096))


def draw(rng: jax.Array, latent_shape: tuple[int, ...], scheduler: Mapping) -> dict[str, jax.Array]:
  """The step's randoms: eps [b h w z], the shifted logit-normal sigma [b], the VAE posterior's key."""
  b, h, w, _ = latent_shape
  k_noise, k_sigma, k_vae = jax.random.split(rng, 3)
  sigma = flow.time_shift(flow.logit_normal(k_sigma, (b,)), sigma_shift((h, w), scheduler))
  return {"noise": jax.random.normal(k_noise, latent_shape, jnp.float32), "sigma": sigma, "vae": k_vae}


def weighted_mse(pred: jax.Array, target: jax.Array, weights: jax.Array) -> jax.Array:
  """Region-weighted MSE per example: pred / target [b h w z], weights [b h w] -> [b]."""
  err = weights[..., None] * jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
  return jnp.mean(err, axis=(1, 2, 3))


def per_example_loss(module: UniWorldDenoiser, params: Params, batch: Batch, randoms: Mapping[str, jax.Array],
                     use_siglip: bool, guidance: float) -> jax.Array:
  """The step's loss before its batch mean, given `draw`'s randoms -> [b]."""
  p = {"params": params}
  x0 = jax.lax.stop_gradient(module.apply(p, batch["images"], randoms["vae"], method=UniWorldDenoiser.encode))
  sigma = randoms["sigma"]
  x_t = flow.add_noise(x0, randoms["noise"], sigma[:, None, None, None])
  pred = module.apply(p, batch, x_t, sigma, use_siglip, guidance)
  return weighted_mse(pred, flow.velocity_target(x0, randoms["noise"]), batch["weights"])


def normalizers(batch: Batch) -> dict[str, jax.Array]:
  return {"examples": jnp.float32(batch["input_ids"].shape[0])}


def configs_from(config: ml_collections.ConfigDict) -> tuple[uniworld.UniWorldConfig, vae_kl.AutoencoderKLConfig,
                                                             tuple[int, int, int]]:
  from unimm_jax.data.qwen_vl import QwenVLImageProcessor
  cfg = uniworld.UniWorldConfig.from_dict(config.model.to_dict())
  vae = vae_kl.AutoencoderKLConfig.from_dict(config.vae.to_dict())
  if cfg.denoiser.in_channels != 4 * vae.latent_channels:
    raise ValueError(f"config.model.denoiser.in_channels {cfg.denoiser.in_channels} != 4 x config.vae."
                     f"latent_channels {vae.latent_channels} (FLUX packs 2x2 latent patches)")
  size, pixels = int(config.data.image_size), int(config.data.vlm_pixels)
  processor = QwenVLImageProcessor(patch=cfg.vlm.vision.patch, merge=cfg.vlm.vision.merge, min_pixels=pixels,
                                   max_pixels=pixels)
  h, w = processor.size_for(size, size)
  return cfg, vae, (1, h // cfg.vlm.vision.patch, w // cfg.vlm.vision.patch)


def build(config: ml_collections.ConfigDict) -> Task:
  cfg, vae_cfg, grid = configs_from(config)
  stage = str(config.stage)
  if stage not in FROZEN:
    raise ValueError(f"config.stage {stage!r} is not one of {sorted(FROZEN)}")
  if float(config.uniworld.drop_t5_rate) != 1.0:
    raise ValueError(f"config.uniworld.drop_t5_rate {config.uniworld.drop_t5_rate}: only 1.0 is supported (both "
                     "released stages train without T5, pooled = CLIP(''))")
  module = UniWorldDenoiser(cfg, vae_cfg, grid)
  use_siglip, guidance = USES_SIGLIP[stage], float(config.uniworld.train_guidance)
  scheduler = config.uniworld.scheduler.to_dict()
  size, seq_len = int(config.data.image_size), int(config.data.seq_len)
  f = vae_cfg.spatial_downscale

  def init_fn(rng: jax.Array) -> Params:
    k_model, k_vae = jax.random.split(rng)
    params = {"uniworld": uniworld.UniWorld(cfg).init(k_model, *uniworld.example_inputs(cfg))["params"],
              "vae": vae_kl.AutoencoderKL(vae_cfg).init(k_vae, jnp.zeros((1, f, f, vae_cfg.in_channels)))["params"]}
    params["empty_pooled"] = nn.LogicallyPartitioned(jnp.zeros((cfg.denoiser.pooled_dim,), jnp.float32), (None,))
    return params

  def loss_fn(params: Params, batch: Batch, rng: jax.Array, norms: Mapping[str, jax.Array]):
    b, s = batch["images"].shape[:2]
    randoms = draw(rng, (b, s // f, s // f, vae_cfg.latent_channels), scheduler)
    loss = jnp.sum(per_example_loss(module, params, batch, randoms, use_siglip, guidance)) / norms["examples"]
    return loss, {"flow_loss": loss}

  def load_params(path: str) -> Params:
    """A converted UniWorld directory (scripts/convert.py --uniworld ... --flux): the checkpoint, vae/, and
    CLIP("") from clip/ as empty_pooled (what train_denoiser.py feeds as pooled_projections)."""
    import os

    import transformers

    import unimm_jax
    from unimm_jax.convert import uniworld as convert_uniworld
    loaded = unimm_jax.load(path)
    if loaded.family != "uniworld" or loaded.config != cfg:
      raise ValueError(f"init_from {path}: checkpoint ({loaded.family}) config differs from config.model")
    vae = unimm_jax.load(os.path.join(path, convert_uniworld.VAE_DIR))
    if vae.config != vae_cfg:
      raise ValueError(f"init_from {path}: {convert_uniworld.VAE_DIR}/ config {vae.config} differs from config.vae")
    clip_dir = os.path.join(path, convert_uniworld.CLIP_DIR)
    if not os.path.isdir(clip_dir):
      raise ValueError(f"init_from {path}: no {convert_uniworld.CLIP_DIR}/ (convert with --flux): pooled_projections "
                       "are CLIP('') as trained")
    clip = unimm_jax.load(clip_dir)
    tok = transformers.AutoTokenizer.from_pretrained(os.path.join(path, "tokenizer_clip"))
    ids = jnp.asarray(tok([""], padding="max_length", max_length=77, truncation=True)["input_ids"])
    pooled = clip.module.apply({"params": clip.params}, ids).pooler_output[0]
    return {"uniworld": loaded.params, "vae": vae.params, "empty_pooled": jnp.asarray(pooled, jnp.float32)}

  vlm_tokens = seq_len
  img_tokens = (size // f // 2) ** 2
  text_tokens = seq_len + (cfg.siglip_tokens if use_siglip else 0)
  # the frozen VLM runs forward only (2 N per token); FLUX forward + backward (6 N per token: its activations carry
  # the projectors' gradients in both stages)
  vlm = 2.0 * cfg.vlm.text.num_params() * vlm_tokens
  dit = 6.0 * cfg.denoiser.num_params() * (img_tokens + text_tokens)
  return Task(name="uniworld", module=module, init_fn=init_fn, loss_fn=loss_fn, normalizers=normalizers,
              flops_per_example=vlm + dit, tokens_per_example=seq_len, images_per_example=1, frozen=FROZEN[stage],
              load_params=load_params)
