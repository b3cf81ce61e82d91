"""A tiny video TUNA (configs/tuna_tiny.py:video) trains on CPU on the shapes world's clips, and its answers to
held-out video questions beat chance: where a moving object starts and ends needs the clip's first and last
frames."""

import collections
import json
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, ".")
from configs import tuna_tiny  # noqa: E402
from unimm_jax.data import shapes, shapes_eval, tuna_data, video  # noqa: E402
from unimm_jax.data import tuna_sequences as ts  # noqa: E402
from unimm_jax.data.tokenizer import shapes_tokenizer  # noqa: E402
from unimm_jax.models import tuna  # noqa: E402
from unimm_jax.sampling.tuna import TunaSampler  # noqa: E402
from unimm_jax.training import trainer  # noqa: E402

STEPS, QUESTIONS = 400, 120
CHANCE = {"start": 1 / len(shapes.CELLS), "end": 1 / len(shapes.CELLS), "color": 1 / len(shapes.COLORS),
          "shape": 1 / len(shapes.SHAPES)}


@pytest.mark.slow
def test_tiny_video_tuna_answers_held_out_video_questions_above_chance(tmp_path):
  c = tuna_tiny.get_config("video")
  c.steps = STEPS
  c.mesh.ici, c.batch_size = (-1, 1, 1), 8  # data parallel over the tests' 8 CPU devices
  c.checkpoint.every = STEPS
  state = trainer.train(c, str(tmp_path))
  cfg = tuna.TunaConfig.from_dict(c.model.to_dict())
  tok = shapes_tokenizer(video=True)
  tokens = ts.TunaTokens.from_tokenizer(tok)
  sampler = TunaSampler(tuna.Tuna(cfg), jax.device_get(state.params), tokens)
  builder = tuna_data.TunaBuilder(tokens, cfg.patch, cfg.channels)
  size = int(c.data.image_size)
  # another seed than training's: clips the model has not seen
  records = [shapes.shapes_record("vmmu", i, size=size, seed=1_000_003) for i in range(QUESTIONS)]
  clips = [builder.image(video.prepare_video(r["images"][0], ((size, size),))) for r in records]
  prompts = [tok(r["text"], add_special_tokens=False)["input_ids"] for r in records]
  answers = []
  for i in range(0, QUESTIONS, 40):
    gen = sampler.understand(clips[i:i + 40], prompts[i:i + 40], max_new_tokens=4, stop_tokens=[tok.eos_token_id],
                             video_markers=True)
    answers += [shapes_eval.normalize_answer(tok.decode(a)) for a in gen.as_lists()]
  ok = collections.defaultdict(list)
  for r, a in zip(records, answers):
    ok[json.loads(r["meta"])["qa_type"]].append(a == r["answer"])
  acc = {t: float(np.mean(v)) for t, v in ok.items()}
  print(f"video QA after {STEPS} steps: {acc} (chance {CHANCE})")
  overall = float(np.mean([x for v in ok.values() for x in v]))
  chance = float(np.mean([CHANCE[json.loads(r["meta"])["qa_type"]] for r in records]))
  assert overall > chance + 0.2, (acc, overall, chance)
  assert acc["end"] > CHANCE["end"] + 0.15, acc  # the last frame read, not only the first


@pytest.mark.slow
def test_sample_py_frames_writes_a_gif_and_chat_py_video_answers_about_it(tmp_path):
  import os
  import subprocess

  from PIL import Image

  import hf_tiny
  qwen_dir, ckpt, out = tmp_path / "qwen", str(tmp_path / "tuna"), tmp_path / "clips"
  hf_tiny.qwen2(vocab_size=200, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                rope_theta=1e6).save_pretrained(qwen_dir)
  hf_tiny.tiny_tokenizer(200).save_pretrained(qwen_dir)

  def run(*args):
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return r

  run("scripts/convert.py", "--tuna", "tiny", "--llm", str(qwen_dir), "--dst", ckpt)
  r = run("scripts/sample.py", "--ckpt", ckpt, "--prompt", "red circle", "--size", "8x12", "--frames", "3",
          "--steps", "3", "--out", str(out))
  assert sorted(os.listdir(out)) == ["000.gif", "000_frames.png"] and "red circle" in r.stdout
  frames, _ = video.load_video(out / "000.gif")
  assert frames.shape == (3, 8, 12, 3)
  assert Image.open(out / "000_frames.png").size == (36, 8)
  r = run("scripts/chat.py", "--ckpt", ckpt, "--video", str(out / "000.gif"), "--video_frames", "3", "--prompt",
          "what moves", "--max_new_tokens", "4")
  assert r.stdout.startswith("> what moves\n")
  bad = subprocess.run([sys.executable, "scripts/chat.py", "--ckpt", ckpt, "--video", str(tmp_path / "none.mp4"),
                        "--prompt", "x"], capture_output=True, text=True, timeout=900)
  assert bad.returncode == 2 and "none.mp4" in bad.stderr, bad.stderr[-2000:]
