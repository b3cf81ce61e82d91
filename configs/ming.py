"""Ming-Lite-Uni (task "ming"): `configs/ming.py:VARIANT` with VARIANT tiny | release.

The sizes are data here; the modules build from them (models/ming.MingConfig, models/sana.SanaConfig,
models/dc_ae.AutoencoderDCConfig). `release` is inclusionAI/Ming-Lite-Uni: Qwen2.5-7B M-RoPE decoder, the
Ming-Lite-Omni ViT, SANA-1.6B at 512 px, DC-AE f32c32 (SANA 1.0). Its connector size is not published (the converter
reads connector/config.json); a from-scratch release-size run assumes Qwen2.5-0.5B's shape, and `init_from` a
converted release checks the checkpoint's config against this one (training/ming_task.py).
`tiny` trains on the shapes world's t2i stream (32 px) on CPU.

Training (training/ming_task.py): the MLLM (ViT, LLM, linear_proj) and the VAE frozen; the queries, proj_in,
connector, proj_out, SANA-side MLP and SANA trained with the flow-matching loss of the release's SANALoss scheduler
(FlowMatchEuler, shift 1: sigma from the 1000-step table) on every scale, plus the scale-consistency term
(`ming.consistency_weight`). The optimizer settings are ours: the release publishes no training recipe.
Sampling as the release README: 30 steps, CFG 5, 512^2.
"""

from __future__ import annotations

import ml_collections

from configs import common
from unimm_jax.models import dc_ae, ming, qwen, sana

SAMPLING = dict(steps=30, guidance=5.0, size=(512, 512), seed=42)
VARIANTS = {
    "tiny": dict(image_size=32, seq_len=400, batch_size=4, steps=300, lr=1e-3, log_every=10, checkpoint_every=100,
                 sampling=dict(SAMPLING, steps=4, size=(32, 32))),
    # the release trains at 512 px (its sampling size); the prompt is the chat template around a caption
    "release": dict(image_size=512, seq_len=512, batch_size=256, steps=100_000, lr=1e-4, log_every=10,
                    checkpoint_every=1000, sampling=SAMPLING),
}
# Shared by both: the unconditional branch of CFG is the MLP of a zero condition (the sampler's negative), so
# training drops the condition to zeros this often; the consistency weight of the paper's scale-consistency loss.
OBJECTIVE = dict(cond_dropout=0.1, consistency_weight=1.0, num_train_timesteps=1000)


def model_config(arg: str) -> tuple[ming.MingConfig, sana.SanaConfig, dc_ae.AutoencoderDCConfig]:
  """(MLLM side, SANA, DC-AE) of a variant."""
  common.pick(VARIANTS, arg, "configs/ming.py")
  if arg == "tiny":
    cfg = ming.MingConfig.tiny()
    vae = dc_ae.AutoencoderDCConfig.tiny()
    dit = sana.SanaConfig.tiny(in_channels=vae.latent_channels, out_channels=vae.latent_channels,
                               caption_channels=cfg.caption_channels)
    return cfg, dit, vae
  cfg = ming.MingConfig.release(qwen.QwenConfig.qwen2_5_0_5b())   # connector: assumed (module docstring)
  return cfg, sana.SanaConfig.sana_1600m_512(), dc_ae.AutoencoderDCConfig.sana_1_0()


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  v = common.pick(VARIANTS, arg, "configs/ming.py")
  cfg, dit, vae = model_config(arg)
  c = common.train_defaults()
  c.task = "ming"
  c.model = ml_collections.ConfigDict(cfg.to_dict())
  c.dit = ml_collections.ConfigDict(dit.to_dict())
  c.vae = ml_collections.ConfigDict(vae.to_dict())
  c.ming = ml_collections.ConfigDict(dict(OBJECTIVE))
  c.data.update(dict(name="shapes_ming", seq_len=v["seq_len"], image_size=v["image_size"], num_records=10_000,
                     seed=0))
  c.sampling = ml_collections.ConfigDict(dict(v["sampling"]))
  c.batch_size = v["batch_size"]
  c.steps = v["steps"]
  c.optim.update(lr=v["lr"], warmup_steps=max(1, v["steps"] // 100), schedule="cosine", end_lr_frac=0.0,
                 b1=0.9, b2=0.95, weight_decay=0.01, clip_norm=1.0, ema_decay=0.0)
  # tiny: one device (its DC-AE's small kernels do not divide over an 8-way fsdp mesh); release: fsdp over all
  c.mesh.ici = (1, 1, 1) if arg == "tiny" else (1, -1, 1)
  c.checkpoint.every = v["checkpoint_every"]
  c.log_every = v["log_every"]
  return c
