"""Qwen2.5-VL: the smart_resize processor, window packing, the vision tower and the whole model against
transformers (fp32), M-RoPE positions, image chat (greedy tokens = transformers' generate), conversion and
export, and clear errors."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_qwen2_vl
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

import hf_tiny
from annotations import assert_every_param_annotated
import unimm_jax
from test_vision_processing import photo
from unimm_jax import registry
from unimm_jax.convert import engine, hf
from unimm_jax.convert.errors import ConversionError
from unimm_jax.convert.family import abstract_params
from unimm_jax.convert.sources import open_weights
from unimm_jax.data import qwen_vl as data_vl
from unimm_jax.models import qwen_vit, qwen_vl
from unimm_jax.sampling import vlm
from unimm_jax.sampling.qwen_vl import QwenVLChat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = hf_tiny.QWEN_VL_TOKENS
GRIDS = [(1, 12, 20), (1, 4, 6)]            # patch grids: windows of 4x4 patches, a partial window column/row
VIDEO = (2, 4, 4)                           # two temporal patches of 4x4


def close(ours, ref, valid=slice(None)):
  np.testing.assert_allclose(np.asarray(ours)[valid], ref.detach().numpy()[valid], atol=1e-4, rtol=0)


def convert(ref, cfg=None):
  """Our config and params for a transformers Qwen2.5-VL, from its in-memory (5.x) names via our converter."""
  fam = registry.family("qwen_vl")
  cfg = cfg or qwen_vl.config_from_hf(ref.config)
  renamed = {}
  for k, v in ref.state_dict().items():
    for pattern, repl in fam.legacy_keys:
      k = re.sub(pattern, repl, k)
    renamed[k] = lambda v=v: v.detach().numpy()
  abstract = engine.flatten(abstract_params(fam, cfg))
  return cfg, engine.unflatten(engine.convert(renamed, fam.rules(cfg), abstract, ignore=fam.ignore(cfg)))


@pytest.fixture(scope="module")
def tiny():
  ref = hf_tiny.qwen2_5_vl()
  cfg, params = convert(ref)
  return ref, cfg, jax.tree.map(jnp.asarray, params)


def patches(grids, seed=0):
  return np.random.default_rng(seed).normal(size=(sum(int(np.prod(g)) for g in grids), 1176)).astype(np.float32)


# ---------------------------------------------------------------------------------------------- processor

def test_smart_resize_equals_transformers_on_many_shapes():
  rng = np.random.default_rng(0)
  for h, w in rng.integers(1, 4000, (400, 2)):
    if max(h, w) / min(h, w) > 200:
      continue
    for lo, hi in [(56 * 56, 28 * 28 * 1280), (256 * 28 * 28, 256 * 28 * 28), (4 * 784, 30 * 784)]:
      assert data_vl.smart_resize(int(h), int(w), 28, lo, hi) == hf_qwen2_vl.smart_resize(int(h), int(w), 28, lo, hi)


def test_processor_equals_transformers_pil_backend():
  ref = transformers.Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64)
  ours = data_vl.QwenVLImageProcessor.from_hf(ref.to_dict())
  assert (ours.min_pixels, ours.max_pixels) == (28 * 28 * 4, 28 * 28 * 64)
  images = [photo(h, w, i) for i, (h, w) in enumerate([(37, 53), (480, 311), (13, 200), (1000, 700), (70, 150)])]
  want = ref(images, return_tensors="np")
  got = [ours(im) for im in images]
  np.testing.assert_array_equal(np.concatenate([p for p, _ in got]), want["pixel_values"])
  assert [list(g) for _, g in got] == want["image_grid_thw"].tolist()
  assert len({g for _, g in got}) == 4             # upscaled, downscaled to max_pixels (twice), rounded
  np.testing.assert_array_equal(ours(images[1].convert("L"))[0], ours(images[1].convert("L").convert("RGB"))[0])


def test_pack_vision_equals_transformers_window_index_positions_and_segments():
  grids = [*GRIDS, VIDEO, (1, 10, 2)]
  packing = data_vl.pack_vision(grids, merge=2, window=2)
  g = torch.tensor(grids)
  window_index, cu_windows = get_vision_window_index(g, 2, 56, 14)
  n = int(g.prod(-1).sum())
  order = (window_index.numpy()[:, None] * 4 + np.arange(4)).reshape(-1)    # merge groups -> patches
  assert packing.source.shape == (1, 320) and np.all(packing.source[0, n:] == -1)
  np.testing.assert_array_equal(packing.source[0, :n], order)
  np.testing.assert_array_equal(packing.positions[0, :n], get_vision_position_ids(g, 2).numpy()[order])
  for ids, cu in ((packing.window_ids, cu_windows), (packing.frame_ids, get_vision_cu_seqlens(g))):
    np.testing.assert_array_equal(np.cumsum(np.bincount(ids[0, :n])[1:]), cu.numpy()[1:])
  np.testing.assert_array_equal(packing.merged, torch.argsort(window_index).numpy())
  rows = data_vl.pack_vision(grids, merge=2, window=2, seq_len=256)     # several rows, frames whole
  assert rows.source.shape == (2, 256) and sorted(rows.source[rows.source >= 0]) == list(range(n))
  x = np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
  group_means = x.reshape(-1, 4, 3).mean(1)              # a stand-in merger: the mean of each m x m group
  for p in (packing, rows):
    np.testing.assert_array_equal(p.unpack(p.rows(x).reshape(len(p.source), -1, 4, 3).mean(2)), group_means)


# ---------------------------------------------------------------------------------------------- model parity

def test_vision_tower_blocks_and_merger_match_transformers_fp32(tiny):
  ref, cfg, params = tiny
  pv = patches(GRIDS)
  packing = data_vl.pack_vision(GRIDS, merge=2, window=cfg.vision.window, seq_len=256)   # 2 rows
  vis = qwen_vl.VisionInputs.from_packing(packing, pv, len(GRIDS))
  out = qwen_vit.QwenVisionTransformer(cfg.vision).apply(
      {"params": params["visual"]}, vis.patches, vis.positions, vis.frame_ids, vis.window_ids,
      return_hidden_states=True)
  with torch.no_grad():
    r = ref.model.visual(torch.from_numpy(pv), grid_thw=torch.tensor(GRIDS), output_hidden_states=True)
  assert len(out.hidden_states) == len(r.hidden_states) == cfg.vision.depth + 1
  where = packing.source >= 0                       # our window-ordered rows hold transformers' sequence in order
  for ours_h, ref_h in zip(out.hidden_states, r.hidden_states):
    close(np.asarray(ours_h)[where], ref_h)
  close(packing.unpack(out.pooler_output), r.pooler_output)


def prompt_ids(n_image: int, n_video: int = 0) -> list[int]:
  ids = [5, 6, 7, T["vision_start_token_id"]] + [T["image_token_id"]] * n_image + [T["vision_end_token_id"], 8]
  if n_video:
    ids += [T["vision_start_token_id"]] + [T["video_token_id"]] * n_video + [T["vision_end_token_id"], 9]
  return ids


def batch(rows):
  length = max(len(r) for r in rows)
  ids, mask = np.zeros((len(rows), length), np.int64), np.zeros((len(rows), length), np.int64)
  for i, r in enumerate(rows):
    ids[i, length - len(r):], mask[i, length - len(r):] = r, 1
  return ids, mask


def test_logits_and_hidden_states_match_transformers_with_images_and_a_video(tiny):
  ref, cfg, params = tiny
  # row 0: image 0 and the video; row 1 (left-padded): image 1
  ids, mask = batch([prompt_ids(60, 8), [12] + prompt_ids(6)])
  pv, pvv = patches(GRIDS), patches([VIDEO], seed=1)
  with torch.no_grad():
    r = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), pixel_values=torch.from_numpy(pv),
            image_grid_thw=torch.tensor(GRIDS), pixel_values_videos=torch.from_numpy(pvv),
            video_grid_thw=torch.tensor([VIDEO]), second_per_grid_ts=torch.tensor([0.5]),
            mm_token_type_ids=torch.from_numpy(np.where(ids == T["image_token_id"], 1, 0)
                                               + np.where(ids == T["video_token_id"], 2, 0)),
            output_hidden_states=True)
  kw = qwen_vl.prepare(ids, cfg, pixel_values=pv, image_grid_thw=GRIDS, pixel_values_videos=pvv,
                       video_grid_thw=[VIDEO], second_per_grid_ts=[0.5], mask=mask)
  out = qwen_vl.QwenVL(cfg).apply({"params": params}, jnp.asarray(ids), kw["vision"], positions=kw["positions"],
                                  segment_ids=jnp.asarray(mask, jnp.int32), return_hidden_states=True)
  valid = mask.astype(bool)
  close(out.logits, r.logits, valid)
  assert len(out.hidden_states) == len(r.hidden_states)
  for ours_h, ref_h in zip(out.hidden_states, r.hidden_states):
    close(ours_h, ref_h, valid)


def test_rope_index_equals_transformers_get_rope_index(tiny):
  ref, cfg, _ = tiny
  ids, mask = batch([prompt_ids(60, 8) + prompt_ids(6), [3] * 9 + prompt_ids(8, 12)])
  images, videos = [GRIDS[0], GRIDS[1], (1, 4, 8)], [VIDEO, (3, 4, 4)]
  seconds = [0.5, 1.25]
  types = np.where(ids == T["image_token_id"], 1, 0) + np.where(ids == T["video_token_id"], 2, 0)
  want, want_deltas = ref.model.get_rope_index(
      torch.from_numpy(ids), torch.from_numpy(types), image_grid_thw=torch.tensor(images),
      video_grid_thw=torch.tensor(videos), second_per_grid_ts=torch.tensor(seconds),
      attention_mask=torch.from_numpy(mask))
  got, deltas = qwen_vl.rope_index(ids, cfg, images, videos, seconds, mask)
  np.testing.assert_array_equal(got.transpose(2, 0, 1), want.numpy())
  np.testing.assert_array_equal(deltas, want_deltas.numpy()[:, 0])
  video_t = got[1, ids[1] == T["video_token_id"], 0]                # 3 temporal patches, 2.5 positions apart
  np.testing.assert_array_equal(np.unique(video_t - video_t.min()), [0, 2, 5])


def test_every_param_is_annotated_in_the_vocabulary():
  cfg = qwen_vl.QwenVLConfig.tiny()
  fam = registry.family("qwen_vl")
  boxed = jax.eval_shape(fam.module(cfg).init, jax.random.key(0), *fam.example_inputs(cfg))["params"]
  assert_every_param_annotated(boxed)
  assert "visual" in boxed and "language_model" in boxed


# ---------------------------------------------------------------------------------------------- image chat

def chat_inputs(tok, processor, per_prompt, questions):
  """transformers' side of a chat batch, as Qwen2_5_VLProcessor builds it (its class needs torchvision for the
  video processor, absent here): the chat template, each <|image_pad|> repeated by its image's merged tokens
  (replace_image_token), left-padded tokenization, mm_token_type_ids."""
  texts, pixels, grids = [], [], []
  for ims, q in zip(per_prompt, questions):
    text = tok.apply_chat_template([vlm.user_message(q, len(ims))], add_generation_prompt=True, tokenize=False)
    feats = processor(ims, return_tensors="np")
    for g in feats["image_grid_thw"]:
      text = text.replace("<|image_pad|>", "<|placeholder|>" * (int(np.prod(g)) // 4), 1)
    texts.append(text.replace("<|placeholder|>", "<|image_pad|>"))
    pixels.append(feats["pixel_values"])
    grids += feats["image_grid_thw"].tolist()
  tok.padding_side = "left"
  enc = tok(texts, return_tensors="pt", padding=True)
  return dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
              pixel_values=torch.from_numpy(np.concatenate(pixels)), image_grid_thw=torch.tensor(grids),
              mm_token_type_ids=(enc["input_ids"] == T["image_token_id"]).int())


def test_greedy_chat_tokens_equal_transformers_generate_several_images_and_a_batch(tiny):
  ref, cfg, params = tiny
  tok = hf_tiny.tiny_vl_tokenizer()
  processor = transformers.Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 30)
  images = [photo(h, w, 20 + i) for i, (h, w) in enumerate([(90, 130), (60, 50), (200, 100)])]
  per_prompt = [[images[0]], [images[1], images[2]]]        # one image; two of different sizes in one prompt
  questions = ["what colour is the circle", "what shape <image> is the <image> square"]
  with torch.no_grad():
    inputs = chat_inputs(tok, processor, per_prompt, questions)
    want = ref.generate(**inputs, max_new_tokens=12, do_sample=False)[:, inputs["input_ids"].shape[1]:].numpy()
  chat = QwenVLChat(qwen_vl.QwenVL(cfg), params, tok, data_vl.QwenVLImageProcessor.from_hf(processor.to_dict()))
  prompt = chat.prompt(per_prompt, questions)
  np.testing.assert_array_equal(prompt["ids"][:, -inputs["input_ids"].shape[1]:], inputs["input_ids"].numpy())
  got = chat.generate(per_prompt, questions, max_new_tokens=12, stop_tokens=())
  np.testing.assert_array_equal(got.tokens, want)


def test_chat_rejects_placeholder_image_count_mismatches(tiny):
  _, cfg, params = tiny
  chat = QwenVLChat(qwen_vl.QwenVL(cfg), params, hf_tiny.tiny_vl_tokenizer())
  img = np.zeros((56, 56, 3), np.uint8)
  with pytest.raises(ValueError, match=r"has 2 <image> marker\(s\) for 1 image\(s\)"):
    chat.prompt([[img]], ["a <image> b <image>"])
  with pytest.raises(ValueError, match=r"prompt 0: 1 image placeholder\(s\) \(token 204\) for 2 image\(s\)"):
    vlm.prompt_batch([[1, T["image_token_id"], 2]], T["image_token_id"], [[4, 4]], 0)
  ids, _ = batch([prompt_ids(7)])
  with pytest.raises(ValueError, match="image placeholders and image features do not match: 7 image tokens "
                                       r"\(id 204\) in the prompt\(s\), 6 merged image tokens"):
    qwen_vl.prepare(ids, cfg, pixel_values=patches(GRIDS[1:]), image_grid_thw=GRIDS[1:])
  with pytest.raises(ValueError, match=r"7 image tokens \(id 204\) in the prompt\(s\), 0 merged image tokens"):
    qwen_vl.prepare(ids, cfg)


def test_images_too_small_for_a_merged_patch_are_refused():
  with pytest.raises(ValueError, match=r"image 1 has a patch grid \(t, h, w\) = \(1, 1, 4\)"):
    data_vl.pack_vision([(1, 4, 4), (1, 1, 4)], merge=2, window=2)
  with pytest.raises(ValueError, match="image of 13x900 pixels is smaller than one 28x28 merged patch"):
    data_vl.smart_resize(13, 900, 28, min_pixels=0)
  with pytest.raises(ValueError, match="not a positive multiple of patch \\* merge = 28"):
    data_vl.patchify(np.zeros((14, 28, 3), np.float32), 14, 2, 2)
  with pytest.raises(ValueError, match="aspect ratio must be smaller than 200"):
    data_vl.smart_resize(2, 900)


# ---------------------------------------------------------------------------------------------- checkpoints

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("hf") / "qwen2_5_vl")
  ref = hf_tiny.qwen2_5_vl()
  ref.save_pretrained(d)
  hf_tiny.tiny_vl_tokenizer().save_pretrained(d)
  transformers.Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 30).save_pretrained(d)
  return ref, d


def logits_of(module, params, cfg, ids):
  kw = qwen_vl.prepare(ids, cfg, pixel_values=patches(GRIDS), image_grid_thw=GRIDS)
  return np.asarray(module.apply({"params": params}, jnp.asarray(ids), kw["vision"], positions=kw["positions"]).logits)


def ref_logits(ref, ids):
  with torch.no_grad():
    return ref(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(patches(GRIDS)),
               image_grid_thw=torch.tensor(GRIDS),
               mm_token_type_ids=torch.from_numpy((ids == T["image_token_id"]).astype(np.int64))).logits.numpy()


def test_full_directory_loads_converts_and_exports_bit_exact(hf_dir, tmp_path):
  ref, d = hf_dir
  assert any(k.startswith("visual.") for k in open_weights(d))          # the saved (legacy) names
  ids, _ = batch([prompt_ids(60) + prompt_ids(6)])
  loaded = unimm_jax.load(d)
  assert loaded.family == "qwen_vl" and loaded.tokenizer is not None
  np.testing.assert_allclose(logits_of(loaded.module, loaded.params, loaded.config, ids), ref_logits(ref, ids),
                             atol=1e-4, rtol=0)
  hf.convert_to_orbax(d, str(tmp_path / "ours"))
  assert os.path.isfile(tmp_path / "ours" / "preprocessor_config.json")
  hf.export_to_hf(str(tmp_path / "ours"), str(tmp_path / "back"))
  hf_tiny.assert_same_weights(str(tmp_path / "back"), d)


@pytest.mark.slow
def test_converted_directory_reloads_in_scan_layout_and_export_reloads_in_transformers(hf_dir, tmp_path):
  ref, d = hf_dir
  ids, _ = batch([prompt_ids(60) + prompt_ids(6)])
  want = ref_logits(ref, ids)
  r = run_script("scripts/convert.py", "--src", d, "--dst", str(tmp_path / "ours"))
  assert r.returncode == 0, r.stderr
  back = unimm_jax.load(str(tmp_path / "ours"), scan_layers=True)   # both towers stacked (Family.stack_layers)
  assert back.config.vision.scan_layers and back.config.text.scan_layers and "blocks" in back.params["visual"]
  np.testing.assert_allclose(logits_of(back.module, back.params, back.config, ids), want, atol=1e-4, rtol=0)
  r = run_script("scripts/convert.py", "--export", "--src", str(tmp_path / "ours"), "--dst", str(tmp_path / "back"))
  assert r.returncode == 0, r.stderr
  again = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
  np.testing.assert_array_equal(ref_logits(again, ids), want)
  r = run_script("scripts/convert.py", "--src", d, "--dst", str(tmp_path / "text"), "--family", "qwen")
  assert r.returncode == 0, r.stderr
  assert json.loads(r.stdout)["family"] == "qwen"


def test_transformers_in_memory_names_load_too(tmp_path):
  ref = hf_tiny.qwen2_5_vl()
  d = tmp_path / "hf5"
  d.mkdir()
  from unimm_jax.convert.safetensors_writer import save_safetensors
  save_safetensors(str(d / "model.safetensors"), {k: v.numpy() for k, v in ref.state_dict().items()}, {"format": "pt"})
  (d / "config.json").write_text(ref.config.to_json_string())
  assert any(k.startswith("model.visual.") for k in open_weights(str(d)))
  loaded = unimm_jax.load(str(d))
  ids, _ = batch([prompt_ids(60) + prompt_ids(6)])
  np.testing.assert_allclose(logits_of(loaded.module, loaded.params, loaded.config, ids), ref_logits(ref, ids),
                             atol=1e-4, rtol=0)


def test_vision_tower_alone_loads_and_exports(tmp_path):
  """Qwen2_5_VisionTransformerPretrainedModel checkpoints (family qwen_vit; Ming-Lite-Uni's qwen2_5_vit/)."""
  ref = hf_tiny.qwen2_5_vl().model.visual
  ref.save_pretrained(tmp_path / "vit")
  loaded = unimm_jax.load(str(tmp_path / "vit"))
  assert loaded.family == "qwen_vit" and loaded.tokenizer is None
  pv = patches(GRIDS)
  packing = data_vl.pack_vision(GRIDS, merge=2, window=loaded.config.window)
  vis = qwen_vl.VisionInputs.from_packing(packing, pv, len(GRIDS))
  out = loaded.module.apply({"params": loaded.params}, vis.patches, vis.positions, vis.frame_ids, vis.window_ids)
  with torch.no_grad():
    close(packing.unpack(out.pooler_output), ref(torch.from_numpy(pv), grid_thw=torch.tensor(GRIDS)).pooler_output)
  hf.convert_to_orbax(str(tmp_path / "vit"), str(tmp_path / "ours"))
  hf.export_to_hf(str(tmp_path / "ours"), str(tmp_path / "back"))
  hf_tiny.assert_same_weights(str(tmp_path / "vit"), str(tmp_path / "back"))


def test_text_decoder_alone_loads_when_asked_for_by_family(hf_dir, tmp_path):
  ref, d = hf_dir
  text = unimm_jax.load(d, family="qwen")
  assert text.family == "qwen" and text.config.model_type == "qwen2_5_vl_text"
  ids = np.asarray([[5, 6, 7, 8, 9]])
  with torch.no_grad():
    want = ref(input_ids=torch.from_numpy(ids)).logits.numpy()
  np.testing.assert_allclose(text.module.apply({"params": text.params}, jnp.asarray(ids)).logits, want, atol=1e-4,
                             rtol=0)
  with pytest.raises(ConversionError, match="family 'siglip' does not read model_type 'qwen2_5_vl'"):
    unimm_jax.load(d, family="siglip")
  hf.convert_to_orbax(d, str(tmp_path / "text"), family="qwen")
  with pytest.raises(ConversionError, match="text decoder alone has no Hugging Face form"):
    hf.export_to_hf(str(tmp_path / "text"), str(tmp_path / "back"))


def test_unknown_model_type_and_a_missing_vision_tower_are_named(hf_dir, tmp_path):
  ref, d = hf_dir
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "config.json").write_text(json.dumps({**json.loads(ref.config.to_json_string()), "model_type": "qwen9_vl"}))
  with pytest.raises(ConversionError, match=r"config.json: unsupported model_type 'qwen9_vl'; supported: .*qwen2_5_vl"):
    unimm_jax.load(str(bad))
  (tmp_path / "text_only").mkdir()
  from unimm_jax.convert.safetensors_writer import save_safetensors
  save_safetensors(str(tmp_path / "text_only" / "model.safetensors"),
                   {k: v() for k, v in open_weights(d).items() if not k.startswith("visual.")}, {"format": "pt"})
  (tmp_path / "text_only" / "config.json").write_text(ref.config.to_json_string())
  with pytest.raises(ConversionError, match=r"model parameters not filled: \['visual/blocks_0/attn/k_proj/bias'"):
    unimm_jax.load(str(tmp_path / "text_only"))


def run_script(*args):
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_chat_script_refuses_images_it_cannot_assign_to_prompts():
  r = run_script("scripts/chat.py", "--ckpt", "/nonexistent", "--image", "a.png", "--image", "b.png", "--image",
                 "c.png", "--prompt", "what shape", "--prompt", "what colour")
  assert r.returncode == 2 and "3 --image for 2 --prompt" in r.stderr


@pytest.mark.slow
def test_chat_script_asks_about_several_images_of_different_sizes(hf_dir, tmp_path):
  ref, d = hf_dir
  paths = []
  for i, (h, w) in enumerate([(90, 130), (60, 50)]):
    paths.append(str(tmp_path / f"{i}.png"))
    photo(h, w, 40 + i).save(paths[-1])
  r = run_script("scripts/chat.py", "--ckpt", d, "--image", paths[0], "--image", paths[1], "--prompt",
                 "what colour is the <image> circle <image>", "--max_new_tokens", "4")
  assert r.returncode == 0, r.stderr
  assert r.stdout.startswith("> what colour is the <image> circle <image>\n") and "decode" in r.stderr
  r = run_script("scripts/chat.py", "--ckpt", d, "--image", paths[0], "--image", paths[1], "--prompt", "what shape",
                 "--prompt", "what colour", "--max_new_tokens", "4")
  assert r.returncode == 0, r.stderr
  assert "> what shape\n" in r.stdout and "> what colour\n" in r.stdout


@pytest.mark.slow
def test_bench_vision_qwen_sections_run_on_tiny_settings():
  r = run_script("scripts/bench_vision.py", "--tiny", "--models", "qwen_vl")
  assert r.returncode == 0, r.stderr[-3000:]
  for line in ("Qwen2.5-VL tower: unimm-jax fp32 / transformers fp32", "packed / padded", "greedy tokens identical: True"):
    assert line in r.stdout
