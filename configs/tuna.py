"""TUNA training configs (task "tuna").

Sizes: `2b` / `7b` from tuna-2 configs/model/tuna_{2b,7b}.yaml (Qwen2.5-1.5B / 7B-Instruct LLMs from
their HF config.json; SigLIP so400m on 48-channel Wan 2.2 latents, 32x32 position table, 26 of 27
layers; flow head 40 layers 24/8 heads (2b), 16 layers 56/14 heads (7b), head_dim 64). `tuna2_7b`
is the pixel variant (TUNA-2: patch-16 embedding, x0 prediction). `tiny` is a CPU-sized TUNA-2.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from configs import common
from unimm_jax.models import qwen, siglip, tuna
from unimm_jax.models.tuna_head import TunaHeadConfig
from unimm_jax.training import tuna_objective as obj

QWEN2_5_1_5B = dict(vocab=151936, embed=1536, mlp=8960, depth=28, heads=12, kv_heads=2, head_dim=128,
                    tie_embeddings=True, rope_theta=1e6)
QWEN2_5_7B = dict(vocab=152064, embed=3584, mlp=18944, depth=28, heads=28, kv_heads=4, head_dim=128,
                  tie_embeddings=False, rope_theta=1e6)
SIGLIP_ON_LATENTS = dict(embed=1152, mlp=4304, depth=27, heads=16, patch=1, channels=48, posemb_grid=32,
                         posemb_resize="bicubic", post_layernorm=False, use_head=False, feature_layer=-2)

VARIANTS = {
    "tiny": dict(llm=dict(vocab=256, embed=64, mlp=128, depth=2, heads=4, kv_heads=2, head_dim=16),
                 head=dict(depth=2, heads=4, kv_heads=2), encoder="patch", space="pixel", channels=3, patch=4,
                 prediction="x0", seq_len=256, max_spans=4, batch_size=8),
    "2b": dict(llm=QWEN2_5_1_5B, head=dict(depth=40, heads=24, kv_heads=8), encoder="siglip", siglip=SIGLIP_ON_LATENTS,
               space="latent", channels=48, patch=1, prediction="velocity", seq_len=1152, max_spans=2,
               batch_size=256),
    "7b": dict(llm=QWEN2_5_7B, head=dict(depth=16, heads=56, kv_heads=14), encoder="siglip",
               siglip=SIGLIP_ON_LATENTS, space="latent", channels=48, patch=1, prediction="velocity",
               seq_len=1152, max_spans=2, batch_size=256),
    "tuna2_7b": dict(llm=QWEN2_5_7B, head=dict(depth=16, heads=56, kv_heads=14), encoder="patch", space="pixel",
                     channels=3, patch=16, prediction="x0", seq_len=1152, max_spans=2, batch_size=256),
}


def model_config(arg: str) -> tuna.TunaConfig:
  v = common.pick(VARIANTS, arg, "configs/tuna.py")
  llm = qwen.QwenConfig(**v["llm"])
  head_dim = 64 if arg != "tiny" else 16
  head = TunaHeadConfig(embed=llm.embed, mlp=llm.mlp, head_dim=head_dim,
                        out_features=v["patch"] ** 2 * v["channels"], **v["head"])
  sc = siglip.SiglipVisionConfig(**v["siglip"]) if "siglip" in v else None
  if arg != "tiny":  # real sizes: bf16 compute, rematerialised layers
    llm = dataclasses.replace(llm, dtype="bfloat16", remat="dots", scan_layers=False)
    head = dataclasses.replace(head, dtype="bfloat16")
    sc = sc and dataclasses.replace(sc, dtype="bfloat16", remat="dots")
  return tuna.TunaConfig(llm=llm, head=head, encoder=v["encoder"], siglip=sc, space=v["space"],
                         channels=v["channels"], patch=v["patch"], prediction=v["prediction"])


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  v = common.pick(VARIANTS, arg, "configs/tuna.py")
  c = common.train_defaults()
  c.task = "tuna"
  c.model = ml_collections.ConfigDict(model_config(arg).to_dict())
  # TUNA: lognorm t shifted for 1024 tokens; TUNA-2 (x0 in pixel space): JiT's t and velocity-weighted loss
  flow = obj.FlowConfig.tuna2() if v["prediction"] == "x0" else obj.FlowConfig()
  c.flow = ml_collections.ConfigDict(dataclasses.asdict(dataclasses.replace(flow, ntp_weight=0.2)))
  c.data.update(dict(name="shapes_tuna", seq_len=v["seq_len"], max_spans=v["max_spans"],
                     images_per_row=1, seed=0, weights=dict(t2i=0.5, edit=0.2, mmu=0.2, text=0.1)))
  c.batch_size = v["batch_size"]
  # TUNA: AdamW lr 2e-5, wd 0.01, 1k warmup, EMA 0.9999 (REFERENCE.md); the tiny model learns faster
  c.optim.update(lr=2e-5, weight_decay=0.01, warmup_steps=1000, ema_decay=0.9999)
  if arg == "tiny":
    c.optim.update(lr=2e-3, warmup_steps=20, ema_decay=0.0)
    c.steps = 300
    c.checkpoint.every = 100
    c.log_every = 10
  return c
