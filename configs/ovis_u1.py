"""Ovis-U1 settings: sampling as the release's test scripts (test_txt_to_img.py, test_img_edit.py,
test_img_to_txt.py of AIDC-AI/Ovis-U1).

Sizes come from the model's constructors (`OvisU1Config.tiny` / `.ovis_u1_3b`); this file holds only the
choices around them: the release samples 1024^2 in bf16 with 50 Euler steps, text CFG 5 (edit: text 6,
image 1.5), seed 42; the tiny variant is the fixture model at fixture sizes.
"""

from __future__ import annotations

import ml_collections

from configs import common

SAMPLING = dict(steps=50, guidance=5.0, edit_guidance=6.0, image_guidance=1.5, size=(1024, 1024), seed=42,
                max_new_tokens=1024)
VARIANTS = {
    "tiny": dict(model="tiny", dtype="float32", sampling=dict(SAMPLING, steps=4, size=(48, 64), max_new_tokens=8)),
    "3b": dict(model="ovis_u1_3b", dtype="bfloat16", sampling=SAMPLING),
}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  v = common.pick(VARIANTS, arg, "configs/ovis_u1.py")
  return ml_collections.ConfigDict(dict(family="ovis_u1", model=v["model"], dtype=v["dtype"],
                                        sampling=dict(v["sampling"])))
