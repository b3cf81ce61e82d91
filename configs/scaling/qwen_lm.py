"""Scaling study over configs/qwen_lm.py: a grid of model sizes x data budgets, one base config.

`get_config("size=s,budget=2x")` is one run; `FAMILIES` names the grids `scripts/scaling.py` sweeps.
Batch and sequence length are fixed by the base config, so a budget is a number of optimizer steps
(tokens = steps * batch_size * seq_len). Widths follow Qwen2's shape: head_dim 64, 2 KV heads,
mlp ~ 8/3 embed rounded to a multiple of 256.
"""

from __future__ import annotations

import ml_collections

from configs import common, qwen_lm

SIZES = {
    "tiny_a": dict(embed=32, depth=1, heads=2, kv_heads=1, head_dim=16, mlp=64),
    "tiny_b": dict(embed=64, depth=2, heads=4, kv_heads=2, head_dim=16, mlp=128),
    "s": dict(embed=256, depth=4, heads=4, kv_heads=2, head_dim=64, mlp=768),
    "m": dict(embed=512, depth=8, heads=8, kv_heads=2, head_dim=64, mlp=1536),
    "l": dict(embed=768, depth=12, heads=12, kv_heads=2, head_dim=64, mlp=2048),
}
BUDGETS = {"tiny_1x": 3, "tiny_2x": 6, "1x": 1000, "2x": 2000, "4x": 4000}   # optimizer steps
FAMILIES = {  # family -> (base variant of configs/qwen_lm.py, sizes, budgets)
    "tiny": ("tiny", ("tiny_a", "tiny_b"), ("tiny_1x", "tiny_2x")),
    "small": ("100m", ("s", "m", "l"), ("1x", "2x", "4x")),
}


def runs(family: str) -> list[str]:
  """The get_config args of every run in `family`, smallest model first."""
  _, sizes, budgets = common.pick(FAMILIES, family, "configs/scaling/qwen_lm.py")
  return [f"family={family},size={s},budget={b}" for s in sizes for b in budgets]


def get_config(arg: str = "family=tiny,size=tiny_a,budget=tiny_1x") -> ml_collections.ConfigDict:
  parts = arg.split(",")
  kv = dict(part.split("=", 1) for part in parts if "=" in part)
  if len(kv) != len(parts) or set(kv) - {"family", "size", "budget"} or "family" not in kv:
    raise KeyError(f"configs/scaling/qwen_lm.py: arg {arg!r}: expected family=..,size=..,budget=..")
  base, sizes, budgets = common.pick(FAMILIES, kv["family"], "configs/scaling/qwen_lm.py")
  size = kv.get("size", sizes[0])
  budget = kv.get("budget", budgets[0])
  if size not in sizes or budget not in budgets:
    raise KeyError(f"configs/scaling/qwen_lm.py: family {kv['family']!r} has sizes {sizes}, budgets {budgets}; "
                   f"got size={size!r} budget={budget!r}")
  c = qwen_lm.get_config(base)
  c.model.update(SIZES[size])
  c.steps = BUDGETS[budget]
  c.optim.warmup_steps = min(c.optim.warmup_steps, c.steps // 10)
  c.checkpoint.every = c.steps
  c.log_every = max(1, c.steps // 50)
  return c
