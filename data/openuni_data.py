"""OpenUni text-to-image batches: a caption stream -> the original's prompt ids, mask and target images.

As src/datasets (text2image) + collate_func_gen of wusize/OpenUni: the caption becomes
`INSTRUCTION.format(input="Generate an image: " + caption) + "<img>"`, replaced by the CFG prompt
`INSTRUCTION.format(input="Generate an image.") + "<img>"` with probability `caption_dropout` (`unconditional=0.1`),
right-padded with 0 to `seq_len`; images are [S S 3] float32 in [-1, 1] (2 * x / 255 - 1). DC-AE latents are
computed from them inside the step (the autoencoder is frozen), so any image stream serves.
Record i of the stream is a pure function of (seed, i): a resumed run reads the same batches.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np

from unimm_jax.data import shapes
from unimm_jax.data.tokenizer import shapes_tokenizer
from unimm_jax.sampling import openuni as ou


@dataclasses.dataclass(frozen=True)
class T2IPrompts:
  """grain random-access source: the `t2i` records of `source` as OpenUni training examples."""

  source: Any                 # random access to raw records with "text" and "images" (data/README.md)
  tokenizer: Any
  seq_len: int
  caption_dropout: float = 0.1
  seed: int = 0

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    record = self.source[index]
    drop = np.random.default_rng((self.seed, int(index))).random() < self.caption_dropout
    text = ou.cfg_prompt() if drop else ou.t2i_prompt(record["text"])
    ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
    if len(ids) > self.seq_len:
      raise ValueError(f"openuni data: record {index} ({record.get('id')}) has {len(ids)} prompt tokens, more than "
                       f"data.seq_len {self.seq_len}")
    out_ids = np.zeros(self.seq_len, np.int32)
    mask = np.zeros(self.seq_len, np.int32)
    out_ids[:len(ids)], mask[:len(ids)] = ids, 1
    image = np.asarray(record["images"][0], np.float32) / 127.5 - 1
    return {"input_ids": out_ids, "attention_mask": mask, "images": image}


def tokenizer() -> Any:
  """The shapes tokenizer with InternVL's image tokens `<img>`, `</img>`, `<IMG_CONTEXT>` added after its vocabulary:
  the prompts end in `<img>` and an edit's source image fills `<IMG_CONTEXT>` slots (the pipeline checks that id
  against the model's image_token_id)."""
  tok = shapes_tokenizer()
  tok.add_tokens([ou.START, ou.END, ou.CONTEXT], special_tokens=True)
  return tok


def image_token_id() -> int:
  """`<IMG_CONTEXT>` of `tokenizer()`: the tiny config's image_token_id."""
  return tokenizer().convert_tokens_to_ids(ou.CONTEXT)


def shapes_from_config(config: Any, batch_per_process: int, process_index: int, process_count: int
                       ) -> grain.IterDataset:
  """DATASETS["shapes_openuni"]: the shapes world's t2i stream at data.image_size, shuffled, endless."""
  d = config.data
  src = shapes.ShapesSource("t2i", int(d.num_records), size=int(d.image_size), seed=int(d.seed))
  items = T2IPrompts(src, tokenizer(), int(d.seq_len), float(d.caption_dropout), int(d.seed))
  ds = grain.MapDataset.source(items).shuffle(seed=int(d.seed)).repeat(None)
  return ds.batch(batch_per_process, drop_remainder=True)[process_index::process_count].to_iter_dataset()
