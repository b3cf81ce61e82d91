"""UniWorld-V1 settings: sampling as univa/serve/cli.py and the two training stages of scripts/denoiser/*.yaml.

Sizes come from the model's constructors (`UniWorldConfig.tiny` / `.release`); this file holds only the
choices around them. Training (stage1 / stage2) is recorded here from train_denoiser.py and the yamls; the
trainer task for it is not written yet (no TASKS entry).
"""

from __future__ import annotations

import ml_collections

from configs import common

SAMPLING = dict(steps=28, guidance=3.5, size=(1024, 1024), t5_len=256, seed=42, vlm_pixels=448 * 448,
                edit_anchor_pixels=1024 * 1024)
VARIANTS = {
    "tiny": dict(model="tiny", dtype="float32", sampling=dict(SAMPLING, steps=4, size=(64, 64), t5_len=8,
                                                             vlm_pixels=112 * 112, edit_anchor_pixels=64 * 64)),
    "release": dict(model="release", dtype="bfloat16", sampling=SAMPLING),
}
# stage1_512.yaml: only_tune_mlp2 (denoise_projector), AdamW; stage 2 adds siglip_projector and the FLUX image
# branch. Both: drop_t5_rate 1.0 (trained without T5, pooled = CLIP("")), mask_weight_type log, guidance 1.0.
STAGES = {
    "stage1": dict(trainable=("denoise_projector",), lr=1e-3, b1=0.9, b2=0.99, weight_decay=0.0, warmup_steps=0),
    "stage2": dict(trainable=("denoise_projector", "siglip_projector", "denoiser_image_branch"), lr=1e-6, b1=0.9,
                   b2=0.99, weight_decay=0.0, warmup_steps=5000, ema=0.999),
}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  v = common.pick(VARIANTS, arg, "configs/uniworld.py")
  return ml_collections.ConfigDict(dict(family="uniworld", model=v["model"], dtype=v["dtype"],
                                        sampling=dict(v["sampling"]), stages={k: dict(s) for k, s in STAGES.items()},
                                        image_size=512, drop_t5_rate=1.0, mask_weight_type="log",
                                        train_guidance=1.0))
