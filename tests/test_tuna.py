"""TUNA: packed rows equal separate samples; the flow head and its RoPE equal the reference's formulas."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import tuna_tiny
from unimm_jax import schema
from unimm_jax.models import tuna, tuna_head
from unimm_jax.training import tuna_objective as obj


def _randomize(params, seed=0):
  """Zero-initialised AdaLN and output layers would hide bugs; give every leaf random values."""
  leaves, tree = jax.tree.flatten(nn.meta.unbox(params))
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [x + 0.2 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def _noised(cfg, rows, key=0, seq_len=64):
  b = jax.tree.map(jnp.asarray, tuna_tiny.batch(cfg, rows, seq_len))
  return obj.noise_batch(b, jax.random.key(key), obj.FlowConfig())


@pytest.mark.parametrize("encoder,kw", [
    ("patch", {}), ("patch", {"patch_positions": 3}), ("siglip", {}),
    # every option of the reference on: height / width slots in each span, a narrower shared-adaLN head
    pytest.param("siglip", {"aspect_ratio_embeds": True, "head_kw": {"embed": 24, "mlp": 48, "share_adaln": True}},
                 marks=pytest.mark.slow)])
def test_packed_row_equals_each_sample_alone(encoder, kw):
  cfg = tuna_tiny.config(encoder, **kw)
  model = tuna.Tuna(cfg)
  samples = tuna_tiny.samples(cfg)
  packed = _noised(cfg, [samples])
  params = _randomize(model.init(jax.random.key(1), packed)["params"])
  out = model.apply({"params": params}, packed)
  seg = np.asarray(packed["segment_ids"][0])
  for i, sample in enumerate(samples):
    alone = tuna_tiny.batch(cfg, [[sample]])
    # the same noise and times as in the packed row, moved to the sample's slots
    n = len(sample["input_ids"])
    where = np.flatnonzero(seg == i + 1)
    spans = np.unique(np.asarray(packed["span_ids"][0])[where])
    spans = spans[spans > 0]
    alone = jax.tree.map(jnp.asarray, alone)
    alone["x_t"] = jnp.zeros_like(alone["x1"]).at[0, :n].set(packed["x_t"][0, where])
    alone["velocity"] = jnp.zeros_like(alone["x1"]).at[0, :n].set(packed["velocity"][0, where])
    alone["span_t"] = jnp.ones((1, 4)).at[0, :len(spans)].set(packed["span_t"][0, spans - 1])
    ref = model.apply({"params": params}, alone)
    np.testing.assert_allclose(out.logits[0, where], ref.logits[0, :n], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out.prediction[0, where], ref.prediction[0, :n], atol=1e-5, rtol=0)
    sub = {k: v[:, where] if v.ndim >= 2 and v.shape[1] == seg.size and k != "span_t" else v
           for k, v in packed.items()}
    want, _ = obj.tuna_loss(out, {**packed, "flow_mask": packed["flow_mask"] & (packed["segment_ids"] == i + 1),
                                  "labels": jnp.where(packed["segment_ids"] == i + 1, packed["labels"], -100)},
                            obj.normalizers({**sub, "flow_mask": alone["flow_mask"], "labels": alone["labels"],
                                             "segment_ids": alone["segment_ids"], "x1": alone["x1"]}), obj.FlowConfig())
    got, _ = obj.tuna_loss(ref, alone, obj.normalizers(alone), obj.FlowConfig())
    np.testing.assert_allclose(want, got, atol=1e-5, rtol=0)


def test_patch_positions_add_the_row_and_column_tables_and_convert_both_ways():
  """TunaConfig.patch_positions: the stem adds row[h] + column[w] to each image token (so one patch gets a
  different embedding in each cell), the key map carries the tables both ways, and grids past them are refused."""
  from unimm_jax.convert import engine
  from unimm_jax.convert.maps import tuna as tuna_map
  from unimm_jax.sampling.tuna import FlowSamplerConfig, TunaSampler
  cfg = tuna_tiny.config("patch", patch_positions=3)
  params = nn.meta.unbox(tuna.Tuna(cfg).init(jax.random.key(0), _noised(cfg, [tuna_tiny.samples(cfg)]))["params"])
  enc = params["vision_encoder"]
  d, o = cfg.llm.embed, cfg.token_features
  thw = jnp.asarray([[(0, h, w) for h in range(3) for w in range(2)]])
  x = jnp.broadcast_to(jax.random.normal(jax.random.key(1), (o,)), (1, 6, o))
  plain = tuna.PatchEncoder(d, cfg.patch, cfg.channels).apply(
      {"params": {k: v for k, v in enc.items() if k not in ("row_embedding", "column_embedding")}}, x, thw)
  placed = tuna.PatchEncoder(d, cfg.patch, cfg.channels, 3).apply({"params": enc}, x, thw)
  want = enc["row_embedding"][thw[0, :, 1]] + enc["column_embedding"][thw[0, :, 2]]
  np.testing.assert_allclose(placed[0] - plain[0], want, atol=1e-6)
  assert float(jnp.abs(placed[0, 0] - placed[0, 1]).max()) > 1e-3  # same patch, next column

  flat = engine.flatten(jax.tree.map(np.asarray, params))
  state = engine.export(flat, tuna_map.rules(cfg))
  assert state["vision_encoder.row_embedding.weight"].shape == (3, d)
  back = engine.convert({k: (lambda v=v: v) for k, v in state.items()}, tuna_map.rules(cfg),
                        {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat.items()})
  for k, v in flat.items():
    np.testing.assert_array_equal(np.asarray(back[k]), v, err_msg=k)

  sampler = TunaSampler(tuna.Tuna(cfg), params, tuna_tiny.TOK)
  with pytest.raises(ValueError, match=r"TunaSampler: an image of 4x2 tokens .*patch_positions = 3"):
    sampler.text_to_image([[10, 11]], (4, 2), FlowSamplerConfig(steps=2))
  with pytest.raises(ValueError, match=r"patch_positions 3 needs encoder 'patch'.* encoder is 'siglip'"):
    tuna_tiny.config("siglip", patch_positions=3)


def test_understanding_only_batch_has_zero_flow_loss_not_nan():
  cfg = tuna_tiny.config()
  b = _noised(cfg, [[tuna_tiny.samples(cfg)[1]]])
  model = tuna.Tuna(cfg)
  out = model.apply({"params": model.init(jax.random.key(0), b)["params"]}, b)
  loss, metrics = obj.tuna_loss(out, b, obj.normalizers(b), obj.FlowConfig())
  assert float(metrics["loss_flow"]) == 0.0 and np.isfinite(float(loss)) and float(metrics["loss_ntp"]) > 0


def test_spans_have_one_plus_hw_slots_and_clean_images_get_t_1():
  cfg = tuna_tiny.config()
  b = _noised(cfg, [tuna_tiny.samples(cfg)])
  span_ids, time_slot = np.asarray(b["span_ids"][0]), np.asarray(b["time_slot"][0])
  sizes = {s: (span_ids == s).sum() for s in range(1, 5)}
  assert sizes == {1: 1 + 6, 2: 1 + 6, 3: 1 + 4, 4: 1 + 4}
  assert time_slot.sum() == 4 and all(span_ids[np.flatnonzero(time_slot)] == [1, 2, 3, 4])
  np.testing.assert_array_equal(np.asarray(b["span_t"][0, [1, 2]]), [1.0, 1.0])  # mmu image, edit source
  assert 0 < float(b["span_t"][0, 0]) < 1 and 0 < float(b["span_t"][0, 3]) < 1
  image = (span_ids > 0) & ~time_slot
  np.testing.assert_allclose(b["x_t"][0][span_ids == 2], b["x1"][0][span_ids == 2])  # clean = x1
  assert np.all(np.asarray(b["x_t"][0][~image]) == 0)
  flow = np.asarray(b["flow_mask"][0])
  assert set(span_ids[flow]) == {1, 4} and not np.any(flow & time_slot)


# ---- the head against formulas written from the reference (tuna-2 modules_new_mm.py) ----------

def _ref_rms(x, w, eps):
  x32 = x.float()
  return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps))


def _ref_llama3_inv_freq(dim, theta=5e5, factor=32.0, low=1.0, high=4.0, old=8192):
  inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
  wavelen = 2 * math.pi / inv
  out = []
  for f, w in zip(inv.tolist(), wavelen.tolist()):
    if w < old / high:
      out.append(f)
    elif w > old / low:
      out.append(f / factor)
    else:
      s = (old / w - low) / (high - low)
      out.append((1 - s) * f / factor + s * f)
  return torch.tensor(out, dtype=torch.float32)


def _ref_rope3d(h, w, dim):
  """build_rope: [(h w), dim/2, 2, 2] rotation matrices [[cos, -sin], [sin, cos]] over (t, y, x)."""
  def rope(pos, d):
    omega = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    a = pos[:, None] * omega
    return torch.stack([torch.cos(a), -torch.sin(a), torch.sin(a), torch.cos(a)], -1).reshape(len(pos), -1, 2, 2)
  y, x = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
  y, x = y.reshape(-1), x.reshape(-1)
  return torch.cat([rope(torch.zeros_like(y), dim // 4), rope(y, dim // 8 * 3), rope(x, dim // 8 * 3)], dim=-3)


def _ref_rope(q, spans, grids, dim):
  """apply_rope_image3d_text1d for one row: q [H, L, e]; spans [(offset, length)] with length = 1 + h*w."""
  L = q.shape[1]
  text = torch.ones(L, dtype=torch.bool)
  for off, n in spans:
    text[off:off + n] = False
  inv = _ref_llama3_inv_freq(dim)
  ang = torch.arange(L, dtype=torch.float32)[:, None] * inv
  cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
  rot_half = torch.cat([-q[..., dim // 2:], q[..., :dim // 2]], -1)
  out = torch.where(text[None, :, None], q * cos + rot_half * sin, q)
  for (off, n), (h, w) in zip(spans, grids):
    R = _ref_rope3d(h, w, dim)
    sl = out[:, off + 1:off + n].reshape(q.shape[0], n - 1, dim // 2, 1, 2)
    out[:, off + 1:off + n] = torch.matmul(sl, R[None]).reshape(q.shape[0], n - 1, dim)
  return out


def test_3d_and_text_rope_equal_the_reference_formulas():
  cfg = tuna_tiny.config().head
  rng = np.random.default_rng(0)
  L, e = 20, cfg.head_dim
  spans, grids = [(3, 7), (12, 5)], [(2, 3), (2, 2)]
  span_ids = np.zeros(L, np.int32); time_slot = np.zeros(L, bool); thw = np.zeros((L, 3), np.int32)
  for k, ((off, n), (h, w)) in enumerate(zip(spans, grids), start=1):
    span_ids[off:off + n] = k; time_slot[off] = True
    thw[off + 1:off + n, 1], thw[off + 1:off + n, 2] = np.divmod(np.arange(h * w), w)
  q = rng.normal(size=(1, L, 3, e)).astype(np.float32)
  fn = tuna_head.tuna_rope_fn(cfg, jnp.arange(L)[None], jnp.asarray(span_ids)[None], jnp.asarray(time_slot)[None],
                              jnp.asarray(thw)[None])
  ours = np.asarray(fn(jnp.asarray(q)))[0].transpose(1, 0, 2)
  ref = _ref_rope(torch.from_numpy(q[0].transpose(1, 0, 2)).clone(), spans, grids, e).numpy()
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_modulated_block_equals_the_reference_formula():
  cfg = tuna_tiny.config().head
  rng = np.random.default_rng(1)
  L, d, e, H, K = 14, cfg.embed, cfg.head_dim, cfg.heads, cfg.kv_heads
  spans, grids = [(2, 7)], [(2, 3)]
  span_ids = np.zeros(L, np.int32); time_slot = np.zeros(L, bool); thw = np.zeros((L, 3), np.int32)
  span_ids[2:9] = 1; time_slot[2] = True
  thw[3:9, 1], thw[3:9, 2] = np.divmod(np.arange(6), 3)
  x = rng.normal(size=(1, L, d)).astype(np.float32)
  cond = rng.normal(size=(1, 1, d)).astype(np.float32)
  block = tuna_head.ModulatedBlock(cfg)
  seg = jnp.ones((1, L), jnp.int32)
  fn = tuna_head.tuna_rope_fn(cfg, jnp.arange(L)[None], jnp.asarray(span_ids)[None], jnp.asarray(time_slot)[None],
                              jnp.asarray(thw)[None])
  args = (jnp.asarray(x), None, jnp.asarray(cond), jnp.asarray(span_ids)[None], fn, seg)
  params = _randomize(block.init(jax.random.key(0), *args)["params"], seed=3)
  ours = np.asarray(block.apply({"params": params}, *args)[0])[0]

  P = jax.tree.map(lambda a: torch.from_numpy(np.array(a)), params)
  xt = torch.from_numpy(x[0])
  mod = torch.nn.functional.silu(torch.from_numpy(cond[0, 0])) @ P["adaLN_modulation"]["linear"]["kernel"] + \
      P["adaLN_modulation"]["linear"]["bias"]
  s1, c1, g1, s2, c2, g2 = mod.chunk(6)
  inside = torch.from_numpy(span_ids > 0)[:, None]
  pick = lambda v, default: torch.where(inside, v[None], torch.full_like(v[None], default))
  modulate = lambda h, s, c: h * (1 + c) + s
  attn = P["self_attn"]
  h = modulate(_ref_rms(xt, P["input_layernorm"]["scale"], 1e-5), pick(s1, 0), pick(c1, 0))
  q = torch.einsum("td,dhe->hte", h, attn["q_proj"]["kernel"])
  k = torch.einsum("td,dhe->hte", h, attn["k_proj"]["kernel"])
  v = torch.einsum("td,dhe->hte", h, attn["v_proj"]["kernel"])
  q, k = _ref_rms(q, attn["q_norm"]["scale"], 1e-6), _ref_rms(k, attn["k_norm"]["scale"], 1e-6)
  q, k = _ref_rope(q.clone(), spans, grids, e), _ref_rope(k.clone(), spans, grids, e)
  k, v = k.repeat_interleave(H // K, 0), v.repeat_interleave(H // K, 0)
  mask = torch.tril(torch.ones(L, L, dtype=torch.bool)) | (inside & inside.T)
  a = torch.nn.functional.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask)[0]
  a = torch.einsum("hte,hed->td", a, attn["o_proj"]["kernel"])
  xt = xt + pick(g1, 1) * a
  h = modulate(_ref_rms(xt, P["post_attention_layernorm"]["scale"], 1e-5), pick(s2, 0), pick(c2, 0))
  m = P["mlp"]
  mlp = (torch.nn.functional.silu(h @ m["gate_proj"]["kernel"]) * (h @ m["up_proj"]["kernel"])) @ m["down_proj"]["kernel"]
  ref = xt + pick(g2, 1) * mlp
  np.testing.assert_allclose(ours, ref.numpy(), atol=1e-4, rtol=0)


def test_timestep_features_are_cos_then_sin_of_unscaled_t():
  from unimm_jax.layers.modulation import timestep_features
  t = jnp.array([0.0, 0.25, 1.0])
  f = np.asarray(timestep_features(t, 256))
  freqs = np.exp(-np.log(1e4) * np.arange(128) / 128)
  np.testing.assert_allclose(f, np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], -1), atol=1e-6)


def test_time_shift_matches_the_reference_transport():
  cfg = obj.FlowConfig()
  u = jax.random.normal(jax.random.key(0), (1000,))
  t = np.asarray(obj.sample_t(jax.random.key(0), (1000,), cfg))
  mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (1024 - 256)
  s = 1 - 1 / (1 + np.exp(-np.asarray(u)))
  np.testing.assert_allclose(t, 1 - np.exp(mu) / (np.exp(mu) + (1 / s - 1)), atol=1e-5)


def test_tuna2_jit_objective_is_the_velocity_error_of_the_x0_prediction():
  """TUNA-2 (tuna/models/jit_utils.py): t = sigmoid(N(-0.8, 0.8)), no shift, x0 error / max(1 - t, 0.05)^2."""
  cfg = obj.FlowConfig.tuna2()
  u = np.asarray(jax.random.normal(jax.random.key(0), (1000,)))
  t = np.asarray(obj.sample_t(jax.random.key(0), (1000,), cfg))
  np.testing.assert_allclose(t, 1 / (1 + np.exp(-(-0.8 + 0.8 * u))), atol=1e-6)
  tiny = tuna_tiny.config(encoder="patch", prediction="x0")
  b = jax.tree.map(jnp.asarray, tuna_tiny.batch(tiny, [tuna_tiny.samples(tiny)]))
  b = obj.noise_batch(b, jax.random.key(1), cfg)
  pred = b["x1"] + 0.3 * jax.random.normal(jax.random.key(2), b["x1"].shape)
  out = tuna.TunaOutput(logits=jnp.zeros((*b["input_ids"].shape, 64)), prediction=pred, hidden_states=None)
  norms = obj.normalizers(b)
  _, m = obj.tuna_loss(out, b, norms, cfg, "x0")
  # where 1 - t is above the clamp, the weighted x0 error is the error of v_hat = (x0_hat - x_t) / (1 - t)
  # against the velocity target x1 - x0
  flow = b["flow_mask"][..., None]
  one_minus_t = (1 - b["t"])[..., None]
  assert bool(jnp.any(flow)) and bool(jnp.all(jnp.where(flow, one_minus_t > cfg.t_eps, True)))
  v_hat = (pred - b["x_t"]) / one_minus_t
  want = jnp.sum(jnp.where(flow, jnp.square(v_hat - b["velocity"]), 0.0)) / norms["flow"]
  np.testing.assert_allclose(float(m["loss_flow"]), float(want), rtol=1e-4)
  plain = obj.tuna_loss(out, b, norms, obj.FlowConfig(), "x0")[1]["loss_flow"]   # TUNA: unweighted x0 error
  want_plain = jnp.sum(jnp.where(flow, jnp.square(pred - b["x1"]), 0.0)) / norms["flow"]
  np.testing.assert_allclose(float(plain), float(want_plain), rtol=1e-5)
  with pytest.raises(ValueError, match="x0_weighting"):
    obj.FlowConfig(x0_weighting="snr")


@pytest.mark.parametrize("variant", ["tiny", "2b"])
def test_every_tuna_param_is_annotated_and_fsdp_leaves_under_2_percent_replicated(variant):
  import sys
  sys.path.insert(0, ".")
  from configs import tuna as tuna_configs
  from unimm_jax import sharding
  cfg = tuna_configs.model_config(variant)
  boxed = jax.eval_shape(tuna.Tuna(cfg).init, jax.random.key(0), schema.example_inputs(cfg.token_features))["params"]
  leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  for path, leaf in leaves:
    assert isinstance(leaf, nn.Partitioned), f"{jax.tree_util.keystr(path)} has no logical names"
    assert len(leaf.names) == leaf.value.ndim
    sharding.check_logical_names(leaf.names, jax.tree_util.keystr(path))
  mesh = jax.make_mesh((1, 8, 1), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  shardings = sharding.logical_shardings(boxed, mesh)
  assert sharding.replicated_fraction(nn.meta.unbox(boxed), shardings) <= 0.02
