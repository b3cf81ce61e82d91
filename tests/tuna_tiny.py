"""Tiny TUNA configs and packed batches shared by the TUNA tests."""

from __future__ import annotations

import numpy as np

from unimm_jax.data import packing
from unimm_jax.data import tuna_sequences as ts
from unimm_jax.models import qwen, siglip, tuna
from unimm_jax.models.tuna_head import TunaHeadConfig

TOK = ts.TunaTokens(bos=1, eos=2, boi=3, eoi=4, image_pad=5)


def config(encoder: str = "patch", head_kw: dict | None = None, **kw) -> tuna.TunaConfig:
  """head_kw: TunaHeadConfig fields over the tiny head's (a head width other than the LLM's 32, share_adaln)."""
  llm = qwen.QwenConfig(vocab=64, embed=32, mlp=64, depth=2, heads=4, kv_heads=2, head_dim=8)
  if encoder == "patch":
    channels, patch, sc = 3, 2, None
  else:
    channels, patch = 8, 1
    sc = siglip.SiglipVisionConfig.tiny(embed=24, heads=2, patch=1, channels=8, posemb_grid=4, depth=3,
                                        post_layernorm=False, use_head=False, feature_layer=-2)
  head = TunaHeadConfig(**{**dict(embed=32, mlp=64, depth=2, heads=4, kv_heads=2, head_dim=16,
                                  out_features=patch * patch * channels), **(head_kw or {})})
  return tuna.TunaConfig(**{**dict(llm=llm, head=head, encoder=encoder, siglip=sc, channels=channels, patch=patch), **kw})


def samples(cfg: tuna.TunaConfig, seed: int = 0) -> list[dict]:
  """A t2i, an understanding and an edit sample of different image sizes, and a text sample."""
  rng = np.random.default_rng(seed)
  o = cfg.token_features
  img = lambda h, w: rng.normal(size=(h, w, o)).astype(np.float32)
  m = cfg.meta_slots
  return [ts.t2i_sample([10, 11, 12], img(2, 3), TOK, meta_slots=m),
          ts.understanding_sample(img(3, 2), [13, 14], [15, 16, 17], TOK, meta_slots=m),
          ts.edit_sample(img(2, 2), [18], img(2, 2), TOK, meta_slots=m),
          ts.text_sample([20, 21, 22, 23], TOK)]


def batch(cfg: tuna.TunaConfig, rows_of_samples: list[list[dict]], seq_len: int = 64, max_spans: int = 4):
  rows = [packing.pack_row(s, seq_len) for s in rows_of_samples]
  return ts.to_batch(rows, max_spans=max_spans, token_features=cfg.token_features)
