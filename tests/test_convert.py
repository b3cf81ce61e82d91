"""HF <-> Orbax conversion: round trips, sharded and .bin sources, and clear errors."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import hf_tiny
from unimm_jax import registry
from unimm_jax.convert.family import abstract_params
import unimm_jax
from unimm_jax.convert import hf
from unimm_jax.convert.safetensors_writer import save_safetensors
from unimm_jax.convert.sources import open_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDS = np.random.default_rng(0).integers(0, 211, (2, 9))


def logits_of(loaded):
  return np.asarray(loaded.module.apply({"params": loaded.params}, jnp.asarray(IDS)).logits)


def ref_logits(ref):
  with torch.no_grad():
    return ref(torch.from_numpy(IDS)).logits.numpy()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("hf") / "qwen2")
  ref = hf_tiny.qwen2()
  ref.save_pretrained(d)
  hf_tiny.tiny_tokenizer().save_pretrained(d)
  return ref, d


@pytest.mark.parametrize("make", [hf_tiny.qwen2, hf_tiny.qwen3])
def test_convert_then_export_round_trip_reloads_in_transformers(make, tmp_path):
  ref = make(tie_word_embeddings=make is hf_tiny.qwen3)
  ref.save_pretrained(tmp_path / "hf")
  hf.convert_to_orbax(str(tmp_path / "hf"), str(tmp_path / "ours"))
  loaded = unimm_jax.load(str(tmp_path / "ours"))
  np.testing.assert_allclose(logits_of(loaded), ref_logits(ref), atol=1e-4, rtol=0)
  hf.export_to_hf(str(tmp_path / "ours"), str(tmp_path / "back"))
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
  np.testing.assert_array_equal(ref_logits(back), ref_logits(ref))
  exported = open_weights(str(tmp_path / "back"))
  for k, v in ref.state_dict().items():  # torch -> ours -> torch is bit-exact
    if k in exported:
      np.testing.assert_array_equal(exported[k](), v.numpy())


def test_sharded_index_and_bin_state_dicts_convert(tmp_path):
  ref = hf_tiny.qwen2()
  ref.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
  assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
  np.testing.assert_allclose(logits_of(unimm_jax.load(str(tmp_path / "sharded"))), ref_logits(ref), atol=1e-4, rtol=0)
  os.makedirs(tmp_path / "bin")
  ref.config.save_pretrained(tmp_path / "bin")
  torch.save(ref.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
  np.testing.assert_allclose(logits_of(unimm_jax.load(str(tmp_path / "bin"))), ref_logits(ref), atol=1e-4, rtol=0)


@pytest.mark.parametrize("payload", [
    lambda sd: sd,
    lambda sd: {"state_dict": sd},
    # tuna-2's training checkpoint (tuna/training/callbacks/checkpoint.py): weights beside step and optimizer state
    lambda sd: {"model": sd, "step": 7, "optimizer": {"state": {}, "param_groups": []}, "lr_scheduler": {"x": 1}},
], ids=["bare", "state_dict", "training_checkpoint"])
def test_pt_state_dict_is_read_bare_or_inside_a_training_checkpoint(payload, tmp_path):
  sd = {"a.weight": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4)}
  torch.save(payload(sd), tmp_path / "w.pt")
  src = open_weights(str(tmp_path / "w.pt"))
  assert list(src) == ["a.weight", "b"] and src.shapes == {"a.weight": (2, 3), "b": (4,)}
  np.testing.assert_array_equal(src["a.weight"](), sd["a.weight"].numpy())


def test_bfloat16_checkpoint_keeps_its_dtype(tmp_path):
  ref = hf_tiny.qwen2().to(torch.bfloat16)
  ref.save_pretrained(tmp_path / "hf")
  hf.convert_to_orbax(str(tmp_path / "hf"), str(tmp_path / "ours"))
  loaded = unimm_jax.load(str(tmp_path / "ours"))
  assert loaded.config.param_dtype == "bfloat16"
  assert loaded.params["layers_0"]["mlp"]["up_proj"]["kernel"].dtype == jnp.bfloat16
  hf.export_to_hf(str(tmp_path / "ours"), str(tmp_path / "back"))
  back = open_weights(str(tmp_path / "back"))
  w = ref.state_dict()["model.layers.0.mlp.up_proj.weight"]
  np.testing.assert_array_equal(back["model.layers.0.mlp.up_proj.weight"]().view(np.int16), w.view(torch.int16).numpy())


def test_load_in_scan_layout_gives_the_same_logits(hf_dir):
  ref, d = hf_dir
  np.testing.assert_allclose(logits_of(unimm_jax.load(d, scan_layers=True)), ref_logits(ref), atol=1e-4, rtol=0)


def _rewrite(src_dir, dst_dir, edit_tensors=None, edit_config=None):
  os.makedirs(dst_dir)
  src = open_weights(src_dir)
  tensors = {k: src[k]() for k in src}
  if edit_tensors:
    edit_tensors(tensors)
  save_safetensors(os.path.join(dst_dir, "model.safetensors"), tensors)
  cfg = json.load(open(os.path.join(src_dir, "config.json")))
  if edit_config:
    edit_config(cfg)
  json.dump(cfg, open(os.path.join(dst_dir, "config.json"), "w"))
  return str(dst_dir)


def test_convert_rejects_unknown_model_type_and_lists_supported(hf_dir, tmp_path):
  d = _rewrite(hf_dir[1], tmp_path / "x", edit_config=lambda c: c.update(model_type="llama"))
  with pytest.raises(unimm_jax.ConversionError, match=r"unsupported model_type 'llama'.*'qwen2'.*'qwen3'"):
    hf.convert_hf(d)


def test_convert_names_missing_unexpected_and_misshaped_keys_together(hf_dir, tmp_path):
  def edit(t):
    del t["model.layers.1.mlp.down_proj.weight"]
    t["model.layers.0.extra.weight"] = np.zeros(3, np.float32)
    t["model.layers.0.self_attn.o_proj.weight"] = np.zeros((64, 60), np.float32)
  d = _rewrite(hf_dir[1], tmp_path / "x", edit_tensors=edit)
  with pytest.raises(unimm_jax.ConversionError) as e:
    hf.convert_hf(d)
  msg = str(e.value)
  assert "3 problem(s)" in msg
  assert "unexpected key 'model.layers.0.extra.weight'" in msg
  assert "'layers_1/mlp/down_proj/kernel'" in msg and "not filled" in msg
  assert "'model.layers.0.self_attn.o_proj.weight' -> 'layers_0/self_attn/o_proj/kernel'" in msg


def test_config_shape_mismatch_names_parameter_and_both_shapes(hf_dir, tmp_path):
  d = _rewrite(hf_dir[1], tmp_path / "x", edit_config=lambda c: c.update(intermediate_size=120))
  with pytest.raises(unimm_jax.ConversionError, match=r"mlp\.up_proj\.weight.*gave \(64, 112\), model expects \(64, 120\)"):
    hf.convert_hf(d)


def test_truncated_safetensors_fails_clearly_and_leaves_destination_untouched(hf_dir, tmp_path):
  d = _rewrite(hf_dir[1], tmp_path / "x")
  path = os.path.join(d, "model.safetensors")
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 100)
  dst = tmp_path / "dst"
  os.makedirs(dst)
  (dst / "keep.txt").write_text("precious")
  with pytest.raises(unimm_jax.ConversionError, match=r"model\.safetensors: truncated safetensors file"):
    hf.convert_to_orbax(d, str(dst), overwrite=True)
  assert os.listdir(dst) == ["keep.txt"] and (dst / "keep.txt").read_text() == "precious"
  assert sorted(os.listdir(tmp_path)) == ["dst", "x"]  # no temporary directories left behind


def _tree_bytes(path):
  out = {}
  for root, _, files in os.walk(path):
    for name in files:
      with open(os.path.join(root, name), "rb") as f:
        out[os.path.relpath(os.path.join(root, name), path)] = f.read()
  return out


def _leftovers(parent):
  return [n for n in os.listdir(parent) if ".tmp-" in n or ".old-" in n]


def test_failed_or_interrupted_conversions_leave_the_destination_byte_for_byte(hf_dir, tmp_path, monkeypatch):
  dst = str(tmp_path / "ours")
  hf.convert_to_orbax(hf_dir[1], dst)
  before = _tree_bytes(dst)
  truncated = _rewrite(hf_dir[1], tmp_path / "truncated")
  os.truncate(os.path.join(truncated, "model.safetensors"), os.path.getsize(os.path.join(truncated, "model.safetensors")) - 64)
  wrong_shape = _rewrite(hf_dir[1], tmp_path / "shape", edit_tensors=lambda t: t.update(
      {"model.layers.0.mlp.up_proj.weight": np.zeros((10, 64), np.float32)}))
  missing_key = _rewrite(hf_dir[1], tmp_path / "missing", edit_tensors=lambda t: t.pop("model.norm.weight"))
  no_config = _rewrite(hf_dir[1], tmp_path / "no_config")
  os.remove(os.path.join(no_config, "config.json"))
  for src, match in [(truncated, r"truncated safetensors file"),
                     (wrong_shape, r"up_proj\.weight.* gave \(64, 10\), model expects \(64, 112\)"),
                     (missing_key, r"'norm/scale'"), (no_config, r"no_config: no config\.json")]:
    with pytest.raises(unimm_jax.ConversionError, match=match):
      hf.convert_to_orbax(src, dst, overwrite=True)
    assert _tree_bytes(dst) == before, src
    assert not _leftovers(tmp_path)

  def killed(*args, **kwargs):  # Ctrl-C (or SIGTERM in scripts/convert.py) half-way through writing
    raise KeyboardInterrupt
  monkeypatch.setattr("orbax.checkpoint.StandardCheckpointer.save", killed)
  with pytest.raises(KeyboardInterrupt):
    hf.convert_to_orbax(hf_dir[1], dst, overwrite=True)
  assert _tree_bytes(dst) == before and not _leftovers(tmp_path)


def test_a_successful_conversion_replaces_the_destination_and_cleans_what_a_killed_one_left(hf_dir, tmp_path,
                                                                                              monkeypatch):
  from unimm_jax import checkpoint
  ref, src = hf_dir
  dst = str(tmp_path / "ours")
  hf.convert_to_orbax(src, dst)
  doubled = _rewrite(src, tmp_path / "doubled", edit_tensors=lambda t: t.update({k: 2 * v for k, v in t.items()}))
  os.makedirs(tmp_path / "ours.tmp-killed")  # what a SIGKILL during a conversion leaves
  (tmp_path / "ours.tmp-killed" / "half.bin").write_bytes(b"x" * 100)
  hf.convert_to_orbax(doubled, dst, overwrite=True)
  norm = ref.model.norm.weight.detach().numpy()
  np.testing.assert_array_equal(np.asarray(unimm_jax.load(dst).params["norm"]["scale"]), 2 * norm)
  assert sorted(os.listdir(tmp_path)) == ["doubled", "ours"]
  # without an atomic exchange (another OS or filesystem): rename aside, rename in, remove the old one
  monkeypatch.setattr(checkpoint, "_exchange", lambda a, b: False)
  hf.convert_to_orbax(src, dst, overwrite=True)
  np.testing.assert_array_equal(np.asarray(unimm_jax.load(dst).params["norm"]["scale"]), norm)
  assert sorted(os.listdir(tmp_path)) == ["doubled", "ours"]
  # killed between those two renames: the next run puts the old destination back before anything else
  before = _tree_bytes(dst)
  os.makedirs(tmp_path / "ours.old-killed")
  os.replace(dst, tmp_path / "ours.old-killed" / "x")
  missing_key = _rewrite(src, tmp_path / "missing", edit_tensors=lambda t: t.pop("model.norm.weight"))
  with pytest.raises(unimm_jax.ConversionError):
    hf.convert_to_orbax(missing_key, dst, overwrite=True)
  assert _tree_bytes(dst) == before and not _leftovers(tmp_path)


def test_an_interrupted_export_leaves_the_previous_export(hf_dir, tmp_path, monkeypatch):
  hf.convert_to_orbax(hf_dir[1], str(tmp_path / "ours"))
  back = str(tmp_path / "back")
  hf.export_to_hf(str(tmp_path / "ours"), back)
  before = _tree_bytes(back)

  def killed(*args, **kwargs):
    raise KeyboardInterrupt
  monkeypatch.setattr(hf, "save_safetensors", killed)
  with pytest.raises(KeyboardInterrupt):
    hf.export_to_hf(str(tmp_path / "ours"), back, overwrite=True)
  assert _tree_bytes(back) == before and not _leftovers(tmp_path)


def test_restore_refuses_a_checkpoint_of_another_shape(hf_dir, tmp_path):
  from unimm_jax import checkpoint
  hf.convert_to_orbax(hf_dir[1], str(tmp_path / "ours"))
  meta = checkpoint.read_meta(str(tmp_path / "ours"))
  cfg = registry.family("qwen").config_cls.from_dict({**meta["config"], "depth": 3})
  with pytest.raises(unimm_jax.ConversionError, match=r"missing: \['layers_2/"):
    checkpoint.restore(str(tmp_path / "ours"), abstract_params(registry.family("qwen"), cfg))


def run_script(*args):
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_convert_and_chat_scripts_end_to_end(hf_dir, tmp_path):
  ref, d = hf_dir
  r = run_script("scripts/convert.py", "--src", d, "--dst", str(tmp_path / "ours"))
  assert r.returncode == 0, r.stderr
  assert json.loads(r.stdout)["tensors"] == len(ref.state_dict())
  r = run_script("scripts/convert.py", "--src", d, "--dst", str(tmp_path / "ours"))
  assert r.returncode == 2 and "destination exists" in r.stderr
  np.testing.assert_allclose(logits_of(unimm_jax.load(str(tmp_path / "ours"))), ref_logits(ref), atol=1e-4, rtol=0)
  r = run_script("scripts/chat.py", "--ckpt", str(tmp_path / "ours"), "--prompt", "what colour is the circle",
                 "--max_new_tokens", "6")
  assert r.returncode == 0, r.stderr
  assert r.stdout.startswith("> what colour is the circle\n") and "decode" in r.stderr
  r = run_script("scripts/convert.py", "--export", "--src", str(tmp_path / "ours"), "--dst", str(tmp_path / "back"))
  assert r.returncode == 0, r.stderr
  assert os.path.exists(tmp_path / "back" / "tokenizer.json")
