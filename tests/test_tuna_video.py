"""TUNA video: clips are spans of T frames x h x w tokens; packed rows equal each clip alone, SigLIP sees each
frame as its own image (the reference's reshape_frame_to_batch_dim), the 3D RoPE's time axis advances per frame,
and the t2v / video-understanding layouts carry the right labels and flow targets."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import tuna_tiny
from unimm_jax import schema
from unimm_jax.data import tuna_sequences as ts
from unimm_jax.models import siglip, tuna, tuna_head
from unimm_jax.training import tuna_objective as obj

TOK = dataclasses.replace(tuna_tiny.TOK, bov=6, eov=7, video_pad=8)
SEQ, SPANS = 96, 4


def _random_params(model, batch, seed=0):
  """Random N(0, 0.2) params of the model's shapes (zero-initialised AdaLN and output layers would hide bugs),
  drawn on the host: an eager init compiles every op of every shape, ~20 s on 2 cores."""
  rng = np.random.default_rng(seed)
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), batch)["params"])
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.2, x.shape).astype(x.dtype)), shapes)


def _samples(cfg, seed=0):
  """A t2v clip (3 frames of 2x2), a video question (2 frames of 2x3, video markers), an image and a text."""
  rng = np.random.default_rng(seed)
  arr = lambda *s: rng.normal(size=(*s, cfg.token_features)).astype(np.float32)
  return [ts.t2v_sample([10, 11], arr(3, 2, 2), TOK),
          ts.video_understanding_sample(arr(2, 2, 3), [13, 14], [15, 16], TOK, video_markers=True),
          ts.t2i_sample([12], arr(2, 2), TOK),
          ts.text_sample([20, 21, 22], TOK)]


def _batch(cfg, rows, key=0):
  b = jax.tree.map(jnp.asarray, tuna_tiny.batch(cfg, rows, SEQ, SPANS))
  return obj.noise_batch(b, jax.random.key(key), obj.FlowConfig())


@functools.cache
def _built(encoder):
  cfg = tuna_tiny.config(encoder)
  model = tuna.Tuna(cfg)
  samples = _samples(cfg)
  packed = _batch(cfg, [samples])
  params = _random_params(model, packed)
  apply = jax.jit(lambda b: model.apply({"params": params}, b))
  encode = jax.jit(lambda b: model.apply({"params": params}, b, method=tuna.Tuna.encode_images))
  return cfg, params, samples, packed, apply, encode


# SigLIP covers the frame handling; the patch stem is per token as for images (slow: a second model's compiles)
@pytest.fixture(params=["siglip", pytest.param("patch", marks=pytest.mark.slow)])
def setup(request):
  return _built(request.param)


def test_video_row_equals_each_clip_alone(setup):
  cfg, _, samples, packed, apply, _ = setup
  out = apply(packed)
  seg = np.asarray(packed["segment_ids"][0])
  for i, sample in enumerate(samples):
    where = np.flatnonzero(seg == i + 1)
    n = len(where)
    spans = np.unique(np.asarray(packed["span_ids"][0])[where])
    spans = spans[spans > 0]
    alone = jax.tree.map(jnp.asarray, tuna_tiny.batch(cfg, [[sample]], SEQ, SPANS))
    alone["x_t"] = jnp.zeros_like(alone["x1"]).at[0, :n].set(packed["x_t"][0, where])
    alone["span_t"] = jnp.ones((1, SPANS)).at[0, :len(spans)].set(packed["span_t"][0, spans - 1])
    ref = apply(alone)
    np.testing.assert_allclose(out.logits[0, where], ref.logits[0, :n], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out.prediction[0, where], ref.prediction[0, :n], atol=1e-5, rtol=0)


def test_frames_of_a_clip_attend_each_other_and_siglip_sees_each_frame_alone(setup):
  """Changing the clip's last frame changes the LLM's and the head's outputs at its first frame (one bidirectional
  span), not the text before the clip; SigLIP's embedding of the first frame stays as it was (frames are separate
  images there), while the patch stem is per token anyway."""
  _, _, _, packed, apply, encode = setup
  span = np.asarray(packed["span_ids"][0]) == 1
  frame = np.asarray(packed["thw"][0, :, 0])
  image = span & ~np.asarray(packed["time_slot"][0])
  first, last = np.flatnonzero(image & (frame == 0)), np.flatnonzero(image & (frame == 2))
  before = np.arange(np.flatnonzero(span)[0])
  moved = {**packed, "x_t": packed["x_t"].at[0, last].add(1.0)}
  a, b = apply(packed), apply(moved)
  assert float(jnp.abs(a.logits[0, first] - b.logits[0, first]).max()) > 1e-4
  assert float(jnp.abs(a.prediction[0, first] - b.prediction[0, first]).max()) > 1e-4
  np.testing.assert_array_equal(a.logits[0, before], b.logits[0, before])
  enc_a, enc_b = encode(packed), encode(moved)
  np.testing.assert_allclose(enc_a[0, first], enc_b[0, first], atol=1e-6, rtol=0)


def test_siglip_on_a_clip_equals_siglip_on_each_frame_separately():
  cfg, params, _, packed, _, encode = _built("siglip")
  enc = encode(packed)
  vit = siglip.VisionTransformer(cfg.siglip)
  proj = tuna.SiglipProjector(cfg.siglip.embed, cfg.llm.embed)

  @jax.jit
  def alone(patches, shape):
    feats = vit.apply({"params": params["vision_model"]}, patches=patches, spatial_shapes=shape)
    return proj.apply({"params": params["siglip_proj"]}, feats.last_hidden_state)

  span_ids, thw = np.asarray(packed["span_ids"][0]), np.asarray(packed["thw"][0])
  image = (span_ids > 0) & ~np.asarray(packed["time_slot"][0])
  checked = 0
  for s in range(1, 4):
    h, w = (int(v) for v in packed["spatial_shapes"][0, s - 1])
    for f in range(thw[span_ids == s, 0].max() + 1):
      slots = np.flatnonzero(image & (span_ids == s) & (thw[:, 0] == f))
      assert len(slots) == h * w
      want = alone(packed["x_t"][:, slots], jnp.asarray([[[h, w]]]))
      np.testing.assert_allclose(enc[0, slots], want[0], atol=1e-5, rtol=0)
      checked += 1
  assert checked == 3 + 2 + 1  # the t2v clip's frames, the question's frames, the image


def _ref_rope3d(t, h, w, dim):
  """tuna-2 _common.build_rope(latent_shape=[t, h, w]): [(t h w), dim/2, 2, 2] rotations over (t, y, x)."""
  def rope(pos, d):
    omega = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    a = pos[:, None] * omega
    return torch.stack([torch.cos(a), -torch.sin(a), torch.sin(a), torch.cos(a)], -1).reshape(len(pos), -1, 2, 2)
  f, y, x = (g.reshape(-1).float() for g in torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w),
                                                           indexing="ij"))
  return torch.cat([rope(f, dim // 4), rope(y, dim // 8 * 3), rope(x, dim // 8 * 3)], dim=-3)


def test_clip_rope_time_axis_advances_per_frame_as_the_reference():
  cfg = tuna_tiny.config()
  sample = ts.t2v_sample([10], np.zeros((3, 2, 3, cfg.token_features), np.float32), TOK)
  b = tuna_tiny.batch(cfg, [[sample]], 32, 1)
  e = cfg.head.head_dim
  q = np.random.default_rng(0).normal(size=(1, 32, 2, e)).astype(np.float32)
  fn = tuna_head.tuna_rope_fn(cfg.head, *(jnp.asarray(b[k]) for k in ("positions", "span_ids", "time_slot", "thw")))
  ours = np.asarray(fn(jnp.asarray(q)))[0]
  slots = np.flatnonzero(schema.image_tokens(b["span_ids"], b["time_slot"])[0])
  assert len(slots) == 3 * 2 * 3
  R = _ref_rope3d(3, 2, 3, e)
  ref = torch.matmul(torch.from_numpy(q[0, slots]).reshape(len(slots), 2, e // 2, 1, 2), R[:, None]).reshape(
      len(slots), 2, e)
  np.testing.assert_allclose(ours[slots], ref.numpy(), atol=1e-5, rtol=0)


def test_clip_layouts_labels_thw_and_flow_targets():
  cfg = tuna_tiny.config()
  o = cfg.token_features
  clip = np.arange(2 * 2 * 3 * o, dtype=np.float32).reshape(2, 2, 3, o)
  t2v = ts.t2v_sample([10, 11], clip, TOK)
  n = 2 * 2 * 3
  assert t2v["stream"] == "t2v"
  np.testing.assert_array_equal(t2v["input_ids"], [1, 10, 11, 3] + [5] * (1 + n) + [4, 2])
  assert np.all(t2v["labels"] == schema.IGNORE) and t2v["flow"].sum() == n
  np.testing.assert_array_equal(t2v["img_t"][5:5 + n], np.repeat([0, 1], 6))
  vq = ts.video_understanding_sample(clip, [13], [15, 16], TOK, video_markers=True)
  np.testing.assert_array_equal(vq["input_ids"], [1, 6] + [8] * (1 + n) + [7, 13, 15, 16, 2])
  np.testing.assert_array_equal(vq["labels"], [schema.IGNORE] * (n + 5) + [15, 16, 2])
  assert not vq["flow"].any() and vq["span_clean"][3] and vq["stream"] == "vmmu"
  np.testing.assert_array_equal(ts.video_understanding_prompt(clip, [13], TOK, video_markers=True)["input_ids"],
                                vq["input_ids"][:-3])
  with pytest.raises(ValueError, match=r"lacks the video tokens \['<\|vid_start\|>'"):
    ts.t2v_sample([10], clip, tuna_tiny.TOK, video_markers=True)
  with pytest.raises(ValueError, match=r"clip's patches must be \[T h w o\], got \(2, 3, 12\)"):
    ts.t2v_sample([10], clip[0], TOK)

  b = tuna_tiny.batch(cfg, [[t2v, vq]], 64, 2)
  slots = np.flatnonzero(b["flow_mask"][0])
  np.testing.assert_array_equal(b["x1"][0, slots], clip.reshape(n, o))  # frame-major, then rows, columns
  np.testing.assert_array_equal(b["thw"][0, slots], [(f, y, x) for f in range(2) for y in range(2) for x in range(3)])
  np.testing.assert_array_equal(b["spatial_shapes"][0], [(2, 3), (2, 3)])
  np.testing.assert_array_equal(b["span_clean"][0], [False, True])
  nb = obj.noise_batch(jax.tree.map(jnp.asarray, b), jax.random.key(0), obj.FlowConfig())
  assert float(obj.normalizers(nb)["flow"]) == n * o  # every frame's tokens, one t for the clip
  t = np.asarray(nb["t"][0, slots])
  assert np.all(t == t[0]) and 0 < t[0] < 1


def test_text_to_video_from_given_noise_is_the_hand_built_euler_over_the_clip():
  from unimm_jax.data import packing
  from unimm_jax.sampling.tuna import FlowSamplerConfig, TunaSampler, time_grid
  cfg, params, *_ = _built("siglip")
  model, o, grid, steps = tuna.Tuna(cfg), cfg.token_features, (2, 2, 3), 3
  noise = np.random.default_rng(3).normal(size=(1, *grid, o)).astype(np.float32)
  got = TunaSampler(model, params, TOK).text_to_video([[10, 11]], grid, FlowSamplerConfig(steps=steps, guidance=1.0),
                                                      noise=noise, video_markers=True)
  assert got.shape == (1, *grid, o)
  sample = ts.t2v_sample([10, 11], np.zeros((*grid, o), np.float32), TOK, video_markers=True)
  b = {k: jnp.asarray(v) for k, v in ts.to_batch([packing.pack_row([sample], 32)], 1, o).items()}
  slots = np.flatnonzero((sample["span_local"] == 1) & ~sample["time_slot"])
  x, t = jnp.asarray(noise.reshape(len(slots), o)), time_grid(steps, 3.0)
  for i in range(steps - 1):
    v = model.apply({"params": params}, {**b, "x_t": b["x1"].at[0, slots].set(x), "span_t": jnp.full((1, 1), t[i])})
    x = x + (t[i + 1] - t[i]) * v.prediction[0, slots]
  np.testing.assert_allclose(got[0], np.asarray(x).reshape(grid + (o,)), atol=1e-5, rtol=0)
