"""Qwen LLM next-token training (task "lm") on synthetic packed rows.

Sizes: Qwen2.5-0.5B / 1.5B from their HF config.json; `100m` is a Qwen2-shaped ~100M model used by
scripts/bench_train.py; `tiny` runs on CPU in seconds.
"""

from __future__ import annotations

import ml_collections

from configs import common

QWEN_TINY = dict(vocab=256, embed=64, mlp=128, depth=2, heads=4, kv_heads=2, head_dim=16)
VARIANTS = {
    "tiny": dict(model=QWEN_TINY, seq_len=32, batch_size=8, steps=20, warmup_steps=2),
    "100m": dict(model=dict(vocab=32000, embed=768, mlp=2048, depth=12, heads=12, kv_heads=2, head_dim=64,
                            tie_embeddings=True), seq_len=1152, batch_size=64, steps=10000, warmup_steps=500),
    "qwen2_5_0_5b": dict(model=dict(vocab=151936, embed=896, mlp=4864, depth=24, heads=14, kv_heads=2,
                                    head_dim=64, tie_embeddings=True), seq_len=2048, batch_size=256,
                         steps=20000, warmup_steps=1000),
    "qwen2_5_1_5b": dict(model=dict(vocab=151936, embed=1536, mlp=8960, depth=28, heads=12, kv_heads=2,
                                    head_dim=128, tie_embeddings=True), seq_len=2048, batch_size=256,
                         steps=20000, warmup_steps=1000),
}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  v = common.pick(VARIANTS, arg, "configs/qwen_lm.py")
  c = common.train_defaults()
  c.task = "lm"
  c.model = ml_collections.ConfigDict(dict(v["model"], dtype="float32", param_dtype="float32",
                                           scan_layers=False, remat="none", attention_impl="auto"))
  if arg != "tiny":  # real sizes: bf16 compute on fp32 params, scanned and rematerialised layers
    c.model.update(dtype="bfloat16", scan_layers=True, remat="dots")
  c.data.seq_len = v["seq_len"]
  c.data.vocab = c.model.get_ref("vocab")
  c.batch_size = v["batch_size"]
  c.steps = v["steps"]
  c.optim.warmup_steps = v["warmup_steps"]
  if arg == "tiny":
    c.optim.lr = 3e-3
    c.data.num_records = 4096
    c.checkpoint.every = 10
    c.log_every = 1
  return c
