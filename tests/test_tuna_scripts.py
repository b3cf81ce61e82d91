"""Smoke tests of the TUNA command lines on the tiny config: convert from parts, sample, edit, chat --image."""

import os
import subprocess
import sys

import numpy as np
from PIL import Image

import hf_tiny
import unimm_jax
from scripts_run import ROOT, run


def test_tuna_scripts_end_to_end_on_the_tiny_config(tmp_path):
  qwen_dir = tmp_path / "qwen"
  ref = hf_tiny.qwen2(vocab_size=200, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, rope_theta=1e6)
  ref.save_pretrained(qwen_dir)
  hf_tiny.tiny_tokenizer(200).save_pretrained(qwen_dir)
  ckpt = str(tmp_path / "tuna")
  run("scripts/convert.py", "--tuna", "tiny", "--llm", str(qwen_dir), "--dst", ckpt)
  loaded = unimm_jax.load(ckpt)
  assert loaded.family == "tuna" and loaded.config.llm.vocab == 256
  emb = np.asarray(loaded.params["llm"]["embed_tokens"]["embedding"])
  np.testing.assert_array_equal(emb[:200], ref.model.embed_tokens.weight.detach().numpy())
  np.testing.assert_allclose(emb[200:], np.broadcast_to(emb[:200].mean(0), (56, 64)), atol=1e-6)

  out = tmp_path / "samples"
  printed = run("scripts/sample.py", "--ckpt", ckpt, "--prompt", "red circle", "--prompt", "blue square", "--size",
                "8x12", "--steps", "3", "--out", str(out))
  assert sorted(os.listdir(out)) == ["000.png", "001.png", "grid.png"]
  assert Image.open(out / "000.png").size == (12, 8) and "red circle" in printed
  # image-to-image at strength 0 returns the init image (its size taken from the file)
  run("scripts/sample.py", "--ckpt", ckpt, "--prompt", "red circle", "--init-image", str(out / "001.png"),
      "--strength", "0", "--steps", "3", "--out", str(tmp_path / "i2i"))
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "i2i" / "000.png")),
                                np.asarray(Image.open(out / "001.png")))
  # the reference pipeline's chat-template prompts (system prompt, its negative prompt as the null branch)
  run("scripts/sample.py", "--ckpt", ckpt, "--prompt", "red circle", "--chat-template", "--size", "8x8", "--steps", "2",
      "--out", str(tmp_path / "chat"))
  assert sorted(os.listdir(tmp_path / "chat")) == ["000.png", "grid.png"]
  run("scripts/edit.py", "--ckpt", ckpt, "--image", str(out / "000.png"), "--instruction", "make it blue",
      "--steps", "3", "--out", str(tmp_path / "edited.png"))
  assert Image.open(tmp_path / "edited.png").size == (12, 8)
  answer = run("scripts/chat.py", "--ckpt", ckpt, "--image", str(out / "000.png"), "--prompt", "what colour",
               "--max_new_tokens", "4")
  assert answer.startswith("> what colour\n")
  (tmp_path / "broken.png").write_bytes(b"not a png")   # unreadable input: exit 2 naming the file
  bad = subprocess.run([sys.executable, "scripts/edit.py", "--ckpt", ckpt, "--image", str(tmp_path / "broken.png"),
                        "--instruction", "x"], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert bad.returncode == 2 and "broken.png" in bad.stderr, bad.stderr[-2000:]
