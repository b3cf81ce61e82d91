"""TUNA options of the reference (tuna-2 tuna/models/tuna.py, _inner_base.py, backbones/modules_new_mm.py):
add_aspect_ratio_embeds, share_adaln, a flow head narrower than the LLM (diff_proj, time_embed_proj,
ar_embed_proj), the final-layer and siglip_proj eps, and the understanding labels of tokenize_utils.

The forward pass is checked against a hand computation that follows the reference code line by line (its
_prepare_embeds, _prepare_input, forward, ModulatedAttentionBlock, apply_rope_image3d_text1d as SdpaAttention
calls it, FinalLayer); the LLM in between is our Qwen (its own parity is tests/test_qwen*.py)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tuna_tiny
from test_tuna import _randomize, _ref_llama3_inv_freq, _ref_rms, _ref_rope3d
from unimm_jax import schema
from unimm_jax.convert import engine
from unimm_jax.convert import tuna as tuna_convert
from unimm_jax.convert.maps import tuna as tuna_map
from unimm_jax.data import tuna_sequences as ts
from unimm_jax.models import qwen, tuna
from unimm_jax.training import tuna_objective as obj

HEAD_KW = dict(embed=24, mlp=48, share_adaln=True, final_norm_eps=1e-3)


def _all_options() -> tuna.TunaConfig:
  return tuna_tiny.config("siglip", head_kw=HEAD_KW, aspect_ratio_embeds=True, proj_norm_eps=1e-2)


@pytest.fixture(scope="module")
def model_and_batch():
  cfg = _all_options()
  b = jax.tree.map(jnp.asarray, tuna_tiny.batch(cfg, [tuna_tiny.samples(cfg)], 64))
  b = obj.noise_batch(b, jax.random.key(0), obj.FlowConfig())
  model = tuna.Tuna(cfg)
  params = _randomize(model.init(jax.random.key(1), b)["params"], seed=2)
  return cfg, model, params, b


def _t(a):
  return torch.from_numpy(np.array(a, np.float32))


def _ref_timestep_embedder(p, t, dim=256):
  """modules_new_mm.TimestepEmbedder: [cos, sin] of t * exp(-ln(1e4) j / half), Linear -> SiLU -> Linear."""
  half = dim // 2
  freqs = torch.exp(-np.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
  args = t[:, None].float() * freqs[None]
  emb = torch.cat([torch.cos(args), torch.sin(args)], -1)
  h = emb @ _t(p["mlp_0"]["kernel"]) + _t(p["mlp_0"]["bias"])
  return F.silu(h) @ _t(p["mlp_2"]["kernel"]) + _t(p["mlp_2"]["bias"])


def _ref_rope_as_the_head_calls_it(q, spans, grids, positions, dim):
  """apply_rope_image3d_text1d(..., add_time_embeds=True) with add_ar_embeds left False: meta = 1 whatever the
  span holds; q [H, L, e]; spans [(offset, length)]; rope_3d of an image has h*w rows."""
  H, L, _ = q.shape
  meta = 1
  text = torch.ones(L, dtype=torch.bool)
  for off, n in spans:
    text[off:max(off, min(L, off + max(n, meta)))] = False
  ang = positions[:, None] * _ref_llama3_inv_freq(dim)
  cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
  rot_half = torch.cat([-q[..., dim // 2:], q[..., :dim // 2]], -1)
  out = torch.where(text[None, :, None], q * cos + rot_half * sin, q)
  for (off, n), (h, w) in zip(spans, grids):
    img_start, img_end = off + meta, min(L, off + n)
    rope_3d = _ref_rope3d(h, w, dim)
    use_len = min(img_end - img_start, rope_3d.shape[0])
    sl = out[:, img_start:img_start + use_len].reshape(H, use_len, dim // 2, 1, 2)
    out[:, img_start:img_start + use_len] = torch.matmul(sl, rope_3d[None, :use_len]).reshape(H, use_len, dim)
  return out


def _per_token(values, spans, L, default):
  """The reference's `x_new[i, offset:offset + length] = x[idx]` over zeros (or ones): [n, d] -> [L, d]."""
  out = torch.full((L, values.shape[-1]), float(default))
  for j, (off, n) in enumerate(spans):
    out[off:off + n] = values[j]
  return out


def test_all_options_forward_equals_the_reference_arithmetic(model_and_batch):
  cfg, model, params, b = model_and_batch
  hc = cfg.head
  ours = model.apply({"params": params}, b)
  ours_embeds = model.apply({"params": params}, b, method=tuna.Tuna.embed_inputs)
  _, state = model.apply({"params": params}, b, capture_intermediates=lambda m, _: m.name == "vision_model",
                         mutable=["intermediates"])
  siglip_out = state["intermediates"]["vision_model"]["__call__"][0].last_hidden_state
  P = jax.tree.map(np.asarray, nn.meta.unbox(params))

  span_ids, seg = np.asarray(b["span_ids"][0]), np.asarray(b["segment_ids"][0])
  L, n_spans = span_ids.size, int(span_ids.max())
  spans = [(int(np.flatnonzero(span_ids == s)[0]), int((span_ids == s).sum())) for s in range(1, n_spans + 1)]
  grids = [tuple(int(v) for v in np.asarray(b["spatial_shapes"][0, s])) for s in range(n_spans)]
  assert all(n == 3 + h * w for (_, n), (h, w) in zip(spans, grids))

  # _prepare_embeds: siglip_proj (RMSNorm eps = proj_norm_eps), time / aspect-ratio embeddings and projections
  sp = P["siglip_proj"]
  x = _ref_rms(_t(siglip_out[0]), _t(sp["layers_0"]["scale"]), cfg.proj_norm_eps)
  image_embeds = F.gelu(x @ _t(sp["layers_1"]["kernel"]) + _t(sp["layers_1"]["bias"])) @ _t(sp["layers_3"]["kernel"]) \
      + _t(sp["layers_3"]["bias"])
  time_embeds = _ref_timestep_embedder(P["time_embed"], _t(b["span_t"][0, :n_spans]))
  time_embeds_proj = time_embeds @ _t(P["time_embed_proj"]["kernel"]) + _t(P["time_embed_proj"]["bias"])
  hw = torch.tensor(grids, dtype=torch.float32)
  ar = lambda v: _ref_timestep_embedder(P["aspect_ratio_embed"], v) @ _t(P["ar_embed_proj"]["kernel"]) + \
      _t(P["ar_embed_proj"]["bias"])
  height_embeds_proj, width_embeds_proj = ar(hw[:, 0]), ar(hw[:, 1])
  # _prepare_input: <height> <width> <time> <img> ... inside each span
  input_embeds = _t(P["llm"]["embed_tokens"]["embedding"])[torch.from_numpy(np.array(b["input_ids"][0]))]
  for j, (off, n) in enumerate(spans):
    input_embeds[off], input_embeds[off + 1], input_embeds[off + 2] = (
        height_embeds_proj[j], width_embeds_proj[j], time_embeds_proj[j])
    input_embeds[off + 3:off + n] = image_embeds[off + 3:off + n]  # SigLIP ran over the image tokens in place
  np.testing.assert_allclose(np.asarray(ours_embeds[0]), input_embeds.numpy(), atol=1e-5, rtol=0)

  llm = qwen.Qwen(cfg.llm).apply({"params": params["llm"]}, inputs_embeds=jnp.asarray(input_embeds.numpy())[None],
                                 positions=b["positions"], segment_ids=b["segment_ids"], span_ids=b["span_ids"],
                                 return_logits=False)
  # forward: diff_proj, the shared adaLN projection, the blocks, the final layer (on time_embeds)
  dp = P["diff_proj"]
  h = F.gelu(_t(llm.last_hidden_state[0]) @ _t(dp["layers_0"]["kernel"]) + _t(dp["layers_0"]["bias"])) \
      @ _t(dp["layers_2"]["kernel"]) + _t(dp["layers_2"]["bias"])
  adaln_input = F.silu(time_embeds) @ _t(P["shared_adaln"]["linear"]["kernel"]) + _t(P["shared_adaln"]["linear"]["bias"])
  positions = _t(b["positions"][0])
  same_seg = torch.from_numpy(seg[:, None] == seg[None, :]) & torch.from_numpy(seg > 0)[:, None]
  same_span = torch.from_numpy((span_ids[:, None] == span_ids[None, :]) & (span_ids > 0)[:, None])
  mask = (same_seg & (torch.tril(torch.ones(L, L, dtype=torch.bool)) | same_span)) | torch.eye(L, dtype=torch.bool)
  H, K, e = hc.heads, hc.kv_heads, hc.head_dim
  modulate = lambda v, s, c: v * (1 + c) + s
  for i in range(hc.depth):
    blk = P[f"diffusion_head_a_{i}"]
    chunks = (_t(blk["scale_shift_table"])[None].reshape(1, -1) + adaln_input).chunk(6, dim=1)
    s1, c1, g1, s2, c2, g2 = (_per_token(c, spans, L, d) for c, d in zip(chunks, (0, 0, 1, 0, 0, 1)))
    a = blk["self_attn"]
    z = modulate(_ref_rms(h, _t(blk["input_layernorm"]["scale"]), hc.norm_eps), s1, c1)
    q, k, v = (torch.einsum("td,dhe->hte", z, _t(a[f"{n}_proj"]["kernel"])) for n in "qkv")
    q, k = _ref_rms(q, _t(a["q_norm"]["scale"]), hc.qk_norm_eps), _ref_rms(k, _t(a["k_norm"]["scale"]), hc.qk_norm_eps)
    q = _ref_rope_as_the_head_calls_it(q.clone(), spans, grids, positions, e)
    k = _ref_rope_as_the_head_calls_it(k.clone(), spans, grids, positions, e)
    k, v = k.repeat_interleave(H // K, 0), v.repeat_interleave(H // K, 0)
    o = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask)[0]
    h = h + g1 * torch.einsum("hte,hed->td", o, _t(a["o_proj"]["kernel"]))
    z = modulate(_ref_rms(h, _t(blk["post_attention_layernorm"]["scale"]), hc.norm_eps), s2, c2)
    m = blk["mlp"]
    h = h + g2 * ((F.silu(z @ _t(m["gate_proj"]["kernel"])) * (z @ _t(m["up_proj"]["kernel"])))
                  @ _t(m["down_proj"]["kernel"]))
  fl = P["diffusion_head_b"]
  shift, scale = (F.silu(time_embeds) @ _t(fl["adaLN_modulation"]["linear"]["kernel"])
                  + _t(fl["adaLN_modulation"]["linear"]["bias"])).chunk(2, dim=1)
  z = modulate(_ref_rms(h, _t(fl["norm_final"]["scale"]), hc.final_norm_eps), _per_token(shift, spans, L, 0),
               _per_token(scale, spans, L, 0))
  v_pred = z @ _t(fl["linear"]["kernel"]) + _t(fl["linear"]["bias"])
  valid = seg > 0
  np.testing.assert_allclose(np.asarray(ours.prediction[0])[valid], v_pred.numpy()[valid], atol=1e-4, rtol=0)


def test_option_keys_convert_both_ways_and_are_read_from_the_checkpoint(model_and_batch):
  cfg, _, params, _ = model_and_batch
  flat = engine.flatten(jax.tree.map(np.asarray, nn.meta.unbox(params)))
  state = engine.export(flat, tuna_map.rules(cfg))
  e, d = cfg.head.embed, cfg.llm.embed
  want = {  # the reference's names and torch shapes ([out, in] linears)
      "aspect_ratio_embed.mlp.0.weight": (e, 256), "aspect_ratio_embed.mlp.2.bias": (e,),
      "shared_adaln.1.weight": (6 * e, e), "shared_adaln.1.bias": (6 * e,),
      "diffusion_head_a.1.scale_shift_table": (6, e),
      "diff_proj.0.weight": (e, d), "diff_proj.2.weight": (e, e), "diff_proj.2.bias": (e,),
      "time_embed_proj.weight": (d, e), "time_embed_proj.bias": (d,), "ar_embed_proj.weight": (d, e),
      "diffusion_head_b.adaLN_modulation.1.weight": (2 * e, e)}
  assert {k: state[k].shape for k in want} == want
  assert not any(k.startswith("diffusion_head_a.0.adaLN_modulation") for k in state)
  # the options follow from the checkpoint's keys (the head width from the variant)
  plain = dataclasses.replace(cfg, aspect_ratio_embeds=False, head=dataclasses.replace(cfg.head, share_adaln=False))
  shapes = {k: v.shape for k, v in state.items()} | {"tuna.model.embed_tokens.weight": (64, d)}
  assert tuna_convert.with_checkpoint_vocab(plain, shapes, "ckpt") == cfg
  # (TUNA-2's training-only mask_token is skipped)
  back = engine.convert({k: (lambda v=v: v) for k, v in {**state, "mask_token": np.zeros((1, 1, d))}.items()},
                        tuna_map.rules(cfg), {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat.items()},
                        ignore=tuna_map.ignore(cfg))
  for k, v in flat.items():
    np.testing.assert_array_equal(np.asarray(back[k]), v, err_msg=k)
  # the keys of an option the config lacks are named
  abstract = engine.flatten(jax.eval_shape(tuna.Tuna(plain).init, jax.random.key(0),
                                           schema.example_inputs(plain.token_features))["params"])
  with pytest.raises(Exception, match=r"shared_adaln\.1\.weight.*no such parameter"):
    engine.convert({k: (lambda v=v: v) for k, v in state.items()}, tuna_map.rules(plain),
                   {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in nn.meta.unbox(abstract).items()})


def test_aspect_ratio_spans_open_with_height_width_and_time_slots():
  """The reference's pipelines reserve h*w + 2 + 1 slots per image; the velocity comes from slots 3.."""
  rng = np.random.default_rng(0)
  img = rng.normal(size=(2, 3, 4)).astype(np.float32)
  tok = tuna_tiny.TOK
  for make in (lambda m: ts.t2i_sample([10, 11], img, tok, meta_slots=m),
               lambda m: ts.understanding_sample(img, [12], [13], tok, meta_slots=m),
               lambda m: ts.edit_sample(img, [12], img, tok, meta_slots=m)):
    one, three = make(1), make(3)
    assert len(three["input_ids"]) == len(one["input_ids"]) + 2 * three["span_local"].max()
    for k in (1, int(three["span_local"].max())):
      span = np.flatnonzero(three["span_local"] == k)
      assert len(span) == 3 + 6 and three["time_slot"][span].tolist() == [True] * 3 + [False] * 6
      assert not three["flow"][span[:3]].any()
      assert (three["img_y"][span[3:]].tolist(), three["img_x"][span[3:]].tolist()) == ([0, 0, 0, 1, 1, 1], [0, 1, 2] * 2)
    # each image's patches land on its image tokens
    for (o1, p1), (o3, p3) in zip(one["attachments"], three["attachments"]):
      np.testing.assert_array_equal(p1, p3)
      assert not three["time_slot"][o3] and three["time_slot"][o3 - 1] and three["span_local"][o3 - 3] > 0
  with pytest.raises(ValueError, match="meta_slots must be 1"):
    ts.t2i_sample([10], img, tok, meta_slots=2)


def test_understanding_vision_labels_target_boi_and_eoi_as_the_reference():
  """tokenize_utils.format_sequence_und labels [bos][boi][-100]*N[eoi][-100]*prompt answer [eos]; CE starts at
  position 1 (next_token_prediction: logits[:, :-1] vs labels[:, 1:]), so bos is no target there."""
  tok = tuna_tiny.TOK
  img = np.zeros((2, 2, 4), np.float32)
  ref = ts.understanding_sample(img, [12, 13], [14, 15], tok, vision_labels=True)
  ours = ts.understanding_sample(img, [12, 13], [14, 15], tok)
  ids, labelled = ref["input_ids"], ref["labels"] != schema.IGNORE
  assert ids[labelled].tolist() == [tok.boi, tok.eoi, 14, 15, tok.eos]
  assert np.array_equal(ref["labels"][labelled], ids[labelled])
  assert ids[ours["labels"] != schema.IGNORE].tolist() == [14, 15, tok.eos]
  # earlier answers in the prompt keep their targets either way
  both = ts.understanding_sample(img, [12, 13], [14], tok, np.array([False, True]), vision_labels=True)
  assert both["input_ids"][both["labels"] != schema.IGNORE].tolist() == [tok.boi, tok.eoi, 13, 14, tok.eos]


def test_existing_configs_keep_their_labels_and_layout():
  import sys
  sys.path.insert(0, ".")
  from configs import tuna as tuna_configs
  from configs import tuna_tiny as demo
  for c in [tuna_configs.get_config(arg) for arg in tuna_configs.VARIANTS] + [demo.get_config("tiny")]:
    assert c.data.mmu_vision_labels is False and tuna.TunaConfig.from_dict(c.model.to_dict()).meta_slots == 1


@pytest.mark.slow  # the chat-template test below runs the same sampler path with guidance
def test_sampler_with_aspect_ratio_slots_equals_the_hand_built_euler(model_and_batch):
  """The sampler lays out spans as the model's config says and reads the velocity past the three meta slots."""
  from test_tuna_sampling import _hand_velocity
  from unimm_jax.sampling import flow
  from unimm_jax.sampling import tuna as sampling
  cfg, model, params, _ = model_and_batch
  o = cfg.token_features
  noise = np.random.default_rng(3).normal(size=(1, 2, 3, o)).astype(np.float32)
  sc = sampling.FlowSamplerConfig(steps=3, guidance=1.0)
  got = sampling.TunaSampler(model, params, tuna_tiny.TOK).text_to_image([[10, 11]], (2, 3), sc, noise=noise)
  blank = np.zeros((2, 3, o), np.float32)
  velocity = _hand_velocity(model, params, [ts.t2i_sample([10, 11], blank, tuna_tiny.TOK, meta_slots=3)], 1, [1.0])
  want = flow.euler(velocity, jnp.asarray(noise.reshape(1, 6, o)), sampling.time_grid(3, 3.0))
  np.testing.assert_allclose(got, np.asarray(want).reshape(got.shape), atol=1e-5)


@pytest.mark.slow   # ~35 s; tests/test_tuna_scripts.py runs sample.py --chat-template by default
def test_chat_template_prompt_path_is_the_references_layout(model_and_batch):
  """pipelines/_common.prepare_gen_input_chat: system / user / assistant turns with the image in the assistant's,
  no bos; the null branch wraps the fixed negative prompt the same way."""
  from test_tuna_sampling import _hand_velocity
  from unimm_jax.data.tokenizer import shapes_tokenizer
  from unimm_jax.sampling import flow
  from unimm_jax.sampling import tuna as sampling
  tokenizer = shapes_tokenizer()
  p = sampling.chat_prompt(tokenizer, "a red circle", system="system")
  rendered = "<|im_start|>system\nsystem<|im_end|>\n<|im_start|>user\na red circle<|im_end|>\n<|im_start|>assistant\n"
  assert p.before == tuple(tokenizer(rendered, add_special_tokens=False)["input_ids"])
  assert p.after == tuple(tokenizer("<|im_end|>\n", add_special_tokens=False)["input_ids"])
  cfg, model, params, _ = model_and_batch
  tok, o = tuna_tiny.TOK, cfg.token_features
  blank = np.zeros((2, 2, o), np.float32)
  s = ts.t2i_chat_sample(ts.ChatPrompt((10, 11), (12,)), blank, tok, meta_slots=3)
  assert s["input_ids"].tolist() == [10, 11, tok.boi] + [tok.image_pad] * 7 + [tok.eoi, 12]
  assert (s["labels"] == schema.IGNORE).all() and s["attachments"][0][0] == 6
  chat, null = ts.ChatPrompt((10, 11), (12,)), ts.ChatPrompt((13,), (12,))
  sc = sampling.FlowSamplerConfig(steps=3, guidance=2.0)
  noise = np.random.default_rng(4).normal(size=(1, 2, 2, o)).astype(np.float32)
  got = sampling.TunaSampler(model, params, tok).text_to_image([chat], (2, 2), sc, negative=null, noise=noise)
  velocity = _hand_velocity(model, params, [ts.t2i_chat_sample(q, blank, tok, meta_slots=3) for q in (chat, null)], 1,
                            flow.text_guidance(2.0))
  want = flow.euler(velocity, jnp.asarray(noise.reshape(1, 4, o)), sampling.time_grid(3, 3.0))
  np.testing.assert_allclose(got, np.asarray(want).reshape(got.shape), atol=1e-5)


@pytest.mark.slow
def test_understanding_with_aspect_ratio_slots_and_kv_cache_equals_full_recompute(model_and_batch):
  """The prefill lays out the height / width slots as training does (left-padded rows included)."""
  from unimm_jax.data import packing
  from unimm_jax.sampling import tuna as sampling
  cfg, model, params, _ = model_and_batch
  o = cfg.token_features
  rng = np.random.default_rng(5)
  images = [rng.normal(size=(2, 3, o)).astype(np.float32), rng.normal(size=(2, 2, o)).astype(np.float32)]
  prompts = [[13, 14], [13, 14, 15, 16]]
  out = sampling.TunaSampler(model, params, tuna_tiny.TOK).understand(images, prompts, max_new_tokens=3)
  for img, prompt, got in zip(images, prompts, out.tokens):
    s = ts.understanding_prompt(img, prompt, tuna_tiny.TOK, meta_slots=3)
    tokens = []
    for _ in range(3):
      full = {k: np.concatenate([v, np.zeros(len(tokens), v.dtype)]) if isinstance(v, np.ndarray) else v
              for k, v in s.items()}
      full["input_ids"] = np.concatenate([s["input_ids"], np.asarray(tokens, np.int32)])
      b = {k: jnp.asarray(v) for k, v in ts.to_batch([packing.pack_row([full], 32)], 1, o).items()}
      logits = model.apply({"params": params}, {**b, "x_t": b["x1"], "span_t": jnp.ones((1, 1))}).logits
      tokens.append(int(jnp.argmax(logits[0, len(full["input_ids"]) - 1])))
    assert got.tolist() == tokens
