"""UniWorld-V1 (task "uniworld"): `configs/uniworld.py:VARIANT[,STAGE]`, VARIANT tiny | release, STAGE stage1 (default)
| stage2; sampling as univa/serve/cli.py (`sampling`).

Sizes come from the model's constructors (`UniWorldConfig.tiny` / `.release`, FLUX's VAE preset); this file holds
the choices around them. Training (training/uniworld_task.py) as train_denoiser.py with
scripts/denoiser/flux_qwen2p5vl_7b_vlm_stage{1,2}_512.yaml: AdamW b (0.9, 0.99), eps 1e-8, no weight decay, EMA 0.999
(both yamls); stage 1 lr 1e-3 constant, stage 2 lr 1e-6 after 5000 warmup steps; 512^2, bf16; trained without T5
(drop_t5_rate 1.0, pooled = CLIP("")), mask_weight_type log, distilled guidance 1.0, gradients clipped at 1.0
(max_grad_norm, the default of univa/training/configuration_denoise.py). `tiny` trains on the shapes world's t2i
and edit streams (32 px) on CPU, with a larger stage-2 learning rate than the release's so that a short run moves.
"""

from __future__ import annotations

import ml_collections

from configs import common
from unimm_jax.models import flux, qwen_vl, uniworld, vae_kl

SAMPLING = dict(steps=28, guidance=3.5, size=(1024, 1024), t5_len=256, seed=42, vlm_pixels=448 * 448,
                edit_anchor_pixels=1024 * 1024)
# black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json: the resolution shift of training and sampling
FLUX_SCHEDULER = dict(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
VARIANTS = {
    "tiny": dict(model="tiny", dtype="float32", image_size=32, seq_len=40, vlm_pixels=56 * 56, batch_size=8,
                 steps=300, log_every=10, checkpoint_every=100,
                 sampling=dict(SAMPLING, steps=4, size=(64, 64), t5_len=8, vlm_pixels=112 * 112,
                               edit_anchor_pixels=64 * 64)),
    # stage 1 / 2 yamls: 512^2 targets, Qwen2.5-VL at min = max = 200704 (448^2) pixels, batch 1 per GPU
    "release": dict(model="release", dtype="bfloat16", image_size=512, seq_len=1024, vlm_pixels=448 * 448,
                    batch_size=64, steps=500_000, log_every=10, checkpoint_every=2000, sampling=SAMPLING),
}
STAGES = {
    "stage1": dict(release_lr=1e-3, tiny_lr=1e-3, warmup_steps=0),
    "stage2": dict(release_lr=1e-6, tiny_lr=1e-4, warmup_steps=5000),
}
# the shapes tokenizer's ids of <|vision_start|>, <|vision_end|>, <|image_pad|> (data/tokenizer.SPECIAL_TOKENS)
SHAPES_VISION_IDS = dict(vision_start_token_id=6, vision_end_token_id=7, image_token_id=8, video_token_id=255)


def model_config(arg: str) -> tuple[uniworld.UniWorldConfig, vae_kl.AutoencoderKLConfig]:
  v = common.pick(VARIANTS, arg, "configs/uniworld.py")
  if v["model"] == "release":
    return uniworld.UniWorldConfig.release(dtype="bfloat16"), vae_kl.preset("flux")
  vlm = qwen_vl.QwenVLConfig.tiny(**SHAPES_VISION_IDS)
  cfg = uniworld.UniWorldConfig.tiny(vlm=vlm, denoiser=flux.FluxConfig.tiny(depth=1, single_depth=1),
                                     image_end_token_id=vlm.vision_end_token_id)
  # FLUX's VAE layout at toy widths: 4 latent channels (= FLUX's 16 packed inputs / 4), factor 4, shifted latents
  vae = vae_kl.preset("flux", block_out_channels=(8, 16, 16), layers_per_block=1, latent_channels=4,
                      norm_num_groups=4, sample_size=32)
  return cfg, vae


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  name, _, stage = arg.partition(",")
  stage = stage or "stage1"
  v = common.pick(VARIANTS, name, "configs/uniworld.py")
  s = common.pick(STAGES, stage, "configs/uniworld.py (stage)")
  cfg, vae = model_config(name)
  c = common.train_defaults()
  c.task = "uniworld"
  c.stage = stage
  c.model = ml_collections.ConfigDict(cfg.to_dict())
  c.vae = ml_collections.ConfigDict(vae.to_dict())
  c.uniworld = ml_collections.ConfigDict(dict(train_guidance=1.0, mask_weight_type="log", drop_t5_rate=1.0,
                                              scheduler=dict(FLUX_SCHEDULER)))
  c.data.update(dict(name="shapes_uniworld", seq_len=v["seq_len"], image_size=v["image_size"],
                     vlm_pixels=v["vlm_pixels"], edit_fraction=0.5, num_records=10_000, seed=0))
  c.sampling = ml_collections.ConfigDict(dict(v["sampling"]))
  c.batch_size = v["batch_size"]
  c.steps = v["steps"]
  c.optim.update(lr=s[f"{v['model']}_lr"], warmup_steps=s["warmup_steps"] if name == "release" else 0,
                 schedule="constant", b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0, clip_norm=1.0, ema_decay=0.999)
  # tiny: one device (its VAE's 8-channel kernels do not divide over an 8-way fsdp mesh); release: fsdp over all
  c.mesh.ici = (1, 1, 1) if name == "tiny" else (1, -1, 1)
  c.checkpoint.every = v["checkpoint_every"]
  c.log_every = v["log_every"]
  return c
