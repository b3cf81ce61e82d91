"""Qwen LLM next-token training (task "lm") on synthetic packed rows.

Sizes: the released Qwen2.5-0.5B / 1.5B (`QwenConfig` constructors); `100m` is a Qwen2-shaped ~100M model used by
scripts/bench_train.py; `tiny` runs on CPU in seconds.
"""

from __future__ import annotations

import ml_collections

from configs import common
from unimm_jax.models.qwen import QwenConfig

FP32 = dict(dtype="float32", scan_layers=False, remat="none")
BF16 = dict(dtype="bfloat16", scan_layers=True, remat="dots")   # real sizes: bf16 compute on fp32 params
VARIANTS = {
    "tiny": dict(model=QwenConfig.tiny(), runtime=FP32, seq_len=32, batch_size=8, steps=20, warmup_steps=2,
                 lr=3e-3, num_records=4096, checkpoint_every=10, log_every=1),
    "100m": dict(model=QwenConfig(vocab=32000, embed=768, mlp=2048, depth=12, heads=12, kv_heads=2, head_dim=64,
                                  tie_embeddings=True), runtime=BF16,
                 seq_len=1152, batch_size=64, steps=10000, warmup_steps=500),
    "qwen2_5_0_5b": dict(model=QwenConfig.qwen2_5_0_5b(), runtime=BF16, seq_len=2048, batch_size=256, steps=20000,
                         warmup_steps=1000),
    "qwen2_5_1_5b": dict(model=QwenConfig.qwen2_5_1_5b(), runtime=BF16, seq_len=2048, batch_size=256, steps=20000,
                         warmup_steps=1000),
}
MODEL_KEYS = ("vocab", "embed", "mlp", "depth", "heads", "kv_heads", "head_dim", "tie_embeddings")


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  v = common.pick(VARIANTS, arg, "configs/qwen_lm.py")
  c = common.train_defaults()
  c.task = "lm"
  model = v["model"].to_dict()
  c.model = ml_collections.ConfigDict(dict({k: model[k] for k in MODEL_KEYS}, param_dtype="float32",
                                           attention_impl="auto", **v["runtime"]))
  c.data.seq_len = v["seq_len"]
  c.data.vocab = c.model.get_ref("vocab")
  c.data.num_records = v.get("num_records", c.data.num_records)
  c.batch_size = v["batch_size"]
  c.steps = v["steps"]
  c.optim.warmup_steps = v["warmup_steps"]
  c.optim.lr = v.get("lr", c.optim.lr)
  c.checkpoint.every = v.get("checkpoint_every", c.checkpoint.every)
  c.log_every = v.get("log_every", c.log_every)
  return c
