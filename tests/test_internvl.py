"""InternViT + InternVL3: parity with transformers (fp32, per block), both checkpoint namings, the image-chat
pipeline (greedy tokens equal to transformers' generate), and its errors."""

import dataclasses
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import internvl_tiny as tiny
import unimm_jax
from test_vision_processing import photo
from unimm_jax import registry, sharding
from unimm_jax.convert import engine, hf, sources
from unimm_jax.convert.errors import ConversionError
from unimm_jax.convert.family import abstract_params
from unimm_jax.convert.maps import internvl as internvl_map
from unimm_jax.convert.safetensors_writer import save_safetensors
from unimm_jax.models import internvit, internvl
from unimm_jax.sampling.internvl import tile_features

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def close(ours, ref):
  np.testing.assert_allclose(np.asarray(ours), ref.detach().numpy(), atol=1e-4, rtol=0)


def nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@pytest.fixture(scope="module")
def untied():
  ref = tiny.hf_model()
  cfg, flat = tiny.convert(ref)
  return ref, cfg, engine.unflatten(flat)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, untied):
  """The tiny model as a transformers directory, as an original-release directory, and converted."""
  root = tmp_path_factory.mktemp("internvl")
  out = {"hf": tiny.save_hf_dir(str(root / "hf"), untied[0]),
         "release": tiny.save_release_dir(str(root / "release"), untied[0])}
  hf.convert_to_orbax(out["release"], str(root / "converted"))
  out["converted"] = str(root / "converted")
  return out


def test_vision_tower_every_hidden_state_matches_transformers_fp32(untied):
  ref, cfg, params = untied
  rng = np.random.default_rng(0)
  for shape in [(3, 28, 28, 3), (2, 42, 28, 3)]:   # the tile size, and a 6x4 grid (position table resized)
    pixels = rng.normal(size=shape).astype(np.float32)
    ours = internvit.InternViT(cfg.vision).apply({"params": params["vision_tower"]}, jnp.asarray(pixels),
                                                 return_hidden_states=True)
    with torch.no_grad():
      want = ref.model.vision_tower(nchw(pixels), output_hidden_states=True)
    assert len(ours.hidden_states) == len(want.hidden_states) == 3
    for a, b in zip(ours.hidden_states, want.hidden_states):
      close(a, b)
    close(ours.last_hidden_state, want.last_hidden_state)


@pytest.mark.parametrize("tie", [False, True])
def test_image_features_and_logits_match_transformers_fp32(untied, tie):
  ref, cfg, params = untied if not tie else (tiny.hf_model(tie=True), None, None)
  if tie:
    cfg, flat = tiny.convert(ref)
    params = engine.unflatten(flat)
    assert cfg.llm.tie_embeddings and "lm_head" not in params["language_model"]
  rng = np.random.default_rng(1)
  pixels = rng.normal(size=(3, 28, 28, 3)).astype(np.float32)
  ids = rng.integers(0, 211, (2, 14))
  ids[0, 2:6] = ids[1, 1:9] = tiny.IMAGE_TOKEN_ID   # 3 tiles x 4 tokens over two rows
  model = internvl.InternVL(cfg)
  feats = model.apply({"params": params}, jnp.asarray(pixels), method=internvl.InternVL.image_features)
  out = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(pixels), return_hidden_states=True)
  with torch.no_grad():
    want_feats = ref.model.get_image_features(pixel_values=nchw(pixels)).pooler_output
    want = ref(input_ids=torch.from_numpy(ids), pixel_values=nchw(pixels), output_hidden_states=True)
  close(feats, want_feats)
  np.testing.assert_allclose(tile_features(model, params, jnp.asarray(pixels), batch=2), feats, atol=1e-6)
  for a, b in zip(out.hidden_states, want.hidden_states):
    close(a, b)
  close(out.logits, want.logits)


def test_vision_feature_layer_minus_2_builds_one_layer_and_matches_transformers():
  ref = tiny.hf_model(vision_feature_layer=-2)
  cfg, flat = tiny.convert(ref)   # the ignored last vision layer: nothing unmapped, nothing unfilled
  assert cfg.vision.num_layers == 1 and not any(k.startswith("vision_tower/layers_1/") for k in flat)
  pixels = np.random.default_rng(2).normal(size=(1, 28, 28, 3)).astype(np.float32)
  feats = internvl.InternVL(cfg).apply({"params": engine.unflatten(flat)}, jnp.asarray(pixels),
                                       method=internvl.InternVL.image_features)
  with torch.no_grad():
    close(feats, ref.model.get_image_features(pixel_values=nchw(pixels), vision_feature_layer=-2).pooler_output)


def test_release_key_list_is_read_completely_into_internvl3_1b():
  """Every tensor of OpenGVLab/InternVL3-1B (tests/fixtures/internvl) maps, shape-checked, onto InternVL3-1B.
  Full width, one layer per tower (the other layers' keys repeat layer 0's; checked too), bf16 storage."""
  with open(os.path.join(ROOT, "tests/fixtures/internvl/internvl3_1b_keys.json")) as f:
    keys = json.load(f)["keys"]
  assert sum(int(np.prod(s)) for s in keys.values()) == 938_193_024
  layer_of = lambda k: k.split(".layers.")[1].split(".")[0] if ".layers." in k else None  # noqa: E731
  for tower, depth in (("vision_model.", 24), ("language_model.", 24)):
    per_layer = {}
    for k in keys:
      if k.startswith(tower) and layer_of(k) is not None:
        per_layer.setdefault(int(layer_of(k)), set()).add(k.replace(f".layers.{layer_of(k)}.", ".layers.N."))
    assert sorted(per_layer) == list(range(depth)) and all(v == per_layer[0] for v in per_layer.values())
  full = internvl.InternVLConfig.internvl3_1b()
  assert abstract_count(full) == 938_193_024
  fam = registry.family("internvl_chat")
  one = dataclasses.replace(full, vision=dataclasses.replace(full.vision, depth=1),
                            llm=dataclasses.replace(full.llm, depth=1), param_dtype="bfloat16")
  zeros = {k: (lambda s=s: np.broadcast_to(np.float32(0), s)) for k, s in keys.items() if layer_of(k) in (None, "0")}
  flat = engine.convert(zeros, fam.rules(one), engine.flatten(abstract_params(fam, one)), ignore=fam.ignore(one))
  assert flat["vision_tower/layers_0/attn/k_proj/kernel"].shape == (1024, 16, 64)
  assert flat["language_model/lm_head/kernel"].shape == (896, 151674)


def abstract_count(cfg) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params(registry.family("internvl"), cfg)))


def test_release_naming_matches_the_key_list_and_round_trips(untied):
  ref, cfg, params = untied
  with open(os.path.join(ROOT, "tests/fixtures/internvl/internvl3_1b_keys.json")) as f:
    release = {k.replace(".layers.0.", ".layers.N.") for k in json.load(f)["keys"] if ".layers." not in k
               or ".layers.0." in k}
  ours = tiny.release_state(ref)
  assert {k.replace(".layers.0.", ".layers.N.") for k in ours if ".layers.1." not in k} == release
  qkv = ours["vision_model.encoder.layers.1.attn.qkv.weight"]   # q, k, v stacked along the output axis
  sd = ref.state_dict()
  np.testing.assert_array_equal(qkv[64:128], sd["model.vision_tower.encoder.layer.1.attention.k_proj.weight"].numpy())
  back = engine.convert({k: (lambda v=v: v) for k, v in ours.items()}, internvl_map.RULES_ORIGINAL,
                        engine.flatten(abstract_params(registry.family("internvl_chat"), cfg)),
                        ignore=registry.family("internvl_chat").ignore(cfg))
  for k, v in engine.flatten(params).items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_every_param_is_annotated_and_fsdp_replicates_under_2_percent():
  cfg = internvl.InternVLConfig.internvl3_2b()
  boxed = jax.eval_shape(internvl.InternVL(cfg).init, jax.random.key(0), *internvl.example_inputs(cfg))["params"]
  for path, leaf in jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
    assert isinstance(leaf, nn.Partitioned), f"{jax.tree_util.keystr(path)} has no logical names"
    sharding.check_logical_names(leaf.names, jax.tree_util.keystr(path))
  mesh = jax.make_mesh((1, 8, 1), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  assert sharding.replicated_fraction(nn.meta.unbox(boxed), sharding.logical_shardings(boxed, mesh)) <= 0.02


def test_config_from_hf_reads_both_layouts_and_rejects_unsupported_ones(untied):
  ref, cfg, _ = untied
  release = internvl.config_from_hf(tiny.release_config(ref))
  assert dataclasses.replace(release, max_positions=None, image_token_id=tiny.IMAGE_TOKEN_ID) == cfg
  assert release.max_positions == 512 and release.image_token_id == 151667   # the tokenizer decides (pipeline)
  assert internvl.InternVLConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
  bad = tiny.release_config(ref)
  bad["llm_config"] = {**bad["llm_config"], "model_type": "internlm2", "architectures": ["InternLM2ForCausalLM"]}
  with pytest.raises(NotImplementedError, match="LLM model_type 'internlm2'.*InternLM2ForCausalLM"):
    internvl.config_from_hf(bad)
  with pytest.raises(NotImplementedError, match="InternViT-6B"):
    internvl.config_from_hf({**tiny.release_config(ref), "vision_config": {"qk_normalization": True}})
  with pytest.raises(NotImplementedError, match="ps_version 'v1'"):
    internvl.config_from_hf({**tiny.release_config(ref), "ps_version": "v1"})
  with pytest.raises(ValueError, match="unsupported model_type 'llava'"):
    internvl.config_from_hf({"model_type": "llava"})


def _images():
  return [np.asarray(photo(40, 90, 0)), np.asarray(photo(33, 30, 1)), np.asarray(photo(70, 20, 2))]


QUESTIONS = ["<image> and <image>: what colour is the circle?", "what shape"]


def _hf_generate(ref, chat, images, questions, new_tokens):
  """transformers' greedy generate on the prompts and tiles our pipeline makes (left-padded, one batch)."""
  per_prompt = [images[:2], images[2:]]
  tiles = [chat.processor(im) for ims in per_prompt for im in ims]
  prompts = [chat.prompt_ids(q, [len(chat.processor(im)) for im in ims]) for q, ims in zip(questions, per_prompt)]
  p = max(map(len, prompts))
  ids = torch.tensor([[0] * (p - len(x)) + x for x in prompts])
  mask = torch.tensor([[0] * (p - len(x)) + [1] * len(x) for x in prompts])
  with torch.no_grad():
    out = ref.generate(input_ids=ids, attention_mask=mask, pixel_values=nchw(np.concatenate(tiles)),
                       max_new_tokens=new_tokens, do_sample=False, eos_token_id=[2], pad_token_id=0)
  rows = []
  for row in out[:, p:].tolist():
    rows.append(row[:row.index(2) + 1] if 2 in row else row)
  return per_prompt, prompts, rows


def test_pipeline_greedy_tokens_equal_transformers_generate(untied, dirs, monkeypatch):
  """A batch of two prompts with different images (two of different sizes in one prompt), from the transformers
  directory; the prompt ids are also what transformers' InternVLProcessor makes of the same text."""
  ref = untied[0]
  chat = unimm_jax.load_pipeline(dirs["hf"])
  per_prompt, prompts, want = _hf_generate(ref, chat, _images(), QUESTIONS, 8)
  got = chat.generate(per_prompt, QUESTIONS, max_new_tokens=8)
  assert got.as_lists() == want
  # InternVLProcessor checks for a video processor class that needs torchvision; the images path does not
  monkeypatch.setattr(transformers.ProcessorMixin, "check_argument_for_proper_class", lambda *a: None)
  processor = transformers.InternVLProcessor(image_processor=tiny.image_processor(), tokenizer=chat.tokenizer,
                                             image_seq_length=4)
  text = chat.tokenizer.apply_chat_template(
      [{"role": "user", "content": QUESTIONS[0].replace("<image>", "<IMG_CONTEXT>")}], add_generation_prompt=True,
      tokenize=False)
  hf_in = processor(images=[Image.fromarray(im) for im in per_prompt[0]], text=[text], return_tensors="np")
  assert hf_in["input_ids"][0].tolist() == prompts[0]
  np.testing.assert_array_equal(np.concatenate([chat.processor(im) for im in per_prompt[0]]),
                                hf_in["pixel_values"].transpose(0, 2, 3, 1))


def test_release_and_converted_directories_answer_like_transformers(untied, dirs):
  ref = untied[0]
  want = None
  for name in ("release", "converted"):
    chat = unimm_jax.load_pipeline(dirs[name])
    assert chat.module.cfg.max_positions == 512   # the release's dynamic RoPE limit
    if want is None:
      per_prompt, _, want = _hf_generate(ref, chat, _images(), QUESTIONS, 8)
    assert chat.generate(per_prompt, QUESTIONS, max_new_tokens=8).as_lists() == want, name
  loaded = unimm_jax.load(dirs["converted"])
  assert loaded.family == "internvl_chat"


def test_export_writes_each_naming_back_bit_exact(untied, dirs, tmp_path):
  ref = untied[0]
  hf.export_to_hf(dirs["converted"], str(tmp_path / "release"))
  with open(tmp_path / "release" / "config.json") as f:
    assert json.load(f)["model_type"] == "internvl_chat"
  back = dict(sources.open_weights(str(tmp_path / "release")))
  want = tiny.release_state(ref)
  assert sorted(back) == sorted(want)
  for k, load in back.items():
    np.testing.assert_array_equal(load(), want[k], err_msg=k)
  assert os.path.isfile(tmp_path / "release" / "tokenizer.json")
  hf.convert_to_orbax(dirs["hf"], str(tmp_path / "ours"))
  hf.export_to_hf(str(tmp_path / "ours"), str(tmp_path / "hf"))
  again = transformers.InternVLForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
  sd = ref.state_dict()
  for k, v in again.state_dict().items():
    np.testing.assert_array_equal(v.numpy(), sd[k].numpy(), err_msg=k)
  assert os.path.isfile(tmp_path / "hf" / "preprocessor_config.json")


def test_bad_input_errors_name_the_image_prompt_file_or_key(dirs, tmp_path):
  chat = unimm_jax.load_pipeline(dirs["hf"])
  img = _images()[1]
  with pytest.raises(ValueError, match=r"prompt 0: 2 <image> placeholder\(s\) for 1 image"):
    chat.generate([[img]], ["<image> vs <image>"])
  with pytest.raises(ValueError, match=r"prompt 1: 1 <image> placeholder\(s\) for 3 image"):
    chat.generate([[img], [img] * 3], ["what", "<image> what"])
  with pytest.raises(ValueError, match="prompt 0: 8 <IMG_CONTEXT> tokens for 1 image"):
    chat.generate([[img]], ["what is <IMG_CONTEXT>" * 4])
  with pytest.raises(ValueError, match=r"prompt 0, image 1: an image of 5x40 px is smaller than one 7 px patch"):
    chat.generate([[img, np.zeros((5, 40, 3), np.uint8)]], ["what"])
  Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(tmp_path / "small.png")
  with pytest.raises(ValueError, match="small.png: an image of 6x6 px"):
    chat.read_image(str(tmp_path / "small.png"))
  (tmp_path / "broken.png").write_bytes(b"not a png")
  with pytest.raises(ValueError, match="broken.png: cannot read the image"):
    chat.read_image(str(tmp_path / "broken.png"))
  # an unknown model_type, and a checkpoint without its vision tower
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "config.json").write_text(json.dumps({"model_type": "internvl_video"}))
  with pytest.raises(ConversionError, match=r"bad/config.json: unsupported model_type 'internvl_video'"):
    unimm_jax.load(str(bad))
  blind = tmp_path / "blind"
  blind.mkdir()
  (blind / "config.json").write_text(open(os.path.join(dirs["release"], "config.json")).read())
  weights = dict(sources.open_weights(dirs["release"]))
  save_safetensors(str(blind / "model.safetensors"),
                   {k: v() for k, v in weights.items() if not k.startswith("vision_model.")}, {"format": "pt"})
  with pytest.raises(ConversionError, match=r"(?s)blind: .*model parameters not filled: \['vision_tower/"):
    unimm_jax.load(str(blind))


@pytest.mark.slow
def test_chat_script_asks_about_two_images_of_a_converted_release(dirs, tmp_path):
  for i, im in enumerate(_images()[:2]):
    Image.fromarray(im).save(tmp_path / f"{i}.png")
  r = subprocess.run([sys.executable, "scripts/chat.py", "--ckpt", dirs["converted"], "--image", str(tmp_path / "0.png"),
                      "--image", str(tmp_path / "1.png"), "--prompt", QUESTIONS[0],
                      "--max_new_tokens", "4"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]   # one --prompt takes every --image
  asked = [line for line in r.stdout.splitlines() if line.startswith("> ")]
  assert asked == [f"> {QUESTIONS[0]}"]
