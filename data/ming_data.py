"""Ming-Lite-Uni text-to-image batches: a caption stream -> the generation prompt, its M-RoPE positions, the query
slots and the target image.

The prompt is the release's (process.py, models/ming.prompt_ids: the chat pieces tokenised one by one) with the
`<image>` generation prefix expanded into the three query blocks (models/ming.expand_generation), right-padded to
`seq_len` with the tokenizer's pad id: the LLM is causal and the query blocks end the prompt, so the padding after
them changes nothing the queries see. Images are [S S 3] float32 in [-1, 1]; the frozen DC-AE encodes them inside
the step. Condition dropout (the CFG branch) is drawn in the step too, so record i is a pure function of
(seed, i) and a resumed run reads the same batches.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np

from unimm_jax.data import shapes
from unimm_jax.models import ming


@dataclasses.dataclass(frozen=True)
class T2IPrompts:
  """grain random-access source: the records of `source` (with "text" and "images") as Ming training examples."""

  source: Any
  tokenizer: Any
  cfg: ming.MingConfig
  seq_len: int

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    record = self.source[index]
    cfg = self.cfg
    # the processor's `<image>` prefix is one added token; a tokenizer without it (the shapes world's) gets its id
    ids = ming.prompt_ids(self.tokenizer, record["text"], generate=False) + [cfg.image_start_token_id]
    ids = ming.expand_generation(ids, cfg)
    if len(ids) > self.seq_len:
      raise ValueError(f"ming data: record {index} ({record.get('id')}) has {len(ids)} prompt tokens with the "
                       f"{cfg.queries} query slots, more than data.seq_len {self.seq_len}")
    row = np.full((1, self.seq_len), self.tokenizer.pad_token_id or 0, np.int32)
    row[0, :len(ids)] = ids
    kw = ming.prepare(row, cfg)
    image = np.asarray(record["images"][0], np.float32) / 127.5 - 1
    return {"input_ids": row[0], "positions": np.asarray(kw["positions"][0]),
            "query_index": np.asarray(kw["query_index"][0]), "images": image}


def shapes_from_config(config: Any, batch_per_process: int, process_index: int, process_count: int
                       ) -> grain.IterDataset:
  """DATASETS["shapes_ming"]: the shapes world's t2i stream at data.image_size, shuffled, endless."""
  from unimm_jax.data.tokenizer import shapes_tokenizer  # builds the tokenizer offline, in memory
  d = config.data
  cfg = ming.MingConfig.from_dict(config.model.to_dict())
  tokenizer = shapes_tokenizer()
  if len(tokenizer) > cfg.text.vocab:
    raise ValueError(f"shapes_ming: the shapes tokenizer has {len(tokenizer)} ids, more than config.model.text.vocab "
                     f"{cfg.text.vocab}")
  src = shapes.ShapesSource("t2i", int(d.num_records), size=int(d.image_size), seed=int(d.seed))
  items = T2IPrompts(src, tokenizer, cfg, int(d.seq_len))
  ds = grain.MapDataset.source(items).shuffle(seed=int(d.seed)).repeat(None)
  return ds.batch(batch_per_process, drop_remainder=True)[process_index::process_count].to_iter_dataset()
