"""Input pipeline: determinism, resumption, sharding, packing, bad data, sources, transforms, tokenizer."""

from __future__ import annotations

import functools
import json
import os
import signal
import threading
import time
from itertools import islice

import numpy as np
import pytest
from PIL import Image

from unimm_jax import schema
from unimm_jax.data import packing, pipeline, shapes, sources, transforms
from unimm_jax.data import tuna_sequences as ts
from unimm_jax.data.tuna_data import TunaBuilder
from unimm_jax.data.tokenizer import shapes_tokenizer

MIX = {"t2i": 0.5, "edit": 0.2, "mmu": 0.2, "text": 0.1}


@pytest.fixture(scope="module")
def tokenizer():
  return shapes_tokenizer()


def _pipe(tokenizer, seed=0, window=16, seq_len=160, batch_size=3, mix=MIX, **kw):
  streams = [pipeline.Stream(s, shapes.ShapesSource(s, 300), w) for s, w in mix.items()]
  prepare = pipeline.Prepare(tokenizer, pipeline.SimpleBuilder(tokenizer, 16), ((32, 32),))
  return pipeline.Pipeline(streams, prepare, seq_len=seq_len, batch_size=batch_size, seed=seed,
                           window=window, **kw)


def _same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    if k == "attachments":
      assert [(r, o) for r, o, _ in a[k]] == [(r, o) for r, o, _ in b[k]]
      for (_, _, x), (_, _, y) in zip(a[k], b[k]):
        np.testing.assert_array_equal(x, y)
    else:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_pipeline_is_deterministic_for_a_seed_and_changes_with_it(tokenizer):
  a, b, c = (iter(_pipe(tokenizer, seed=s, prefetch_batches=p)) for s, p in ((0, 2), (0, 0), (1, 2)))
  for _ in range(4):
    x, y, z = next(a), next(b), next(c)
    _same(x, y)
  assert not np.array_equal(x["input_ids"], z["input_ids"])


@pytest.mark.parametrize("prefetch_batches", [0, 2])
def test_restored_iterator_state_yields_the_same_next_batches_and_counters(tokenizer, prefetch_batches):
  # small window: states fall mid-window and on window boundaries
  pipe = _pipe(tokenizer, window=8, prefetch_batches=prefetch_batches)
  it = iter(pipe)
  for step in range(7):
    state = json.loads(json.dumps(it.get_state()))  # checkpoints store it as JSON
    expected = [next(it) for _ in range(2)]
    stats = it.stats()
    fresh = iter(pipe)
    fresh.set_state(state)
    for want in expected:
      _same(next(fresh), want)
    assert fresh.stats() == stats, step


def test_phases_switch_the_mix_at_the_step_and_resume_in_either_phase(tokenizer):
  """A warm-up of 3 batches on t2i alone, then the full mix: the switch is exact in batches (= train steps),
  the second phase starts its pipeline from the beginning, and a state saved at any step (the boundary
  included) resumes with the same batches and counters."""
  warm, full = _pipe(tokenizer, mix={"t2i": 1.0}, window=8), _pipe(tokenizer, window=8)
  phases = pipeline.Phases([warm, full], [3])
  it, states, batches, stats = iter(phases), [], [], []
  for _ in range(6):
    states.append(json.loads(json.dumps(it.get_state())))
    batches.append(next(it))
    stats.append(it.stats())
  assert [s["phase"] for s in stats] == [0, 0, 0, 1, 1, 1]
  assert stats[2]["samples/t2i"] == stats[2]["samples"] > 0
  assert stats[5]["samples/mmu"] > 0 and stats[5]["samples"] > stats[2]["samples"]
  for got, want in zip(batches, [*islice(iter(warm), 3), *islice(iter(full), 3)]):
    _same(got, want)
  for k in range(6):
    fresh = iter(phases)
    fresh.set_state(states[k])
    for j in range(k, 6):
      _same(next(fresh), batches[j])
      assert fresh.stats() == stats[j], (k, j)
    fresh.close()
  with pytest.raises(ValueError, match="state is from a single mix; this run is a curriculum"):
    iter(phases).set_state(iter(full).get_state())
  with pytest.raises(ValueError, match="state is from a curriculum .* at phase 1; this run has a single mix"):
    iter(full).set_state(states[4])
  with pytest.raises(ValueError, match="2 pipelines need 1 phase lengths"):
    pipeline.Phases([warm, full], [])
  with pytest.raises(ValueError, match="positive numbers of steps"):
    pipeline.Phases([warm, full], [0])


def test_shards_cover_every_record_exactly_once():
  src = shapes.ShapesSource("t2i", 50)
  seen = []
  for k in range(3):
    ds = pipeline.mixed_records([pipeline.Stream("t2i", src, 1.0)], seed=3, shard_index=k, shard_count=3,
                                num_epochs=1)
    seen += [r["id"] for r in ds]
  assert sorted(seen) == sorted(src[i]["id"] for i in range(50))


def test_mixing_follows_the_weights(tokenizer):
  it = iter(_pipe(tokenizer, batch_size=8))
  for _ in range(20):
    next(it)
  s = it.stats()
  shares = {k: s[f"samples/{k}"] / s["samples"] for k in MIX}
  for k, w in MIX.items():
    assert abs(shares[k] - w) < 0.06, shares


def test_batches_have_documented_keys_dtypes_and_static_shapes(tokenizer):
  it = iter(_pipe(tokenizer, batch_size=2, seq_len=96))
  for _ in range(3):
    b = next(it)
    assert {k: (v.shape, v.dtype) for k, v in b.items() if k != "attachments"} == {
        "input_ids": ((2, 96), np.int32), "loss_mask": ((2, 96), np.float32), "segment_ids": ((2, 96), np.int32),
        "positions": ((2, 96), np.int32), "span_ids": ((2, 96), np.int32)}
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for row, offset, image in b["attachments"]:
      assert image.shape == (32, 32, 3) and image.dtype == np.float32
      assert -1.0 <= image.min() and image.max() <= 1.0
      assert b["input_ids"][row, offset] == pad and b["span_ids"][row, offset] > 0
  stacked = pipeline.stack_attachments(b["attachments"])
  assert stacked["data"].shape == (len(b["attachments"]), 32, 32, 3)


def _random_samples(rng, n, max_len):
  out = []
  for i in range(n):
    length = int(rng.integers(1, max_len + 1))
    local = np.zeros(length, np.int32)
    k = int(rng.integers(0, 3)) if length >= 4 else 0
    atts = []
    for s in range(1, k + 1):  # spans in disjoint thirds of the sample
      a = (s - 1) * length // 3
      local[a : a + 2] = s
      atts.append((a, np.full((2, 2, 3), i, np.float32)))
    out.append({"id": str(i), "input_ids": np.arange(length, dtype=np.int32) + 1000 * i, "span_local": local,
                "loss_mask": np.ones(length, np.float32), "attachments": atts})
  return out


@pytest.mark.parametrize("method", packing.METHODS)
def test_packing_never_splits_a_sample_and_respects_the_row_length(method):
  rng = np.random.default_rng(0)
  samples = _random_samples(rng, 60, 40)
  rows = packing.assign_rows([len(s["input_ids"]) for s in samples], 64, method)
  assert sorted(i for r in rows for i in r) == list(range(60))
  for r in rows:
    row = packing.pack_row([samples[i] for i in r], 64)
    assert sum(len(samples[i]["input_ids"]) for i in r) <= 64
    assert all(v.shape == (64,) for k, v in row.items() if k != "attachments")
    spans_seen = 0
    for seg, i in enumerate(r, start=1):
      where = np.nonzero(row["segment_ids"] == seg)[0]
      assert np.array_equal(where, np.arange(where[0], where[0] + len(samples[i]["input_ids"])))  # contiguous
      np.testing.assert_array_equal(row["input_ids"][where], samples[i]["input_ids"])
      np.testing.assert_array_equal(row["positions"][where], np.arange(len(where)))
      local = samples[i]["span_local"]
      ids = row["span_ids"][where]
      assert np.array_equal(ids > 0, local > 0) and np.all(ids[local > 0] == local[local > 0] + spans_seen)
      spans_seen += int(local.max(initial=0))
    assert np.all(row["segment_ids"][row["segment_ids"] == 0] == 0)
    starts = {seg: int(np.argmax(row["segment_ids"] == seg)) for seg in range(1, len(r) + 1)}
    got = [(off, int(data[0, 0, 0])) for off, data in row["attachments"]]
    want = [(starts[seg] + off, i) for seg, i in enumerate(r, start=1) for off, _ in samples[i]["attachments"]]
    assert got == want  # every attachment moved with its sample


def test_best_fit_never_uses_more_rows_than_first_fit_here():
  lengths = list(np.random.default_rng(1).integers(1, 60, 200))
  best, first = (len(packing.assign_rows(lengths, 64, m)) for m in ("best_fit", "first_fit"))
  assert best <= first and best >= -(-sum(lengths) // 64)


def test_packer_rejects_samples_whose_arrays_disagree_in_length():
  bad = {"id": "x", "input_ids": np.zeros(5, np.int32), "loss_mask": np.zeros(4, np.float32)}
  with pytest.raises(ValueError, match="'loss_mask' has shape \\(4,\\), want \\[5\\]"):
    packing.pack_row([bad], 8)


def _png(path, size=(40, 60), color=(200, 10, 10)):
  Image.new("RGB", size, color).save(path)


def test_bad_files_are_skipped_and_counted_never_crash_or_change_shapes(tmp_path, tokenizer):
  _png(tmp_path / "good.png")
  _png(tmp_path / "good2.png")
  data = (tmp_path / "good.png").read_bytes()
  (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
  (tmp_path / "garbage.png").write_bytes(b"not an image at all")
  lines = [  # bad ones first: with a window of 2, whole windows hold nothing usable
      {"image": "missing.png", "caption": "a red square"},
      {"image": "truncated.png", "caption": "a red square"},
      {"image": "garbage.png", "caption": "a red square"},
      {"image": "good.png", "caption": "   "},
      {"image": "good.png", "caption": " ".join(["red"] * 200)},  # longer than a row
      {"caption": "no image field"},
      {"image": "good.png", "caption": "a red square"},
      {"image": "good2.png", "caption": "a red square at the top"},
  ]
  text = "\n".join(json.dumps(x) for x in lines) + "\n{not json\n"
  (tmp_path / "train.jsonl").write_text(text)
  src = sources.ManifestSource(tmp_path / "train.jsonl", "t2i")
  prepare = pipeline.Prepare(tokenizer, pipeline.SimpleBuilder(tokenizer, 16), ((32, 48),))
  pad = tokenizer.pad_token_id
  pipe = pipeline.Pipeline([pipeline.Stream("t2i", src, 1.0)], prepare, seq_len=64, batch_size=4, num_epochs=1,
                           window=2, pad_values={"input_ids": pad})
  it = iter(pipe)
  batches = list(it)
  assert len(batches) == 1 and batches[0]["input_ids"].shape == (4, 64)
  padding = batches[0]["segment_ids"] == 0
  # the good samples fall in different windows: 2 rows of data, 2 empty rows
  assert not padding[:2].all(axis=1).any() and padding[2:].all() and np.all(batches[0]["input_ids"][padding] == pad)
  assert [a.shape for _, _, a in batches[0]["attachments"]] == [(32, 48, 3)] * 2
  stats = it.stats()
  assert stats["samples"] == 2
  assert {k: v for k, v in stats.items() if k.startswith("skipped/")} == {
      "skipped/missing_file": 1, "skipped/unreadable_image": 2, "skipped/empty_text": 1,
      "skipped/too_long": 1, "skipped/bad_record": 2}


def _next_within(it, seconds=120):
  """next(it) in a thread, so a pipeline that loops for ever fails the test instead of hanging it."""
  out = {}
  worker = threading.Thread(target=lambda: out.update(result=_catch(lambda: next(it))), daemon=True)
  worker.start()
  worker.join(seconds)
  assert not worker.is_alive(), f"next() did not return within {seconds} s"
  return out["result"]


def _catch(fn):
  try:
    return fn()
  except Exception as e:  # noqa: BLE001 -- returned for the test to inspect
    return e


def test_a_source_of_only_bad_records_stops_with_an_error_naming_it(tmp_path, tokenizer):
  """The issue's hang: every record of a repeating source is skipped. Even mixed with a good stream (which
  keeps rows coming), the bad stream gives up after max_consecutive_skips, naming its file and reasons."""
  lines = [{"image": f"missing{i}.png", "caption": "a red circle"} for i in range(3)]
  (tmp_path / "t2i.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
  streams = [pipeline.Stream("t2i", sources.ManifestSource(tmp_path / "t2i.jsonl", "t2i"), 0.5),
             pipeline.Stream("mmu", shapes.ShapesSource("mmu", 50), 0.5)]
  prepare = pipeline.Prepare(tokenizer, pipeline.SimpleBuilder(tokenizer, 16), ((32, 32),))
  for mix in (streams[:1], streams):
    it = iter(pipeline.Pipeline(mix, prepare, seq_len=160, batch_size=2, window=4, max_consecutive_skips=30))
    err = _next_within(it) if len(mix) == 1 else next(e for e in (_next_within(it) for _ in range(40))
                                                       if isinstance(e, Exception))
    assert isinstance(err, packing.TooManySkips), err
    msg = str(err)
    assert "the last 30 records of stream 't2i' were all skipped (missing_file 30)" in msg
    assert f"ManifestSource('{tmp_path / 't2i.jsonl'}'" in msg and f"{tmp_path / 't2i.jsonl'}:1 (missing_file: " in msg
    assert "config.data.max_consecutive_skips" in msg
    it.close()


def test_bad_records_are_named_once_and_not_counted_again_each_epoch(tmp_path, tokenizer, caplog):
  _png(tmp_path / "good.png")
  lines = ["{not json", json.dumps({"caption": "no image"}), json.dumps({"image": "missing.png", "caption": "a red"}),
           json.dumps({"image": "good.png", "caption": "a red square"}),
           json.dumps({"image": "good.png", "caption": "a red square at the top"})]
  (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n")
  src = sources.ManifestSource(tmp_path / "t.jsonl", "t2i")
  prepare = pipeline.Prepare(tokenizer, pipeline.SimpleBuilder(tokenizer, 16), ((32, 32),))
  it = iter(pipeline.Pipeline([pipeline.Stream("t2i", src, 1.0)], prepare, seq_len=64, batch_size=2,
                              num_epochs=5, window=2))
  list(it)
  stats = it.stats()
  assert stats["samples"] == 10  # 2 good records x 5 epochs
  assert (stats["skipped/missing_file"], stats["skipped/bad_record"]) == (1, 2)  # once, not once an epoch
  log = caplog.text
  assert f"{tmp_path / 't.jsonl'}:1: JSONDecodeError" in log
  assert f"{tmp_path / 't.jsonl'}:2: no image field" in log
  named = f"skipped t2i record {tmp_path / 't.jsonl'}:3 (missing_file: {tmp_path / 'missing.png'})"
  assert log.count(named) == 1, log


class _StalledOnce:
  """A source whose first read hangs for a while (a stalled network filesystem)."""

  def __init__(self, source, seconds):
    self.source, self.seconds, self.first = source, seconds, True

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    if self.first:
      self.first = False
      time.sleep(self.seconds)
    return self.source[i]


def test_closing_does_not_wait_for_a_read_that_hangs(tokenizer, monkeypatch, caplog):
  monkeypatch.setattr(pipeline, "CLOSE_TIMEOUT_S", 0.5)
  src = _StalledOnce(shapes.ShapesSource("t2i", 20), seconds=4)
  prepare = pipeline.Prepare(tokenizer, pipeline.SimpleBuilder(tokenizer, 16), ((32, 32),))
  it = iter(pipeline.Pipeline([pipeline.Stream("t2i", src, 1.0)], prepare, seq_len=160, batch_size=2,
                              num_threads=1))
  t0 = time.perf_counter()
  it.close()  # what the trainer does on its way out after SIGTERM
  assert time.perf_counter() - t0 < 5 and "still reading" in caplog.text


def test_trainer_gives_up_on_an_all_bad_manifest_instead_of_hanging(tmp_path):
  from configs import tuna_tiny
  from unimm_jax.training import trainer

  (tmp_path / "t2i.jsonl").write_text(json.dumps({"image": "missing.png", "caption": "a red circle"}) + "\n")
  config = tuna_tiny.get_config("smoke")
  config.data.update(name="tuna_streams", max_consecutive_skips=40)
  config.mesh.ici, config.batch_size = (-1, 1, 1), 8  # the tests' 8 CPU devices
  config.data.sources.t2i = f"jsonl:{tmp_path / 't2i.jsonl'}"
  for stream in ("edit", "mmu", "text"):
    config.data.weights[stream] = 0.0

  def hung(signum, frame):
    raise AssertionError("train() hung on the all-bad manifest")

  previous = signal.signal(signal.SIGALRM, hung)
  signal.alarm(300)
  try:
    with pytest.raises(packing.TooManySkips, match=r"stream 't2i' were all skipped \(missing_file 40\)"):
      trainer.train(config, str(tmp_path / "run"))
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_array_record_round_trips_arrays_bytes_and_paths(tmp_path):
  recs = [shapes.shapes_record(s, i) for s in ("t2i", "edit", "text") for i in range(3)]
  recs.append({"id": "b", "stream": "t2i", "images": [b"\x89PNG..."], "text": "t", "answer": "", "meta": ""})
  recs.append({"id": "p", "stream": "t2i", "images": ["x/y.png"], "text": "t", "answer": "", "meta": ""})
  assert sources.write_array_record(tmp_path / "d.array_record", recs) == len(recs)
  src = sources.ArrayRecordSource(tmp_path / "d.array_record")
  assert len(src) == len(recs)
  for i, want in enumerate(recs):
    got = src[i]
    assert {k: got[k] for k in want if k != "images"} == {k: want[k] for k in want if k != "images"}
    assert len(got["images"]) == len(want["images"])
    for x, y in zip(got["images"], want["images"]):
      assert type(x) is type(y)
      if isinstance(y, np.ndarray):
        assert x.dtype == y.dtype and np.array_equal(x, y)
      else:
        assert x == y


def test_unreadable_array_record_entries_are_skipped_and_counted(tmp_path, tokenizer):
  from array_record.python.array_record_module import ArrayRecordWriter

  writer = ArrayRecordWriter(str(tmp_path / "d.array_record"), "group_size:1")
  writer.write(sources.encode_record(shapes.shapes_record("t2i", 0)))
  writer.write(b"\x05\x00\x00\x00{bad")  # a header that is not JSON
  writer.write(b"\x01")  # too short for a header
  writer.close()
  src = sources.ArrayRecordSource(tmp_path / "d.array_record")
  prepare = pipeline.Prepare(tokenizer, pipeline.SimpleBuilder(tokenizer, 4), ((32, 32),))
  it = iter(pipeline.Pipeline([pipeline.Stream("t2i", src, 1.0)], prepare, seq_len=64, batch_size=1,
                              num_epochs=1))
  assert len(list(it)) == 1
  assert it.stats()["samples"] == 1 and it.stats()["skipped/bad_record"] == 2


def test_manifests_in_reference_layouts_become_canonical_records(tmp_path):
  rows = {
      "mmu": {"id": "q1", "image": "a.png", "conversations": [
          {"from": "human", "value": "<image>\nwhat color is the circle ?"}, {"from": "gpt", "value": "red"}]},
      "edit": {"source_image": "a.png", "target_image": "b.png", "instruction": "make it blue"},
      "text": {"text": "plain text"},
  }
  for stream, row in rows.items():
    (tmp_path / f"{stream}.jsonl").write_text(json.dumps(row) + "\n")
    rec = sources.ManifestSource(tmp_path / f"{stream}.jsonl", stream)[0]
    assert rec["stream"] == stream
  mmu = sources.ManifestSource(tmp_path / "mmu.jsonl", "mmu")[0]
  assert (mmu["id"], mmu["text"], mmu["answer"]) == ("q1", "what color is the circle ?", "red")
  assert mmu["images"] == [os.path.join(str(tmp_path), "a.png")]
  edit = sources.ManifestSource(tmp_path / "edit.jsonl", "edit")[0]
  assert [os.path.basename(p) for p in edit["images"]] == ["a.png", "b.png"]


def test_folder_of_images_and_captions_pairs_by_name(tmp_path):
  _png(tmp_path / "b.png")
  _png(tmp_path / "a.jpg")
  (tmp_path / "b.txt").write_text("a red square\n")
  src = sources.FolderSource(tmp_path)
  assert [(os.path.basename(r["images"][0]), r["text"]) for r in src] == [("a.jpg", ""), ("b.png", "a red square")]


def test_images_load_from_paths_bytes_and_arrays_alike(tmp_path):
  _png(tmp_path / "a.png", size=(7, 5), color=(1, 2, 3))
  from_path = transforms.load_image(str(tmp_path / "a.png"))
  from_bytes = transforms.load_image((tmp_path / "a.png").read_bytes())
  assert from_path.shape == (5, 7, 3) and from_path.dtype == np.uint8 and (from_path == (1, 2, 3)).all()
  assert np.array_equal(from_path, from_bytes) and transforms.load_image(from_path) is from_path
  with pytest.raises(transforms.BadImage, match="bad_image"):
    transforms.load_image(np.zeros((4, 4), np.uint8))


def test_closest_aspect_bucket_and_center_crop():
  buckets = [(512, 512), (448, 576), (576, 448), (384, 672), (672, 384)]
  assert transforms.pick_bucket(300, 600, buckets) == (384, 672)
  assert transforms.pick_bucket(600, 590, buckets) == (512, 512)
  img = np.zeros((30, 90, 3), np.uint8)
  img[:, 30:60] = 255  # white middle third survives a centre crop to a square
  out = transforms.prepare_image(img, [(16, 16), (16, 32)])
  assert out.shape == (16, 32, 3) and out.dtype == np.float32
  sq = transforms.prepare_image(img, [(20, 20)])
  assert sq.shape == (20, 20, 3) and sq[:, 2:-2].min() > 0.99  # only the white third is left
  flat = transforms.resize(np.full((37, 53, 3), 77, np.uint8), 11, 19)
  np.testing.assert_allclose(flat, 77, atol=1e-3)  # the filter weights sum to one
  assert transforms.to_uint8(transforms.normalize(img)).tolist() == img.tolist()


def test_shapes_tokenizer_knows_every_shapes_word_and_round_trips(tokenizer):
  unk = tokenizer.unk_token_id
  for stream in shapes.STREAMS:
    for i in range(100):
      r = shapes.shapes_record(stream, i)
      for text in (r["text"], r["answer"]):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert unk not in ids, text
        assert tokenizer.decode(ids) == text
  assert shapes_tokenizer().get_vocab() == tokenizer.get_vocab()  # same ids on every build
  chat = tokenizer.apply_chat_template([{"role": "user", "content": "how many objects are there ?"}],
                                       add_generation_prompt=True, tokenize=False)
  assert chat == "<|im_start|>user\nhow many objects are there ?<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_resume(tokenizer):
  from absl import flags

  flags.FLAGS.mark_as_parsed()
  threads, procs = iter(_pipe(tokenizer, window=8)), _pipe(tokenizer, window=8, worker_count=2)
  it = iter(procs)
  for _ in range(4):
    _same(next(it), next(threads))
  state = json.loads(json.dumps(it.get_state()))
  want = [next(it) for _ in range(2)]
  resumed = iter(procs)
  resumed.set_state(state)
  for w in want:
    _same(next(resumed), w)
  for x in (threads, it, resumed):  # worker processes end with their iterators, not at interpreter exit
    x.close()
  with pytest.raises(ValueError, match="closed"):
    next(it)


def test_understanding_prompt_can_go_through_the_chat_template(tokenizer):
  record = {**shapes.shapes_record("mmu", 0), "turns": []}  # one question
  plain = pipeline.Prepare(tokenizer, pipeline.SimpleBuilder(tokenizer, 4), ((32, 32),)).example(record)
  chat = pipeline.Prepare(tokenizer, pipeline.SimpleBuilder(tokenizer, 4), ((32, 32),), chat_template=True)
  ex = chat.example(record)
  ids = tokenizer.convert_tokens_to_ids
  head, tail = ids(["<|im_start|>", "user", "\n"]), ids(["<|im_end|>", "\n", "<|im_start|>", "assistant", "\n"])
  assert ex["text_ids"].tolist() == head + plain["text_ids"].tolist() + tail
  assert tokenizer.decode(plain["text_ids"]) == record["text"]
  assert tokenizer.decode(ex["answer_ids"]) == record["answer"]
  assert not ex["text_loss"].any() and not plain["text_loss"].any()


def _marked(tokenizer, ids, loss):
  """The text of the tokens with the loss, one string per run."""
  runs, cur = [], []
  for i, m in zip(ids.tolist(), loss.tolist()):
    if m:
      cur.append(i)
    elif cur:
      runs, cur = runs + [cur], []
  return [tokenizer.decode(r) for r in runs + ([cur] if cur else [])]


def test_every_answer_of_a_conversation_carries_the_loss(tokenizer):
  record = next(r for r in map(functools.partial(shapes.shapes_record, "mmu"), range(100)) if len(r["turns"]) >= 4)
  types = json.loads(record["meta"])["qa_types"]
  assert len(types) == len(record["turns"]) // 2 + 1 == len(set(types)) <= shapes.QA_TURNS
  questions, answers = record["turns"][0::2], record["turns"][1::2]
  ex = pipeline.Prepare(tokenizer, pipeline.SimpleBuilder(tokenizer, 4), ((32, 32),)).example(record)
  eos = tokenizer.eos_token
  history = " ".join(f"{q} {a} {eos}" for q, a in zip(questions, answers))
  assert tokenizer.decode(ex["text_ids"], skip_special_tokens=False) == f"{history} {record['text']}"
  assert _marked(tokenizer, ex["text_ids"], ex["text_loss"]) == [f"{a} {eos}" for a in answers]
  chat = pipeline.Prepare(tokenizer, pipeline.SimpleBuilder(tokenizer, 4), ((32, 32),), chat_template=True).example(record)
  msgs = [{"role": ("user", "assistant")[n % 2], "content": t} for n, t in enumerate([*record["turns"], record["text"]])]
  want = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"]
  assert chat["text_ids"].tolist() == list(want)
  assert _marked(tokenizer, chat["text_ids"], chat["text_loss"]) == [f"{a} <|im_end|> \n" for a in answers]
  # the TUNA sample labels exactly those answers and the final one
  sample = TunaBuilder(ts.TunaTokens.from_tokenizer(tokenizer), 8, 3)(ex)
  labelled = sample["labels"] != schema.IGNORE
  assert np.array_equal(sample["labels"][labelled], sample["input_ids"][labelled])
  assert _marked(tokenizer, sample["input_ids"], labelled) == [f"{a} {eos}" for a in [*answers, record["answer"]]]


def test_caption_dropout_empties_t2i_captions_and_edit_instructions_only(tokenizer):
  """Guidance's null branches (an empty caption; the source with an empty instruction) must be trained."""
  tok = ts.TunaTokens.from_tokenizer(tokenizer)
  prepare = pipeline.Prepare(tokenizer, pipeline.SimpleBuilder(tokenizer, 4), ((32, 32),))
  builder, keep_all = TunaBuilder(tok, 8, 3, caption_dropout=0.1), TunaBuilder(tok, 8, 3, caption_dropout=0.0)
  dropped = {}
  for stream in ("t2i", "edit", "mmu", "text"):
    exs = [prepare.example(shapes.shapes_record(stream, i)) for i in range(400)]
    lengths = [len(builder(e)["input_ids"]) for e in exs]
    dropped[stream] = np.mean([n == len(keep_all(e)["input_ids"]) - len(e["text_ids"]) for n, e in zip(lengths, exs)])
    assert lengths == [len(builder(e)["input_ids"]) for e in exs]  # decided by the record id, not an rng
  assert 0.05 < dropped["t2i"] < 0.15 and 0.05 < dropped["edit"] < 0.15
  assert dropped["mmu"] == dropped["text"] == 0.0


def test_manifest_conversations_keep_earlier_turns_and_check_roles(tmp_path):
  conv = [{"from": "human", "value": "<image>\nwhat color is it ?"}, {"from": "gpt", "value": "red"},
          {"from": "human", "value": "where is it ?"}, {"from": "gpt", "value": "left"}]
  (tmp_path / "ok.jsonl").write_text(json.dumps({"image": "a.png", "conversations": conv}) + "\n")
  rec = sources.ManifestSource(tmp_path / "ok.jsonl", "mmu")[0]
  assert (rec["turns"], rec["text"], rec["answer"]) == (["what color is it ?", "red"], "where is it ?", "left")
  bad = conv[:1] + conv[2:]  # two user turns in a row
  (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "a.png", "conversations": bad}) + "\n")
  with pytest.raises(sources.RecordError, match=r"bad.jsonl:1: conversation turn 1 is from 'human'"):
    sources.canonical({"image": "a.png", "conversations": bad}, "mmu", rid=f"{tmp_path}/bad.jsonl:1")
  assert sources.decode_record(sources.encode_record(rec))["turns"] == rec["turns"]


def test_source_specs_pick_the_reader_and_name_the_key_at_fault(tmp_path):
  _png(tmp_path / "a.png")
  (tmp_path / "m.jsonl").write_text(json.dumps({"image": "a.png", "caption": "a red square"}) + "\n")
  (tmp_path / "a.txt").write_text("a red square")
  assert len(sources.from_spec(f"jsonl:{tmp_path / 'm.jsonl'}", "t2i")) == 1
  assert len(sources.from_spec(f"folder:{tmp_path}", "t2i")) == 1
  sources.write_array_record(tmp_path / "r.array_record", [shapes.shapes_record("mmu", i) for i in range(3)])
  assert len(sources.from_spec(f"array_record:{tmp_path}/*.array_record", "mmu")) == 3
  with pytest.raises(ValueError, match=r"config.data.sources.t2i='csv:x'"):
    sources.from_spec("csv:x", "t2i", key="config.data.sources.t2i")
  with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
    sources.from_spec(f"jsonl:{tmp_path / 'nowhere.jsonl'}", "t2i")
  with pytest.raises(FileNotFoundError, match=r"no file matches"):
    sources.from_spec(f"array_record:{tmp_path}/*.missing", "t2i")
  with pytest.raises(ValueError, match="tfds:NAME:SPLIT"):
    sources.from_spec("tfds:shapes", "t2i")


def test_shapes_dataset_refuses_images_past_the_models_position_tables():
  from configs import tuna_tiny
  from unimm_jax.data import tuna_data
  config = tuna_tiny.get_config("smoke")
  assert config.model.patch_positions == 2 and len(next(iter(tuna_data.shapes_from_config(config, 2, 0, 1)))) > 0
  config.data.image_size = 64  # a 4x4 token grid at 16-px patches
  with pytest.raises(ValueError, match=r"data 'shapes_tuna': config.data.image_size 64 / config.model.patch 16: "
                                       r"an image of 4x4 tokens is larger than TunaConfig.patch_positions = 2"):
    tuna_data.shapes_from_config(config, 2, 0, 1)


def test_trainer_trains_tuna_on_manifests_and_logs_pipeline_counters(tmp_path):
  """`data.name = "tuna_streams"`: a user's JSONL manifests (bad lines included) train the tiny TUNA; the
  pipeline's counters (skips by reason, packing efficiency) and the input wait land in the run's metrics."""
  from configs import tuna_tiny
  from unimm_jax.training import metrics, trainer

  rng = np.random.default_rng(0)
  t2i, mmu = [], []
  for i in range(6):
    scene = shapes.sample_scene(rng, "single")
    Image.fromarray(shapes.render(scene, 32)).save(tmp_path / f"{i}.png")
    t2i.append({"image": f"{i}.png", "caption": shapes.caption(scene, "single")})
    _, question, answer = shapes.sample_question(rng, scene)
    mmu.append({"image": f"{i}.png", "question": question, "answer": answer})
  t2i += [{"image": "missing.png", "caption": "a red circle"}, {"image": "0.png", "caption": ""}]
  for name, lines in (("t2i", t2i), ("mmu", mmu)):
    (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
  config = tuna_tiny.get_config("smoke")
  config.data.name = "tuna_streams"
  config.data.sources.t2i = f"jsonl:{tmp_path / 't2i.jsonl'}"
  config.data.sources.mmu = f"jsonl:{tmp_path / 'mmu.jsonl'}"
  config.steps, config.log_every, config.batch_size = 3, 1, 8
  config.data.warmup.steps = 2  # t2i alone (the config's warm-up weights) for steps 1-2, then both streams
  config.mesh.ici = (-1, 1, 1)  # data parallel over the tests' 8 CPU devices
  state = trainer.train(config, str(tmp_path / "run"))
  assert int(state.step) == 3
  logged = metrics.read_scalars(str(tmp_path / "run" / "events"))
  assert [logged["data/phase"][k] for k in (1, 2, 3)] == [0, 0, 1]
  assert "data/samples/mmu" not in {k for k, v in logged.items() if 2 in v}
  last = {k: v[3] for k, v in logged.items() if 3 in v}
  assert last["data/skipped/missing_file"] >= 1 and last["data/skipped/empty_text"] >= 1
  assert last["data/samples/t2i"] > 0 and last["data/samples/mmu"] > 0 and "data/samples/edit" not in last
  assert 0 < last["data/efficiency"] <= 1 and 0 <= last["perf/input_wait"] < 1
  assert np.isfinite(last["loss"])

  config.data.sources.edit = "jsonl:/nowhere/edit.jsonl"  # a data error the flags made: ConfigError, one line
  with pytest.raises(trainer.ConfigError, match=r"config.data.sources.edit=.*/nowhere/edit.jsonl"):
    trainer.train(config, str(tmp_path / "run2"))
  config.data.weights.edit = 0.0
  with pytest.raises(ValueError, match=r"no positive weight for \['edit'\]"):
    trainer.train(config, str(tmp_path / "run3"))
  config.data.sources.edit, config.data.warmup.weights.edit = "", 1.0
  with pytest.raises(ValueError, match=r"config.data.warmup.weights .* not streams: \['edit'\]"):
    trainer.train(config, str(tmp_path / "run4"))
  # the space is checked before any source or tokenizer is opened: this tokenizer does not exist
  config.data.warmup.weights.edit, config.model.space, config.data.tokenizer = 0.0, "latent", "/nowhere/tokenizer"
  with pytest.raises(ValueError, match=r"data 'tuna_streams' feeds pixel-space TUNA; config.model.space is 'latent'"):
    trainer.train(config, str(tmp_path / "run5"))
