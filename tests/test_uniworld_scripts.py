"""UniWorld-V1 through the scripts: scripts/convert.py --uniworld on the fixture laid out as the release
directories (with tiny FLUX text encoders and a task head), then sample.py, edit.py, chat.py --image and
chat.py --route auto on the converted checkpoint."""

import os

import numpy as np
import pytest
from PIL import Image

from uniworld_tiny import FIXTURES, release_dirs, task_head_file, tiny_flux_dir
from scripts_run import run


@pytest.mark.slow   # five script runs, each loading JAX and compiling the tiny models
def test_convert_sample_edit_chat_route(tmp_path):
  dirs, _ = release_dirs(str(tmp_path))
  tiny_flux_dir(dirs["flux"])
  head = str(tmp_path / "task_head_final.pt")
  task_head_file(head, prefer="generate")
  ckpt = str(tmp_path / "converted")
  out = run("scripts/convert.py", "--uniworld", "v1", "--src", dirs["uniworld"], "--flux", dirs["flux"],
            "--siglip", dirs["siglip"], "--task_head", head, "--dst", ckpt)
  assert "uniworld" in out
  for name in ("vae", "t5", "clip", "scheduler_config.json", "tokenizer.json", "tokenizer_t5", "tokenizer_clip"):
    assert os.path.exists(os.path.join(ckpt, name)), name
  samples = str(tmp_path / "samples")
  run("scripts/sample.py", "--ckpt", ckpt, "--prompt", "a red apple", "--size", "32x48", "--steps", "2",
      "--out", samples)
  assert np.asarray(Image.open(os.path.join(samples, "000.png"))).shape == (32, 48, 3)
  image = str(tmp_path / "dog.png")
  with np.load(os.path.join(FIXTURES, "case_b_edit_conditioning.npz")) as z:
    Image.fromarray(z["ref_image_uint8"][0]).save(image)
  answer = run("scripts/chat.py", "--ckpt", ckpt, "--image", image, "--prompt", "What is in the image?",
               "--max_new_tokens", "3")
  assert "> What is in the image?" in answer
  # this head prefers "generate": --route auto edits (the source's 1:1 aspect at 64 x 64 pixels) instead of answering
  routed = str(tmp_path / "routed")
  reply = run("scripts/chat.py", "--ckpt", ckpt, "--route", "auto", "--image", image, "--prompt", "Make it red.",
              "--size", "64x64", "--steps", "2", "--max_new_tokens", "3", "--image_out", routed)
  assert f"[image] {os.path.join(routed, '000.png')}" in reply
  assert np.asarray(Image.open(os.path.join(routed, "000.png"))).shape == (64, 64, 3)
  edited = str(tmp_path / "edited.png")
  run("scripts/edit.py", "--ckpt", ckpt, "--image", image, "--instruction", "Make the dog wear a red hat.",
      "--steps", "1", "--out", edited)
  assert np.asarray(Image.open(edited)).shape == (1024, 1024, 3)   # update_size: 1:1 at cli.py's 1024^2 anchor
