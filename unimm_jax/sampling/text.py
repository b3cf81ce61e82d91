"""Autoregressive text generation with a KV cache: one jitted prefill + `lax.while_loop` decode.

Prompts of different lengths are left-padded into one batch: padding gets segment id 0 (never
attended to) and real tokens positions 0..n-1, so every row decodes as if it were alone.
Shapes: b batch, p padded prompt length, n new tokens, s = p + n cache slots, v vocab.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unimm_jax.models import qwen


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  temperature: float = 0.0   # 0 = greedy
  top_k: int = 0             # 0 = off
  top_p: float = 1.0         # 1 = off

  def __post_init__(self):
    if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
      raise ValueError(f"SamplerConfig: need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got {self}")


def sample_logits(logits: jax.Array, rng: jax.Array, cfg: SamplerConfig) -> jax.Array:
  """[b v] fp32 logits -> [b] token ids."""
  if cfg.temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / cfg.temperature
  if cfg.top_k:
    kth = jax.lax.top_k(logits, cfg.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if cfg.top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # keep a token if the mass before it is below top_p (so the first token is always kept)
    keep_sorted = (cum - jax.nn.softmax(sorted_logits, axis=-1)) < cfg.top_p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass
class Generation:
  tokens: np.ndarray     # [b n] new tokens; after a stop token the row holds pad_id
  lengths: np.ndarray    # [b] new tokens up to and including the stop token

  def as_lists(self) -> list[list[int]]:
    return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, multiple: int = 8) -> tuple[np.ndarray, np.ndarray]:
  """Ragged prompts -> (ids [b p], segment ids [b p]) left-padded to a multiple of `multiple`."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("generate: every prompt needs at least one token")
  p = -(-max(len(x) for x in prompts) // multiple) * multiple
  ids = np.full((len(prompts), p), pad_id, np.int32)
  seg = np.zeros((len(prompts), p), np.int32)
  for i, x in enumerate(prompts):
    ids[i, p - len(x):] = x
    seg[i, p - len(x):] = 1
  return ids, seg


@functools.partial(jax.jit, static_argnames=("module", "max_new_tokens", "sampler", "on_step"))
def _generate(module, params, ids, embeds, span_ids, seg, positions, rng, stop_tokens, pad_id, *, max_new_tokens,
              sampler, on_step):
  cfg: qwen.QwenConfig = module.cfg
  b, p = seg.shape
  s = p + max_new_tokens
  if positions is None:
    positions = jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0)
  # decoding continues after the prompt's largest position (M-RoPE: of any of its components)
  next_pos = jnp.max(jnp.where((seg > 0).reshape(b, p, *(1,) * (positions.ndim - 2)), positions, 0),
                     axis=tuple(range(1, positions.ndim))) + 1
  cache = qwen.init_cache(cfg, b, s)
  out = module.apply({"params": params}, ids, inputs_embeds=embeds, positions=positions, segment_ids=seg,
                     span_ids=span_ids, cache=cache, cache_index=0)
  kv_valid = jnp.concatenate([seg, jnp.zeros((b, max_new_tokens), jnp.int32)], axis=1)
  state = dict(step=jnp.int32(0), tokens=jnp.full((b, max_new_tokens), pad_id, jnp.int32), cache=out.cache,
               logits=out.logits[:, -1], rng=rng, done=jnp.zeros((b,), bool), kv_valid=kv_valid,
               next_pos=next_pos, lengths=jnp.zeros((b,), jnp.int32))

  def cond(st):
    return (st["step"] < max_new_tokens) & ~jnp.all(st["done"])

  def body(st):
    rng, key = jax.random.split(st["rng"])
    tok = sample_logits(st["logits"], key, sampler)
    tok = jnp.where(st["done"], pad_id, tok)
    lengths = st["lengths"] + (~st["done"]).astype(jnp.int32)
    done = st["done"] | jnp.isin(tok, stop_tokens)
    tokens = st["tokens"].at[:, st["step"]].set(tok)
    slot = p + st["step"]
    kv_valid = st["kv_valid"].at[:, slot].set(1)
    if on_step is not None:
      jax.debug.callback(on_step, st["step"])
    out = module.apply(
        {"params": params}, tok[:, None], positions=st["next_pos"][:, None], segment_ids=jnp.ones((b, 1), jnp.int32),
        cache=st["cache"], cache_index=slot, kv_segment_ids=kv_valid)
    return dict(step=st["step"] + 1, tokens=tokens, cache=out.cache, logits=out.logits[:, -1], rng=rng, done=done,
                kv_valid=kv_valid, next_pos=st["next_pos"] + 1, lengths=lengths)

  final = jax.lax.while_loop(cond, body, state)
  return final["tokens"], final["lengths"]


def generate(
    module: Any,
    params: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampler: SamplerConfig = SamplerConfig(),
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
    seed: int = 0,
    on_step: Callable[[Any], None] | None = None,
) -> Generation:
  """Generates up to `max_new_tokens` per prompt; a row stops after emitting any of `stop_tokens`.

  `on_step(step)` is called from the device loop once per decoded token (progress bars).
  """
  ids, seg = left_pad(prompts, pad_id)
  return _run(module, params, jnp.asarray(ids), None, None, seg, None, max_new_tokens, sampler, stop_tokens, pad_id,
              seed, on_step)


def generate_from_embeddings(
    module: Any,
    params: Any,
    embeds: jax.Array,
    segment_ids: np.ndarray,
    *,
    span_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
    max_new_tokens: int,
    sampler: SamplerConfig = SamplerConfig(),
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
    seed: int = 0,
    on_step: Callable[[Any], None] | None = None,
) -> Generation:
  """Like `generate`, from left-padded prompt embeddings [b p d] (multimodal prompts: images spliced in)
  with segment_ids [b p] (1 = prompt, 0 = left padding), optional bidirectional span_ids [b p] and positions
  ([b p], or [b p 3] for M-RoPE; default 0.. over each prompt). New tokens take the positions after the prompt's
  largest one (all three M-RoPE components alike)."""
  seg = np.asarray(segment_ids)
  if seg.ndim != 2 or embeds.shape[:2] != seg.shape:
    raise ValueError(f"generate_from_embeddings: embeds {embeds.shape} and segment_ids {seg.shape} must be [b p (d)]")
  if np.any(np.diff((seg > 0).astype(np.int8), axis=1) < 0):
    raise ValueError("generate_from_embeddings: prompts must be left-padded (segment id 0 only before the prompt)")
  if positions is not None and tuple(positions.shape[:2]) != seg.shape:
    raise ValueError(f"generate_from_embeddings: positions {positions.shape} must be [b p] or [b p 3] for "
                     f"segment_ids {seg.shape}")
  return _run(module, params, None, embeds, span_ids, seg, positions, max_new_tokens, sampler, stop_tokens, pad_id,
              seed, on_step)


def _run(module, params, ids, embeds, span_ids, seg, positions, max_new_tokens, sampler, stop_tokens, pad_id, seed,
         on_step):
  if max_new_tokens < 1:
    raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
  stop = jnp.asarray(list(stop_tokens) or [-1], jnp.int32)
  tokens, lengths = _generate(
      module, params, ids, embeds, span_ids, jnp.asarray(seg, jnp.int32),
      None if positions is None else jnp.asarray(positions, jnp.int32), jax.random.key(seed), stop,
      jnp.int32(pad_id), max_new_tokens=max_new_tokens, sampler=sampler, on_step=on_step)
  return Generation(np.asarray(tokens), np.asarray(lengths))
