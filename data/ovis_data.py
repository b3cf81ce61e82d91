"""Ovis-U1 training batches over a record stream (data/README.md raw records): text-to-image examples for the
decoder stages, edit examples for the edit stage and single-turn understanding examples for the understanding
stage (training/ovis_u1_task.py).

Prompts are the release's (sampling/ovis_u1.py, the Qwen3ConversationFormatter): text-to-image the describe-prefixed
caption with no assistant turn and the white image of the output size through the visual tokenizer (as
test_txt_to_img.py feeds it), next to the null prompt "Generate an image." with the same image (condition dropout
picks one of the two inside the step); edit the instruction with the source canvas, and the null prompt with the
same canvas (EditExamples); understanding the image, the question and the empty-think assistant prefill,
then the answer and <|im_end|> as the targets (an mmu record's last turn: earlier turns are not used).
Each image's `<image>` is expanded to its visual-token count; ids are right-padded to data.seq_len (the LLM is
causal, so the padding after the prompt changes nothing before it; txt_mask keeps it out of the decoder's
condition).

Each example's image sits alone in its own vision row of exactly its patches (every image of a stream has one
size: the output canvas for text-to-image, the edit canvas for edits, the record size for understanding), so the
vision arrays have the example axis first and split over devices and microbatches with the rest of the batch:
  patches [l P], positions [l 2], frame_sizes [l 2], frame_ids [l], window_ids [l] (data/qwen_vl.pack_vision of
  one image), vision_tokens [k]: each visual token's index in its row's merged output (the window order undone);
  the step adds the row offsets (`vision_inputs`).
Images (the targets) and an edit's source are [H W 3] float32 in [-1, 1]; the frozen VAE encodes them inside the
step.
Record i is a pure function of (seed, i): a resumed run reads the same batches.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np

from unimm_jax.data import shapes
from unimm_jax.data.qwen_vl import pack_vision
from unimm_jax.models import ovis_u1
from unimm_jax.sampling import ovis_u1 as S
from unimm_jax.sampling import vlm
from unimm_jax.schema import IGNORE

VISION_KEYS = ("patches", "positions", "frame_sizes", "frame_ids", "window_ids", "vision_tokens")


def vision_row(image: np.ndarray, processor: S.OvisImageProcessor, cfg: ovis_u1.OvisU1Config
               ) -> dict[str, np.ndarray]:
  """uint8 [H W 3] -> the VISION_KEYS arrays of the image alone in one row of its own patch count."""
  patches, grid = processor(np.asarray(image, np.uint8))
  packing = pack_vision([grid], merge=cfg.vision.merge, window=cfg.vision.window, seq_len=grid[1] * grid[2])
  return {"patches": packing.rows(patches)[0], "positions": packing.positions[0],
          "frame_sizes": packing.frame_sizes[0], "frame_ids": packing.frame_ids[0],
          "window_ids": packing.window_ids[0], "vision_tokens": packing.merged.astype(np.int32)}


def vision_inputs(batch: Any, cfg: ovis_u1.OvisU1Config) -> ovis_u1.VisionInputs:
  """A batch's per-example vision rows -> VisionInputs of the b rows, each visual token's index offset to its
  row (row i holds l / m merged tokens), so the placeholders of row i take row i's visual embeddings."""
  b, length = batch["patches"].shape[:2]
  per_row = length // cfg.merge_tokens
  tokens = batch["vision_tokens"] + per_row * jnp.arange(b, dtype=jnp.int32)[:, None]
  return ovis_u1.VisionInputs(batch["patches"], batch["positions"], batch["frame_sizes"], batch["frame_ids"],
                              batch["window_ids"], tokens.reshape(-1))


def _pad(ids: list[int], seq_len: int, pad_id: int, where: str) -> tuple[np.ndarray, np.ndarray]:
  if len(ids) > seq_len:
    raise ValueError(f"{where}: {len(ids)} prompt tokens (with the visual tokens), more than data.seq_len {seq_len}")
  row, mask = np.full(seq_len, pad_id, np.int32), np.zeros(seq_len, np.int32)
  row[:len(ids)], mask[:len(ids)] = ids, 1
  return row, mask


def generation_ids(tokenizer: Any, text: str, count: int, seq_len: int, where: str) -> tuple[np.ndarray, np.ndarray]:
  """A generation prompt with one image of `count` visual tokens -> (ids, mask) right-padded to seq_len."""
  ids = vlm.expand_placeholders(S.prompt_ids(tokenizer, text, answer=False), ovis_u1.IMAGE_ATOM_ID, [count], where)
  return _pad(ids, seq_len, tokenizer.pad_token_id or 0, where)


@dataclasses.dataclass(frozen=True)
class T2IExamples:
  """grain random-access source: `t2i` records (text, one image) as decoder-stage examples at image_size."""

  source: Any
  tokenizer: Any
  cfg: ovis_u1.OvisU1Config
  processor: S.OvisImageProcessor
  seq_len: int
  image_size: int

  def __len__(self) -> int:
    return len(self.source)

  @functools.cached_property
  def _blank(self) -> dict[str, Any]:
    """The white canvas's vision row and visual-token count, and the null prompt: the same for every record."""
    row = vision_row(S.tokenizer_image(S.blank(self.image_size, self.image_size), self.processor), self.processor,
                     self.cfg)
    count = len(row["vision_tokens"])
    null = generation_ids(self.tokenizer, S.UNCOND, count, self.seq_len, "ovis data: the null prompt")
    return {"row": row, "count": count, "null": null}

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    record = self.source[index]
    image = np.asarray(record["images"][0])
    if image.shape != (self.image_size, self.image_size, 3):
      raise ValueError(f"ovis data: record {index} ({record.get('id')}) has a {image.shape} image, expected "
                       f"[{self.image_size} {self.image_size} 3] (data.image_size)")
    blank = self._blank
    ids, mask = generation_ids(self.tokenizer, S.T2I.format(record["text"]), blank["count"], self.seq_len,
                               f"ovis data: record {index}")
    null_ids, null_mask = blank["null"]
    return {"input_ids": ids, "txt_mask": mask, "null_ids": null_ids, "null_mask": null_mask,
            "images": image.astype(np.float32) / 127.5 - 1, **blank["row"]}


@dataclasses.dataclass(frozen=True)
class EditExamples:
  """grain random-access source: `edit` records (instruction, source and target images) as edit-stage examples:
  test_img_edit.py's canvas (smart_resize(h, w, factor 32) of the source, cover-cropped) through the visual
  tokenizer with the instruction, the null prompt with the same canvas (the image-only guidance branch: condition
  dropout drops the instruction, not the image), the canvas as the VAE condition (`source`) and the target
  cover-cropped to the canvas (`images`), both [H W 3] in [-1, 1]."""

  source: Any
  tokenizer: Any
  cfg: ovis_u1.OvisU1Config
  processor: S.OvisImageProcessor
  seq_len: int

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    record = self.source[index]
    where = f"ovis data: record {index} ({record.get('id')})"
    if len(record["images"]) != 2:
      raise ValueError(f"{where}: {len(record['images'])} images, an edit record has (source, target)")
    src, tgt = (np.asarray(i, np.uint8) for i in record["images"])
    size = S.smart_resize(*src.shape[:2], factor=S.EDIT_FACTOR)
    canvas = S.cover_crop(S.resize(src, *size), *size)
    target = S.cover_crop(tgt, *size)
    row = vision_row(S.tokenizer_image(canvas, self.processor), self.processor, self.cfg)
    count = len(row["vision_tokens"])
    ids, mask = generation_ids(self.tokenizer, S.EDIT.format(record["text"].strip()), count, self.seq_len, where)
    null_ids, null_mask = generation_ids(self.tokenizer, S.UNCOND, count, self.seq_len, where)
    return {"input_ids": ids, "txt_mask": mask, "null_ids": null_ids, "null_mask": null_mask,
            "source": S.vae_pixels(canvas)[0], "images": target.astype(np.float32) / 127.5 - 1, **row}


@dataclasses.dataclass(frozen=True)
class UnderstandingExamples:
  """grain random-access source: `mmu` records (one image, the last question and its answer) as
  understanding-stage examples: input_ids, labels (IGNORE on the prompt and the padding) and the vision row."""

  source: Any
  tokenizer: Any
  cfg: ovis_u1.OvisU1Config
  processor: S.OvisImageProcessor
  seq_len: int

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    record = self.source[index]
    where = f"ovis data: record {index} ({record.get('id')})"
    if len(record["images"]) != 1:
      raise ValueError(f"{where}: {len(record['images'])} images, the understanding stream takes one")
    row = vision_row(np.asarray(record["images"][0]), self.processor, self.cfg)
    prompt = vlm.expand_placeholders(S.prompt_ids(self.tokenizer, S.EDIT.format(record["text"]), answer=True),
                                     ovis_u1.IMAGE_ATOM_ID, [len(row["vision_tokens"])], where)
    end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
    answer = list(self.tokenizer(record["answer"], add_special_tokens=False)["input_ids"]) + [end]
    ids, mask = _pad(prompt + answer, self.seq_len, self.tokenizer.pad_token_id or 0, where)
    labels = np.where(mask.astype(bool), ids, IGNORE).astype(np.int32)
    labels[:len(prompt)] = IGNORE
    return {"input_ids": ids, "labels": labels, **row}


def shapes_from_config(config: Any, batch_per_process: int, process_index: int, process_count: int
                       ) -> grain.IterDataset:
  """DATASETS["shapes_ovis"]: the shapes world's t2i stream (decoder stages), edit stream (config.stage "edit")
  or mmu stream ("understanding") at data.image_size, shuffled, endless."""
  from unimm_jax.data.tokenizer import shapes_tokenizer  # builds the tokenizer offline, in memory
  d = config.data
  cfg = ovis_u1.OvisU1Config.from_dict(config.model.to_dict())
  tokenizer = shapes_tokenizer()
  if len(tokenizer) > cfg.llm.vocab:
    raise ValueError(f"shapes_ovis: the shapes tokenizer has {len(tokenizer)} ids, more than config.model.llm.vocab "
                     f"{cfg.llm.vocab}")
  processor = S.OvisImageProcessor(patch=cfg.vision.patch, merge=cfg.vision.merge, min_pixels=int(d.min_pixels),
                                   max_pixels=int(d.max_pixels))
  size, seq_len = int(d.image_size), int(d.seq_len)
  stage = str(config.stage)
  if stage == "understanding":
    items = UnderstandingExamples(shapes.ShapesSource("mmu", int(d.num_records), size=size, seed=int(d.seed)),
                                  tokenizer, cfg, processor, seq_len)
  elif stage == "edit":
    items = EditExamples(shapes.ShapesSource("edit", int(d.num_records), size=size, seed=int(d.seed)), tokenizer,
                         cfg, processor, seq_len)
  else:
    items = T2IExamples(shapes.ShapesSource("t2i", int(d.num_records), size=size, seed=int(d.seed)), tokenizer,
                        cfg, processor, seq_len, size)
  ds = grain.MapDataset.source(items).shuffle(seed=int(d.seed)).repeat(None)
  return ds.batch(batch_per_process, drop_remainder=True)[process_index::process_count].to_iter_dataset()


def example_batch(items: Any, indices: Sequence[int]) -> dict[str, jax.Array]:
  """Records `indices` of an examples source stacked into one batch."""
  rows = [items[i] for i in indices]
  return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
