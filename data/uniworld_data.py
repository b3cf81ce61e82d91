"""UniWorld-V1 denoiser training batches: text-to-image and edit records -> the prompt of the original's
training data, the reference image for Qwen2.5-VL and SigLIP, the target image and its region weights.

Reference: PKU-YuanGroup/UniWorld-V1 univa/dataset/qwen2vl_dataset.py (getitem, _load_image), univa/utils/prompter.py
(Qwen2VLPrompter.get_train_prompt), univa/utils/get_mask.py (get_weight_mask, get_weight).

Prompt (get_train_prompt of [user: instruction + <image>, assistant: <generated image>], each piece tokenised on
its own as the original does): `<|im_start|>user\\n{instruction}{image}<|im_end|>`, `\\n`,
`<|im_start|>assistant\\n`, `<|vision_start|>` (the generated-image token and its `<|im_end|>` replaced by the
image-begin token), where {image} = `<|vision_start|><|image_pad|> x n<|vision_end|>` for an edit. Rows are
left-padded to `seq_len` (dataset_config.padding_side "left").

Region weights (mask_weight_type, get_weight_mask): for an edit, the pixels where the reference and the target
differ (L of |ref - tgt| >= 18), holes closed (5x5 elliptic closing), components under 30% of the changed area
dropped, max-pooled to the latent grid, closed again; weight log2(cells / changed cells) + 1 ("log") or
2^(sqrt(cells / changed) - 1) ("exp") on the changed cells, 1 elsewhere. A text-to-image record (or an edit that
changes nothing, the original's reconstruction data) weighs 1 everywhere. Our reading: the original draws the mask on
the images as Qwen2.5-VL's processor resized them and nearest-resizes it to the VAE latents; here the images are
already at the VAE's size, so the mask is drawn there and pooled by the VAE's factor (the original's 8 is FLUX's).

Record keys (k = merged VLM tokens of the reference, K = SigLIP tokens, L = seq_len + K):
  input_ids [seq_len] int32, attention_mask [seq_len] int32, positions [seq_len 3] int32 (M-RoPE; 0 on padding),
  vlm_patches [k*m^2 P] float32 (zeros without a reference), has_ref [] bool,
  siglip_pixels [s s 3] float32 (zeros without a reference),
  insertion_index [L] int32 into [seq_len text rows; K SigLIP rows; 1 zero row], insertion_mask [L] int32,
  images [S S 3] float32 in [-1, 1] (the target), weights [S/f S/f] float32.
Everything is a pure function of (seed, index): a resumed run reads the same batches.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np
from PIL import Image, ImageChops
from scipy import ndimage

from unimm_jax.data import shapes
from unimm_jax.data.qwen_vl import QwenVLImageProcessor
from unimm_jax.models import qwen_vl, uniworld
from unimm_jax.sampling.uniworld import siglip_pixels

DIFF_THRESHOLD = 18          # get_weight_mask: get_mask(ref, target, threshold=18)
KEEP_COMPONENTS = 0.3        # filter_small_components(area_threshold=0.3), relative to the changed area
MIN_AREA = 0.001             # area_threshold: a smaller, non-empty changed area is refused
# cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)): close_small_holes' kernel
ELLIPSE_5 = np.array([[0, 0, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 0, 0]], bool)
WEIGHT_TYPES = ("log", "exp")


def _morph(mask: np.ndarray, grow: bool) -> np.ndarray:
  """Binary dilation (grow) or erosion by ELLIPSE_5 with cv2's border: outside pixels never win."""
  r = ELLIPSE_5.shape[0] // 2
  padded = np.pad(mask, r, constant_values=not grow)
  h, w = mask.shape
  shifted = [padded[dy:dy + h, dx:dx + w] for dy, dx in zip(*np.nonzero(ELLIPSE_5))]
  return np.logical_or.reduce(shifted) if grow else np.logical_and.reduce(shifted)


def close_holes(mask: np.ndarray) -> np.ndarray:
  """close_small_holes: cv2.morphologyEx(MORPH_CLOSE) with the 5x5 ellipse = dilate, then erode."""
  return _morph(_morph(mask, True), False)


def changed_region(reference: np.ndarray, target: np.ndarray) -> np.ndarray:
  """uint8 RGB [H W 3] pair -> bool [H W]: get_mask (PIL's L of the absolute difference >= 18), closed, and the
  8-connected components of at least 30% of the changed area (filter_small_components)."""
  diff = ImageChops.difference(Image.fromarray(reference), Image.fromarray(target)).convert("L")
  mask = close_holes(np.asarray(diff) >= DIFF_THRESHOLD)
  labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
  if n == 0:
    return mask
  sizes = np.bincount(labels.reshape(-1), minlength=n + 1)
  keep = sizes >= KEEP_COMPONENTS * mask.sum()
  keep[0] = False
  return keep[labels]


def region_weights(reference: np.ndarray | None, target: np.ndarray, factor: int, weight_type: str = "log",
                   where: str = "") -> np.ndarray:
  """get_weight_mask + get_weight: the target image [H W 3] uint8 (and its reference, None for text-to-image) ->
  weights [H/f W/f] float32 on the latent grid of a VAE with spatial factor f."""
  if weight_type not in WEIGHT_TYPES:
    raise ValueError(f"mask_weight_type {weight_type!r} is not one of {WEIGHT_TYPES}")
  h, w = target.shape[:2]
  if h % factor or w % factor:
    raise ValueError(f"region_weights{where}: image {target.shape} is not a multiple of the VAE factor {factor}")
  mask = np.ones((h, w), bool) if reference is None else changed_region(reference, target)
  if reference is not None and reference.shape != target.shape:
    raise ValueError(f"region_weights{where}: reference {reference.shape} and target {target.shape} differ in size")
  ratio = mask.mean()
  if ratio == 0.0:
    mask = np.ones((h, w), bool)   # nothing changed: the original's reconstruction data, weighed evenly
  elif ratio < MIN_AREA:
    raise ValueError(f"region_weights{where}: the edited region is {ratio:.2e} of the image, under {MIN_AREA} "
                     "(get_weight_mask refuses such a pair)")
  pooled = close_holes(mask.reshape(h // factor, factor, w // factor, factor).any(axis=(1, 3)))
  # in float32 as get_weight's torch tensors, so the 6-decimal rounding lands where the original's does
  x = np.float32(pooled.size) / np.float32(pooled.sum())
  weight = np.log2(x) + np.float32(1) if weight_type == "log" else np.float32(2) ** (np.sqrt(x) - np.float32(1))
  return np.where(pooled, np.round(weight, 6), np.float32(1)).astype(np.float32)


def train_prompt_ids(tokenizer: Any, instruction: str, image_tokens: int | None) -> list[int]:
  """get_train_prompt's pieces for [user: instruction (+ one image of `image_tokens` merged tokens), assistant:
  the generated image], tokenised one by one and joined."""
  image = "" if image_tokens is None else "<|vision_start|>" + "<|image_pad|>" * image_tokens + "<|vision_end|>"
  pieces = (f"<|im_start|>user\n{instruction}{image}<|im_end|>", "\n", "<|im_start|>assistant\n", "<|vision_start|>")
  return [i for p in pieces for i in tokenizer(p, add_special_tokens=False)["input_ids"]]


def example_insertion(input_ids: np.ndarray, mask: np.ndarray, image_end_token_id: int, siglip_tokens: int
                      ) -> tuple[np.ndarray, np.ndarray]:
  """One left-padded row's `siglip_insertion` at the fixed length t + K: index [t + K] into [t text rows; K SigLIP
  rows; 1 zero row] (the SigLIP tokens before the row's `<|vision_end|>`, or none; padding dropped), left-padded
  with the zero row, and its mask (1 = a real token)."""
  t = len(input_ids)
  valid = np.flatnonzero(mask)
  ids = np.asarray(input_ids)[valid][None]
  images = int(np.sum(ids == image_end_token_id))
  if images > 1:
    raise ValueError(f"uniworld data: {images} <|vision_end|> tokens in one prompt; one reference image is supported")
  index = np.asarray(uniworld.siglip_insertion(ids, image_end_token_id, images, siglip_tokens).index[0])
  n = len(valid)
  mapped = np.where(index < n, valid[np.minimum(index, n - 1)], t + index - n)   # SigLIP rows follow the t text rows
  out, out_mask = np.full(t + siglip_tokens, t + siglip_tokens, np.int32), np.zeros(t + siglip_tokens, np.int32)
  out[len(out) - len(mapped):], out_mask[len(out) - len(mapped):] = mapped, 1
  return out, out_mask


@dataclasses.dataclass(frozen=True)
class Examples:
  """grain random-access source: t2i and edit records of the shapes world, interleaved by `edit_fraction`."""

  t2i: Any
  edit: Any
  tokenizer: Any
  cfg: uniworld.UniWorldConfig
  processor: QwenVLImageProcessor
  seq_len: int
  vae_factor: int
  edit_fraction: float = 0.5
  weight_type: str = "log"
  seed: int = 0

  def __len__(self) -> int:
    return len(self.t2i) + len(self.edit)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng((self.seed, int(index)))
    is_edit = rng.random() < self.edit_fraction
    src = self.edit if is_edit else self.t2i
    record = src[int(index) % len(src)]
    where = f" (record {record.get('id')})"
    cfg, side = self.cfg, self.cfg.siglip.posemb_grid * self.cfg.siglip.patch
    target = np.asarray(record["images"][-1])
    reference = np.asarray(record["images"][0]) if is_edit else None
    # every record carries patches of one image so that batches have one shape; text-to-image ones are zeros
    patches, grid = self.processor(target if reference is None else reference)
    merged = grid[1] * grid[2] // cfg.vlm.vision.merge ** 2
    ids = train_prompt_ids(self.tokenizer, record["text"], merged if is_edit else None)
    if len(ids) > self.seq_len:
      raise ValueError(f"uniworld data{where}: {len(ids)} prompt tokens, more than data.seq_len {self.seq_len}")
    row = np.full((1, self.seq_len), self.tokenizer.pad_token_id or 0, np.int32)
    mask = np.zeros((1, self.seq_len), np.int32)
    row[0, self.seq_len - len(ids):], mask[0, self.seq_len - len(ids):] = ids, 1
    positions, _ = qwen_vl.rope_index(row, cfg.vlm, [grid] if is_edit else [], mask=mask)
    index_, ins_mask = example_insertion(row[0], mask[0], cfg.image_end_token_id, cfg.siglip_tokens)
    return {"input_ids": row[0], "attention_mask": mask[0], "positions": positions[0].astype(np.int32),
            "vlm_patches": patches if is_edit else np.zeros_like(patches), "has_ref": np.bool_(is_edit),
            "siglip_pixels": (siglip_pixels(reference, (side, side)) if is_edit
                              else np.zeros((side, side, 3), np.float32)),
            "insertion_index": index_, "insertion_mask": ins_mask,
            "images": target.astype(np.float32) / 127.5 - 1,
            "weights": region_weights(reference, target, self.vae_factor, self.weight_type, where)}


def shapes_from_config(config: Any, batch_per_process: int, process_index: int, process_count: int
                       ) -> grain.IterDataset:
  """DATASETS["shapes_uniworld"]: the shapes world's t2i and edit streams at data.image_size, shuffled, endless."""
  from unimm_jax.data.tokenizer import shapes_tokenizer  # builds the tokenizer offline, in memory
  from unimm_jax.models import vae_kl
  d = config.data
  cfg = uniworld.UniWorldConfig.from_dict(config.model.to_dict())
  vae = vae_kl.AutoencoderKLConfig.from_dict(config.vae.to_dict())
  tokenizer = shapes_tokenizer()
  if len(tokenizer) > cfg.vlm.text.vocab:
    raise ValueError(f"shapes_uniworld: the shapes tokenizer has {len(tokenizer)} ids, more than "
                     f"config.model.vlm.text.vocab {cfg.vlm.text.vocab}")
  for name in ("vision_start_token_id", "vision_end_token_id", "image_token_id"):
    token = {"vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>",
             "image_token_id": "<|image_pad|>"}[name]
    if tokenizer.convert_tokens_to_ids(token) != getattr(cfg.vlm, name):
      raise ValueError(f"shapes_uniworld: config.model.vlm.{name} {getattr(cfg.vlm, name)} is not the shapes "
                       f"tokenizer's {token} id {tokenizer.convert_tokens_to_ids(token)}")
  size, n = int(d.image_size), int(d.num_records)
  pixels = int(d.vlm_pixels)
  items = Examples(shapes.ShapesSource("t2i", n, size=size, seed=int(d.seed)),
                   shapes.ShapesSource("edit", n, size=size, seed=int(d.seed)), tokenizer, cfg,
                   QwenVLImageProcessor(patch=cfg.vlm.vision.patch, merge=cfg.vlm.vision.merge, min_pixels=pixels,
                                        max_pixels=pixels), int(d.seq_len),
                   vae.spatial_downscale, float(d.edit_fraction), str(config.uniworld.mask_weight_type),
                   int(d.seed))
  ds = grain.MapDataset.source(items).shuffle(seed=int(d.seed)).repeat(None)
  return ds.batch(batch_per_process, drop_remainder=True)[process_index::process_count].to_iter_dataset()
