"""Ming-Lite-Uni through the scripts: scripts/convert.py --ming on the fixture release directory, then
sample.py (--all_scales), edit.py and chat.py --image on the converted checkpoint; and the converter's errors."""

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from unimm_jax.convert import ming as ming_convert
from unimm_jax.convert.errors import ConversionError
from scripts_run import ROOT, run

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "ming_lite_uni")


def test_missing_part_is_named(tmp_path):
  release = tmp_path / "release"
  shutil.copytree(FIXTURES, release, ignore=shutil.ignore_patterns("connector", "*.npz"))
  with pytest.raises(ConversionError, match="connector/ is missing"):
    ming_convert.config_from_release(str(release))


def test_mlp_without_caption_mlp_is_named(tmp_path):
  release = tmp_path / "release"
  shutil.copytree(FIXTURES, release, ignore=shutil.ignore_patterns("*.npz"))
  from safetensors.numpy import load_file, save_file
  path = release / "mlp" / "model.safetensors"
  tensors = {k: v for k, v in load_file(str(path)).items() if not k.startswith("mlp.fc1")}
  os.chmod(path, 0o644)
  save_file(tensors, str(path))
  with pytest.raises(ConversionError, match="mlp.fc1.weight"):
    ming_convert.config_from_release(str(release))


@pytest.mark.slow   # four script runs, each loading JAX and compiling the tiny models
def test_convert_sample_edit_chat(tmp_path):
  ckpt = str(tmp_path / "ming")
  run("scripts/convert.py", "--ming", FIXTURES, "--dst", ckpt)
  for name in ("transformer", "vae", "scheduler", "tokenizer.json"):
    assert os.path.exists(os.path.join(ckpt, name)), name
  out = str(tmp_path / "samples")
  run("scripts/sample.py", "--ckpt", ckpt, "--prompt", "a red apple", "--size", "64x64", "--steps", "2",
      "--all_scales", "--out", out)
  for scale in ("4x4", "8x8", "16x16"):
    assert np.asarray(Image.open(os.path.join(out, f"000_{scale}.png"))).shape == (64, 64, 3)
  image = str(tmp_path / "cake.png")
  with np.load(os.path.join(FIXTURES, "case_c_edit.npz")) as z:
    Image.fromarray(z["image_uint8"]).save(image)
  edited = str(tmp_path / "edited.png")
  run("scripts/edit.py", "--ckpt", ckpt, "--image", image, "--instruction", "add a candle", "--steps", "2",
      "--out", edited)
  assert np.asarray(Image.open(edited)).shape == (512, 512, 3)
  answer = run("scripts/chat.py", "--ckpt", ckpt, "--image", image, "--prompt", "What is in the image?",
               "--max_new_tokens", "3")
  assert "> What is in the image?" in answer
