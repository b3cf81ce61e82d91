"""Video data: clips decoded from GIF / MP4 files, frames sampled at an fps or a count, bad and truncated files
skipped and counted, JSONL manifests of clips through the TUNA pipeline, and the shapes world's moving objects."""

import json

import numpy as np
import pytest

from unimm_jax.data import pipeline, shapes, sources, transforms, tuna_data, video
from unimm_jax.data.tokenizer import VIDEO_TOKENS, shapes_tokenizer


def _clip(frames=8, size=32):
  """Frame k is a flat grey of level 24 k: decoded values name the frame despite lossy codecs."""
  return np.stack([np.full((size, size, 3), 24 * k, np.uint8) for k in range(frames)])


def _frame_ids(frames):
  return [int(round(float(f.mean()) / 24)) for f in frames]


def test_gif_and_mp4_decode_with_their_times_and_frames_sample_by_fps_or_count(tmp_path):
  clip = _clip()
  # 10 fps: GIF frame durations are whole centiseconds
  video.write_gif(tmp_path / "c.gif", clip, fps=10)
  video.write_mp4(tmp_path / "c.mp4", clip, fps=10)
  for name in ("c.gif", "c.mp4"):
    frames, times = video.load_video(tmp_path / name)
    assert frames.shape == (8, 32, 32, 3) and frames.dtype == np.uint8, name
    assert _frame_ids(frames) == list(range(8)), name
    np.testing.assert_allclose(times, np.arange(8) / 10, atol=1e-3, err_msg=name)
    assert _frame_ids(video.sample_frames(frames, times, video.VideoSpec(frames=3, fps=5))) == [0, 2, 4]
    assert _frame_ids(video.sample_frames(frames, times, video.VideoSpec(frames=4))) == [0, 2, 4, 6]
    # shorter than asked: the last frame repeats, as the reference's VideoDataset
    assert _frame_ids(video.sample_frames(frames, times, video.VideoSpec(frames=5, fps=2.5))) == [0, 4, 7, 7, 7]
  assert _frame_ids(video.sample_frames(frames[:2], times[:2], video.VideoSpec(frames=3))) == [0, 1, 1]
  prepared = video.prepare_video(frames[:3], ((16, 16),))
  assert prepared.shape == (3, 16, 16, 3) and prepared.dtype == np.float32 and prepared.max() <= 1
  video.VideoSpec(frames=9).check_vae(4, "here")
  with pytest.raises(ValueError, match=r"here: 6 frames per clip; the VAE encodes 1 \+ 4k frames \(e\.g\. 5\)"):
    video.VideoSpec(frames=6).check_vae(4, "here")


def test_manifest_of_clips_skips_and_counts_bad_files_and_feeds_tuna_batches(tmp_path):
  clip = _clip(9)
  video.write_gif(tmp_path / "good.gif", clip)
  video.write_mp4(tmp_path / "good.mp4", clip)
  data = (tmp_path / "good.mp4").read_bytes()
  (tmp_path / "truncated.mp4").write_bytes(data[: len(data) // 2])
  gif = (tmp_path / "good.gif").read_bytes()
  (tmp_path / "truncated.gif").write_bytes(gif[: len(gif) // 2])
  (tmp_path / "garbage.mp4").write_bytes(b"not a video at all")
  lines = [{"video": v, "question": "where does the red square end ?", "answer": "top left"}
           for v in ("missing.mp4", "truncated.mp4", "truncated.gif", "garbage.mp4", "good.mp4", "good.gif")]
  lines.append({"question": "no clip field", "answer": "top left"})
  (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
  src = sources.ManifestSource(tmp_path / "qa.jsonl", "vmmu")
  tok = shapes_tokenizer(video=True)
  pipe = tuna_data.tuna_pipeline([pipeline.Stream("vmmu", src, 1.0)], tokenizer=tok, patch=16, channels=3,
                                 buckets=((32, 32),), seq_len=64, max_spans=2, batch_size=2,
                                 video_spec=video.VideoSpec(frames=5), video_markers=True)
  it = iter(pipe)  # the packing window (64) reads every record, good or bad, before the first row
  b = next(it)
  stats = it.stats()
  assert {k: v for k, v in stats.items() if k.startswith("skipped/")} == {
      "skipped/missing_file": 1, "skipped/unreadable_video": 3, "skipped/bad_record": 1}
  assert stats["samples/vmmu"] >= 2
  vocab = tok.get_vocab()
  for r in range(2):
    frames = b["thw"][r, b["span_ids"][r] > 0, 0]
    assert sorted(set(frames.tolist())) == list(range(5))  # 5 frames of 2x2 tokens, 1 time slot
    assert (b["span_ids"][r] > 0).sum() == 1 + 5 * 4
    ids = b["input_ids"][r]
    assert {vocab[t] for t in VIDEO_TOKENS} <= set(ids.tolist())
    assert not b["flow_mask"][r].any() and b["span_clean"][r, 0]
  # frame k of the clip sampled uniformly from 9: 0, 1, 3, 5, 7 -> grey levels of x1 (normalised to [-1, 1])
  slots = (b["span_ids"][0] > 0) & ~b["time_slot"][0]
  levels = b["x1"][0, slots].reshape(5, 4, -1).mean(axis=(1, 2))
  np.testing.assert_allclose((levels + 1) * 127.5 / 24, [0, 1, 3, 5, 7], atol=0.3)


def test_a_video_record_without_a_video_spec_is_refused():
  tok = shapes_tokenizer(video=True)
  prepare = pipeline.Prepare(tok, lambda ex: ex, ((32, 32),))
  with pytest.raises(ValueError, match=r"a t2v record \(r\) needs Prepare.video_spec"):
    prepare({"id": "r", "stream": "t2v", "images": [_clip(3)], "text": "a clip", "answer": ""})
  with pytest.raises(transforms.BadImage, match="bad_video: array of shape"):
    video.load_video(np.zeros((3, 4, 4), np.uint8))


def test_shapes_clips_move_an_object_between_cells_and_train_as_t2v_and_vmmu():
  r = shapes.shapes_record("t2v", 7)
  meta = json.loads(r["meta"])
  obj = shapes.scene_from_json(meta["scene"])[0]
  clip = r["images"][0]
  assert clip.shape == (shapes.CLIP_FRAMES, 32, 32, 3)
  assert r["text"] == f"{'an' if obj.color[0] in 'aeiou' else 'a'} {obj.color} {obj.shape} moves from the " \
                      f"{obj.cell} to the {meta['end']}"
  np.testing.assert_array_equal(clip[0], shapes.render([obj], 32))
  np.testing.assert_array_equal(clip[-1], shapes.render([obj._replace(cell=meta["end"])], 32))
  qa = [shapes.shapes_record("vmmu", i) for i in range(40)]
  assert {json.loads(q["meta"])["qa_type"] for q in qa} == set(shapes.VIDEO_QA_TYPES)
  for q in qa:
    m = json.loads(q["meta"])
    if m["qa_type"] == "end":
      assert q["answer"] == m["end"]
  # the image streams' records are what they were before the clips came
  assert shapes.shapes_record("mmu", 3)["id"] == "shapes32-0-mmu-3"
  tok = shapes_tokenizer(video=True)
  assert all(tok.convert_ids_to_tokens(t) != "[UNK]" for q in qa for t in tok(q["text"] + " " + q["answer"])["input_ids"])
