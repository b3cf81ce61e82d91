"""Vision-encoder speed: ours vs transformers in the same run, and packed vs padded NaFlex batches.

1. Fixed resolution: SigLIP so400m-shaped tower (width 1152, 16 heads, MLP 4304) at reduced depth,
   384px / patch 14 (729 tokens): images/s of our jitted forward vs transformers' SiglipVisionModel
   (eager, no_grad, SDPA). Both fp32 on the same weights (converted with our converter): a
   like-for-like comparison; bf16 on CPU mostly measures emulation, so it is opt-in (--bf16).
2. Mixed resolution: the SigLIP2 NaFlex tower (patch 16, 16x16 table) on images of random aspect
   ratios and patch budgets. Padded = one image per row of max_num_patches tokens (transformers'
   layout; transformers itself is timed on it too); packed = NaViT rows of the same length holding
   several images (segment ids). Packing should win by about the padding fraction.

3. InternViT-300M-shaped tower (width 1024, 16 heads, MLP 4096) at reduced depth on 448 px tiles (1025 tokens):
   images/s of our jitted forward vs transformers' InternVLVisionModel (SDPA), same weights, fp32.
4. Mixed-size images for InternVL: 4 images of random sizes and aspect ratios tile into 1..7 tiles each
   (dynamic tiling, at most 6 + thumbnail here; the release allows 12); image features (InternViT + pixel
   shuffle + projector) of all their tiles. Packed = every real tile in one batch (what the pipeline and transformers do); padded =
   each image's tiles padded to the largest count (a [b, max_tiles] layout).
5. Prefill + decode of an image question on an InternVL3-1B-shaped model at reduced depth (InternViT width 1024,
   Qwen2.5 width 896, vocabulary 151674): one tile (256 image tokens) + text, then --new_tokens greedy tokens;
   our jitted embed + KV-cached generate vs transformers' generate.
6. Qwen2.5-VL vision tower (width 1280, 16 heads, MLP 3420, merger to 3584, 112px windows, the last block
   full attention) at reduced depth: images/s of 448px images (1024 patches) vs transformers'
   Qwen2_5_VisionTransformerPretrainedModel (SDPA, per-window chunks); then a batch of mixed sizes,
   packed (rows as long as the largest image, several images a row) vs padded (one image a row).
7. Image question: a Qwen2.5-VL with that tower and a Qwen2.5-0.5B-shaped decoder (head_dim 64, so M-RoPE
   sections 8/12/12) at reduced depth,
   one 448px image + a short question: prefill (vision + prompt) and prefill + 32 greedy tokens, ours
   (jitted, KV cache) vs transformers' generate, tokens checked equal.

  python scripts/bench_vision.py             # every family, depth 2 (minutes on 2 CPU cores)
  python scripts/bench_vision.py --models internvl
  python scripts/bench_vision.py --models qwen_vl --depth 4   # only sections 6-7
  python scripts/bench_vision.py --tiny      # seconds; used by the smoke tests
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
import timeit

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from unimm_jax.convert.family import abstract_params
from unimm_jax.convert import engine, hf
from unimm_jax import registry
from unimm_jax.data import internvl as internvl_data
from unimm_jax.data import qwen_vl as data_vl
from unimm_jax.data import vision
from unimm_jax.models import internvit, internvl, qwen, qwen_vit, qwen_vl, siglip
from unimm_jax.sampling import generate_from_embeddings
from unimm_jax.sampling import internvl as internvl_chat
from unimm_jax.sampling import vlm

SIZES = {
    "so400m": dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16),
    "tiny": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4),
}


def race(fns: dict, repeats: int) -> dict[str, float]:
  """Best-of-`repeats` seconds per callable, the callables taking turns so load drift hits all alike."""
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      times[name].append(timeit.timeit(fn, number=1))
  return {name: min(t) for name, t in times.items()}


def ours_from(ref: torch.nn.Module, dtype: str = "float32"):
  """Our module and params for a transformers vision tower, through our converter."""
  fam = hf.family_for_model_type(ref.config.model_type, "bench")
  cfg = dataclasses.replace(siglip.config_from_hf(ref.config), dtype=dtype)
  state = {k: (lambda v=v: v.detach().numpy()) for k, v in ref.state_dict().items()}
  params = engine.convert(state, fam.rules(cfg), engine.flatten(abstract_params(fam, cfg)), ignore=fam.ignore(cfg))
  return siglip.VisionTransformer(cfg), jax.tree.map(jnp.asarray, engine.unflatten(params))


def mixed_batch(n: int, patch: int, max_patches: int, seed: int = 0) -> list[tuple[np.ndarray, tuple[int, int]]]:
  """n images of random aspect ratio (1:3 .. 3:1) and patch budget (1/8 .. 1 of max_patches), as patches."""
  rng = np.random.default_rng(seed)
  items = []
  for _ in range(n):
    aspect = float(np.exp(rng.uniform(-np.log(3), np.log(3))))
    budget = int(max_patches * rng.uniform(0.125, 1.0))
    h, w = vision.naflex_size(int(1000 * aspect), 1000, patch, budget)
    items.append((rng.normal(size=((h // patch) * (w // patch), patch * patch * 3)).astype(np.float32),
                  (h // patch, w // patch)))
  return items


def padded(items, length: int) -> dict[str, np.ndarray]:
  dim = items[0][0].shape[1]
  out = {"patches": np.zeros((len(items), length, dim), np.float32), "mask": np.zeros((len(items), length), np.int32),
         "spatial_shapes": np.asarray([hw for _, hw in items], np.int32)}
  for i, (p, _) in enumerate(items):
    out["patches"][i, : len(p)], out["mask"][i, : len(p)] = p, 1
  return out


def row(name: str, impl: str, shape: str, seconds: float, images: int) -> None:
  print(f"| {name:<24} | {impl:<28} | {shape:>12} | {seconds * 1e3:>9.1f} | {images / seconds:>8.2f} |")


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tiny", action="store_true", help="tiny widths and images (smoke test)")
  parser.add_argument("--models", default="siglip,internvl,qwen_vl", help="comma-separated: siglip, internvl, qwen_vl")
  parser.add_argument("--llm_depth", type=int, default=4, help="Qwen2.5-VL: decoder layers of the image-question model")
  parser.add_argument("--depth", type=int, default=2, help="encoder layers (so400m has 27, InternViT-300M 24)")
  parser.add_argument("--batch", type=int, default=4, help="images per fixed-resolution batch")
  parser.add_argument("--mixed", type=int, default=8, help="images in the mixed-resolution batch")
  parser.add_argument("--new_tokens", type=int, default=32, help="InternVL: tokens decoded after the image question")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--bf16", action="store_true", help="also time our forward with bf16 compute")
  args = parser.parse_args()
  models = args.models.split(",")
  if unknown := set(models) - {"siglip", "internvl", "qwen_vl"}:
    parser.error(f"--models: unknown {sorted(unknown)}; choose from siglip, internvl, qwen_vl")
  if args.tiny:
    args.batch, args.mixed, args.repeats, args.new_tokens = 2, 5, 1, 4
  torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(0)
  print(f"device {jax.devices()[0].platform} ({os.cpu_count()} cores); depth {args.depth}; best of {args.repeats}; "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), jax {jax.__version__}")
  print(f"| {'case':<24} | {'implementation':<28} | {'b x tokens':>12} | {'ms/batch':>9} | {'images/s':>8} |")
  print(f"|{'-' * 26}|{'-' * 30}|{'-' * 14}|{'-' * 11}|{'-' * 10}|")
  summary = []
  if "siglip" in models:
    summary += siglip_cases(args)
  if "internvl" in models:
    summary += internvl_cases(args)
  if "qwen_vl" in models:
    qwen_vl_sections(args)
  print("\n".join(summary))


def siglip_cases(args) -> list[str]:
  size = "tiny" if args.tiny else "so400m"
  image, patch, naflex_patch, max_patches = (32, 8, 8, 16) if args.tiny else (384, 14, 16, 576)
  # 1. Fixed resolution.
  ref = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
      **SIZES[size], num_hidden_layers=args.depth, image_size=image, patch_size=patch)).eval()
  pixels = np.random.default_rng(0).normal(size=(args.batch, image, image, 3)).astype(np.float32)
  pixels_t = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
  fns = {"transformers fp32 (eager)": lambda: ref(pixels_t)}
  for dtype in ("float32", "bfloat16") if args.bf16 else ("float32",):
    module, params = ours_from(ref, dtype)
    forward = jax.jit(lambda p, x, module=module: module.apply({"params": p}, x).last_hidden_state)
    x = jnp.asarray(pixels)
    got = forward(params, x).block_until_ready()  # compile
    name = f"unimm-jax {'fp32' if dtype == 'float32' else 'bf16'} (jit)"
    fns[name] = lambda forward=forward, params=params, x=x: forward(params, x).block_until_ready()
    if dtype == "float32":
      ours_fp32 = np.asarray(got)
  with torch.no_grad():
    diff = float(np.max(np.abs(ours_fp32 - ref(pixels_t).last_hidden_state.numpy())))  # also torch's warm-up
    fixed = race(fns, args.repeats)
  tokens = (image // patch) ** 2
  for name, t in fixed.items():
    row(f"fixed {image}px/p{patch}", name, f"{args.batch}x{tokens}", t, args.batch)

  # 2. Mixed resolution, NaFlex.
  ref2 = transformers.Siglip2VisionModel(transformers.Siglip2VisionConfig(
      **SIZES[size], num_hidden_layers=args.depth, patch_size=naflex_patch, num_patches=16 if args.tiny else 256)).eval()
  module2, params2 = ours_from(ref2)
  items = mixed_batch(args.mixed, naflex_patch, max_patches)
  real = sum(len(p) for p, _ in items)
  pad = padded(items, max_patches)
  rows, skipped = vision.pack_patches(items, max_patches, images_per_row=len(items))
  assert skipped == 0
  packed = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  fwd = jax.jit(lambda p, x, s, seg, pos: module2.apply(
      {"params": p}, patches=x, spatial_shapes=s, segment_ids=seg, positions=pos).last_hidden_state)
  pad_args = (jnp.asarray(pad["patches"]), jnp.asarray(pad["spatial_shapes"][:, None]), jnp.asarray(pad["mask"]), None)
  pack_args = tuple(jnp.asarray(packed[k]) for k in ("patches", "spatial_shapes", "segment_ids", "positions"))
  pt = {k: torch.from_numpy(v) for k, v in pad.items()}
  fns = {"transformers fp32 padded": lambda: ref2(pt["patches"], pt["mask"], pt["spatial_shapes"])}
  for name, a in (("padded", pad_args), ("packed", pack_args)):
    fwd(params2, *a).block_until_ready()  # compile
    fns[f"unimm-jax fp32 {name}"] = lambda a=a: fwd(params2, *a).block_until_ready()
  with torch.no_grad():
    fns["transformers fp32 padded"]()  # warm-up
    mixed = race(fns, args.repeats)
  shapes = {"transformers fp32 padded": pad_args[0].shape, "unimm-jax fp32 padded": pad_args[0].shape,
            "unimm-jax fp32 packed": pack_args[0].shape}
  for name, t in mixed.items():
    row(f"mixed {args.mixed} img NaFlex p{naflex_patch}", name, f"{shapes[name][0]}x{shapes[name][1]}", t,
        len(items))

  t_ref = fixed["transformers fp32 (eager)"]
  out = [f"SigLIP fixed resolution: unimm-jax fp32 / transformers fp32 images/s = "
         f"{t_ref / fixed['unimm-jax fp32 (jit)']:.2f}x (max |diff| of last_hidden_state {diff:.1e})"]
  if args.bf16:
    out.append(f"SigLIP fixed resolution: unimm-jax bf16 / transformers fp32 images/s = "
               f"{t_ref / fixed['unimm-jax bf16 (jit)']:.2f}x")
  out.append(f"SigLIP mixed resolution: packed / padded images/s = "
        f"{mixed['unimm-jax fp32 padded'] / mixed['unimm-jax fp32 packed']:.2f}x; padding fraction of the padded "
        f"batch {1 - real / (len(items) * max_patches):.0%}, of the packed rows {1 - real / packed['segment_ids'].size:.0%}; "
        f"unimm-jax padded / transformers padded = "
        f"{mixed['transformers fp32 padded'] / mixed['unimm-jax fp32 padded']:.2f}x")
  return out

def internvl_from(ref: torch.nn.Module):
  """Our InternVL and params for a transformers InternVLForConditionalGeneration, through our converter."""
  fam = hf.family_for_model_type("internvl", "bench")
  cfg = internvl.config_from_hf(ref.config.to_dict())
  state = hf._renamed({k: (lambda v=v: v.detach().numpy()) for k, v in ref.state_dict().items()},
                      fam.key_prefixes("internvl"))
  params = engine.convert(state, fam.rules(cfg), engine.flatten(abstract_params(fam, cfg)), ignore=fam.ignore(cfg))
  return internvl.InternVL(cfg), jax.tree.map(jnp.asarray, engine.unflatten(params))


def internvl_cases(args) -> list[str]:
  if args.tiny:
    vision = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, image_size=28, patch_size=7)
    text = dict(hidden_size=64, intermediate_size=112, num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
  else:
    vision = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, image_size=448, patch_size=14)
    text = dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
                vocab_size=151674)
  tile = vision["image_size"]
  ref = transformers.InternVLForConditionalGeneration(transformers.InternVLConfig(
      vision_config=dict(vision, num_hidden_layers=args.depth, attention_bias=True),
      text_config=dict(text, model_type="qwen2", num_hidden_layers=args.depth, rope_theta=1e6,
                       tie_word_embeddings=False),
      image_token_id=text["vocab_size"] - 1, tie_word_embeddings=False)).eval()
  module, params = internvl_from(ref)
  cfg = module.cfg
  tower = internvit.InternViT(cfg.vision)
  encode = jax.jit(lambda p, x: tower.apply({"params": p}, x).last_hidden_state)
  rng = np.random.default_rng(3)

  # 3. Fixed 448 px tiles.
  pixels = rng.normal(size=(args.batch, tile, tile, 3)).astype(np.float32)
  pixels_t = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
  got = np.asarray(encode(params["vision_tower"], jnp.asarray(pixels)))  # compile
  x = jnp.asarray(pixels)
  fns = {"transformers fp32 (SDPA)": lambda: ref.model.vision_tower(pixels_t),
         "unimm-jax fp32 (jit)": lambda: encode(params["vision_tower"], x).block_until_ready()}
  with torch.no_grad():
    diff = float(np.max(np.abs(got - ref.model.vision_tower(pixels_t).last_hidden_state.numpy())))
    fixed = race(fns, args.repeats)
  tokens = (tile // vision["patch_size"]) ** 2 + 1
  for name, t in fixed.items():
    row(f"InternViT {tile}px tiles", name, f"{args.batch}x{tokens}", t, args.batch)

  # 4. Mixed-size images -> tiles, packed vs padded.
  processor = internvl_data.TilingProcessor(tile=tile, max_tiles=6)   # 12 in the release; 6 keeps CPU runs short
  n_images = min(args.mixed, 4)
  sizes = [(int(rng.integers(tile // 4, 3 * tile)), int(rng.integers(tile // 4, 3 * tile))) for _ in range(n_images)]
  counts = [processor.num_tiles(h, w) for h, w in sizes]
  packed = rng.normal(size=(sum(counts), tile, tile, 3)).astype(np.float32)
  padded = np.zeros((len(counts) * max(counts), tile, tile, 3), np.float32)
  start = 0
  for i, n in enumerate(counts):
    padded[i * max(counts):i * max(counts) + n] = packed[start:start + n]
    start += n
  packed_t = torch.from_numpy(np.ascontiguousarray(packed.transpose(0, 3, 1, 2)))
  xs = {"packed": jnp.asarray(packed), "padded": jnp.asarray(padded)}
  features = lambda v: internvl_chat.tile_features(module, params, v).block_until_ready()  # noqa: E731
  for v in xs.values():
    features(v)  # compile
  fns = {"transformers fp32 packed": lambda: ref.model.get_image_features(pixel_values=packed_t),
         **{f"unimm-jax fp32 {k}": (lambda v=v: features(v)) for k, v in xs.items()}}
  with torch.no_grad():
    fns["transformers fp32 packed"]()  # warm-up
    mixed = race(fns, args.repeats)
  shapes = {"transformers fp32 packed": packed.shape, "unimm-jax fp32 packed": packed.shape,
            "unimm-jax fp32 padded": padded.shape}
  for name, t in mixed.items():
    row(f"InternVL mixed, {len(counts)} img", name, f"{shapes[name][0]}x{tokens}", t, len(counts))

  # 5. Prefill + decode of a question about one tile.
  k = cfg.tokens_per_tile
  prompt = rng.integers(0, 200, 12).tolist() + [cfg.image_token_id] * k + rng.integers(0, 200, 16).tolist()
  tile1, llm = jnp.asarray(packed[:1]), qwen.Qwen(cfg.llm)

  def ours():  # what InternVLChat.generate runs once the prompt is tokenized and the image tiled
    feats = internvl_chat.tile_features(module, params, tile1)
    return vlm.generate_with_images(llm, params["language_model"],
                                    lambda ids: internvl_chat.prompt_embeddings(module, params, jnp.asarray(ids), feats),
                                    [prompt], pad_id=0, max_new_tokens=args.new_tokens)
  ids_t = torch.tensor([prompt])
  pix_t = torch.from_numpy(np.ascontiguousarray(packed[:1].transpose(0, 3, 1, 2)))
  theirs = lambda: ref.generate(input_ids=ids_t, pixel_values=pix_t, max_new_tokens=args.new_tokens,  # noqa: E731
                                min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
  with torch.no_grad():
    want = theirs()[0, len(prompt):].tolist()  # also the warm-up
    same = ours().as_lists()[0] == want        # and our compile
    chat = race({"transformers fp32 generate": theirs, "unimm-jax fp32 generate": ours}, args.repeats)
  for name, t in chat.items():
    row(f"InternVL prefill+{args.new_tokens} tok", name, f"1x{len(prompt)}", t, 1)
  return [
      f"InternViT tiles: unimm-jax fp32 / transformers fp32 images/s = "
      f"{fixed['transformers fp32 (SDPA)'] / fixed['unimm-jax fp32 (jit)']:.2f}x (max |diff| {diff:.1e})",
      f"InternVL mixed sizes: packed / padded images/s = "
      f"{mixed['unimm-jax fp32 padded'] / mixed['unimm-jax fp32 packed']:.2f}x ({sum(counts)} real tiles of "
      f"{padded.shape[0]} padded); unimm-jax packed / transformers packed = "
      f"{mixed['transformers fp32 packed'] / mixed['unimm-jax fp32 packed']:.2f}x",
      f"InternVL image question: unimm-jax / transformers (prefill + {args.new_tokens} tokens) speed = "
      f"{chat['transformers fp32 generate'] / chat['unimm-jax fp32 generate']:.2f}x; greedy tokens identical: {same}",
  ]


QWEN_VIT = {"full": dict(hidden_size=1280, num_heads=16, intermediate_size=3420, out_hidden_size=3584),
            "tiny": dict(hidden_size=32, num_heads=4, intermediate_size=48, out_hidden_size=64)}
QWEN_LLM = {"full": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                         num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                                 "mrope_section": [8, 12, 12]}),  # head_dim 64
            "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=112, num_attention_heads=4,
                         num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                                 "mrope_section": [2, 3, 3]})}


def state_of(module: torch.nn.Module, rename=()) -> dict:
  import re
  out = {}
  for k, v in module.state_dict().items():
    for pattern, repl in rename:
      k = re.sub(pattern, repl, k)
    out[k] = lambda v=v: v.detach().numpy()
  return out


def padded_rows(grids, patches: np.ndarray, window: int, length: int) -> tuple:
  """One image a row, each padded to `length` tokens (what a batch without packing costs)."""
  rows, offset = [], 0
  for g in grids:
    n = int(np.prod(g))
    p = data_vl.pack_vision([g], merge=2, window=window, seq_len=length)
    rows.append((p.rows(patches[offset:offset + n]), p.positions, p.frame_ids, p.window_ids))
    offset += n
  return tuple(jnp.asarray(np.concatenate([r[i] for r in rows])) for i in range(4))


def qwen_vl_sections(args):
  size = "tiny" if args.tiny else "full"
  depth, repeats = (2, 1) if args.tiny else (args.depth, args.repeats)
  side, n_fixed, n_mixed, new_tokens = (56, 2, 4, 4) if args.tiny else (448, 2, 6, 32)
  vis_cfg = transformers.Qwen2_5_VLVisionConfig(**QWEN_VIT[size], depth=depth, fullatt_block_indexes=[depth - 1],
                                                window_size=112, patch_size=14, temporal_patch_size=2)
  torch.manual_seed(0)
  ref = transformers.Qwen2_5_VisionTransformerPretrainedModel(vis_cfg).eval()
  fam = registry.family("qwen_vit")
  cfg = qwen_vit.config_from_hf(vis_cfg.to_dict())
  params = jax.tree.map(jnp.asarray, engine.unflatten(engine.convert(
      state_of(ref), fam.rules(cfg), engine.flatten(abstract_params(fam, cfg)))))
  module = qwen_vit.QwenVisionTransformer(cfg)
  forward = jax.jit(lambda p, *a: module.apply({"params": p}, *a).pooler_output)
  print(f"\nQwen2.5-VL vision tower, {size} width, depth {depth} (block {depth - 1} full attention); best of "
        f"{repeats}")
  print(f"| {'case':<24} | {'implementation':<28} | {'rows x len':>12} | {'ms/batch':>9} | {'images/s':>8} |")
  print(f"|{'-' * 26}|{'-' * 30}|{'-' * 14}|{'-' * 11}|{'-' * 10}|")
  rng = np.random.default_rng(0)

  def run_case(name, grids, layouts):
    pv = rng.normal(size=(sum(int(np.prod(g)) for g in grids), cfg.patch_dim)).astype(np.float32)
    pv_t, grid_t = torch.from_numpy(pv), torch.tensor(grids)
    fns = {"transformers fp32 (eager)": lambda: ref(pv_t, grid_thw=grid_t)}
    shapes, outs = {"transformers fp32 (eager)": f"1x{len(pv)}"}, {}
    for layout, rows in layouts(grids, pv).items():
      outs[layout] = forward(params, *rows)                            # compile
      fns[f"unimm-jax fp32 {layout}"] = lambda rows=rows: forward(params, *rows).block_until_ready()
      shapes[f"unimm-jax fp32 {layout}"] = f"{rows[0].shape[0]}x{rows[0].shape[1]}"
    with torch.no_grad():
      want = fns["transformers fp32 (eager)"]().pooler_output.numpy()  # warm-up
      times = race(fns, repeats)
    for impl, t in times.items():
      row(name, impl, shapes[impl], t, len(grids))
    return times, want, outs, pv

  grid = (1, side // 14, side // 14)

  def fixed_layouts(grids, pv):
    p = data_vl.pack_vision(grids, merge=2, window=cfg.window, seq_len=int(np.prod(grid)))
    return {"(jit)": (jnp.asarray(p.rows(pv)), jnp.asarray(p.positions), jnp.asarray(p.frame_ids),
                      jnp.asarray(p.window_ids)), "_packing": p}

  def layouts_fixed(grids, pv):
    out = fixed_layouts(grids, pv)
    layouts_fixed.packing = out.pop("_packing")
    return out

  fixed, want, outs, _ = run_case(f"{n_fixed} img {side}px", [grid] * n_fixed, layouts_fixed)
  diff = float(np.max(np.abs(layouts_fixed.packing.unpack(np.asarray(outs["(jit)"])) - want)))

  sizes = []   # aspect ratios 1:3 .. 3:1, pixel budgets 1/8 .. 1 of side^2 (as the NaFlex case above)
  for _ in range(n_mixed):
    aspect, budget = float(np.exp(rng.uniform(-np.log(3), np.log(3)))), side * side * rng.uniform(0.125, 1.0)
    h = int(np.sqrt(budget * aspect))
    sizes.append(data_vl.smart_resize(h, int(budget / h), 28, 28 * 28 * 4, side * side))
  mixed_grids = [(1, h // 14, w // 14) for h, w in sizes]
  longest = -(-max(int(np.prod(g)) for g in mixed_grids) // 64) * 64

  def mixed_layouts(grids, pv):
    p = data_vl.pack_vision(grids, merge=2, window=cfg.window, seq_len=longest)
    packed = (jnp.asarray(p.rows(pv)), jnp.asarray(p.positions), jnp.asarray(p.frame_ids), jnp.asarray(p.window_ids))
    return {"padded": padded_rows(grids, pv, cfg.window, longest), "packed": packed}

  mixed, _, _, pv = run_case(f"mixed {n_mixed} img", mixed_grids, mixed_layouts)
  t_ref = fixed["transformers fp32 (eager)"]
  print(f"Qwen2.5-VL tower: unimm-jax fp32 / transformers fp32 images/s = {t_ref / fixed['unimm-jax fp32 (jit)']:.2f}x "
        f"(max |diff| of the merged tokens {diff:.1e})")
  print(f"Qwen2.5-VL tower, mixed sizes: packed / padded images/s = "
        f"{mixed['unimm-jax fp32 padded'] / mixed['unimm-jax fp32 packed']:.2f}x (padding of the padded rows "
        f"{1 - len(pv) / (n_mixed * longest):.0%}); unimm-jax packed / transformers = "
        f"{mixed['transformers fp32 (eager)'] / mixed['unimm-jax fp32 packed']:.2f}x")
  image_question(args, size, vis_cfg, grid, new_tokens, repeats)


def image_question(args, size, vis_cfg, grid, new_tokens, repeats):
  """Prefill (vision + prompt) and 32 greedy tokens of one image question: ours vs transformers' generate."""
  text_cfg = dict(QWEN_LLM[size], num_hidden_layers=2 if args.tiny else args.llm_depth)
  vocab = text_cfg["vocab_size"]
  tokens = dict(vision_start_token_id=vocab - 4, vision_end_token_id=vocab - 3, image_token_id=vocab - 2,
                video_token_id=vocab - 1)
  hf_cfg = transformers.Qwen2_5_VLConfig(vision_config={**vis_cfg.to_dict(),
                                                        "out_hidden_size": text_cfg["hidden_size"]},
                                         text_config=text_cfg, **tokens)
  torch.manual_seed(0)
  ref = transformers.Qwen2_5_VLForConditionalGeneration(hf_cfg).eval()
  fam = registry.family("qwen_vl")
  cfg = qwen_vl.config_from_hf(hf_cfg.to_dict())
  params = jax.tree.map(jnp.asarray, engine.unflatten(engine.convert(
      state_of(ref, fam.legacy_keys), fam.rules(cfg), engine.flatten(abstract_params(fam, cfg)),
      ignore=fam.ignore(cfg))))
  rng = np.random.default_rng(1)
  n_image = int(np.prod(grid)) // 4
  ids = np.asarray([[1, 2, 3, tokens["vision_start_token_id"]] + [tokens["image_token_id"]] * n_image
                    + [tokens["vision_end_token_id"]] + list(rng.integers(10, min(1000, vocab - 4), 16))], np.int64)
  pv = rng.normal(size=(int(np.prod(grid)), 1176)).astype(np.float32)
  module, decoder = qwen_vl.QwenVL(cfg), qwen_vl.qwen.Qwen(cfg.text)
  embed = jax.jit(lambda p, ids, vision: module.apply({"params": p}, ids, vision, method=qwen_vl.QwenVL.embed))
  prefill_fn = jax.jit(lambda p, e, pos: decoder.apply({"params": p}, inputs_embeds=e, positions=pos).logits[:, -1])

  def ours(decode: bool):
    kw = qwen_vl.prepare(ids, cfg, pixel_values=pv, image_grid_thw=[grid])
    embeds = embed(params, ids, kw["vision"])
    if not decode:
      return prefill_fn(params["language_model"], embeds, kw["positions"]).block_until_ready()
    return generate_from_embeddings(decoder, params["language_model"], embeds, np.ones(ids.shape, np.int32),
                                    positions=kw["positions"], max_new_tokens=new_tokens).tokens

  inputs = dict(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pv), image_grid_thw=torch.tensor([grid]),
                mm_token_type_ids=torch.from_numpy((ids == tokens["image_token_id"]).astype(np.int64)))
  theirs = {False: lambda: ref(**inputs).logits[:, -1],
            True: lambda: ref.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                       do_sample=False)[:, ids.shape[1]:]}
  print(f"\nImage question: Qwen2.5-VL, {size} widths, vision depth {vis_cfg.depth}, decoder depth "
        f"{text_cfg['num_hidden_layers']} (vocab {vocab}); {ids.shape[1]} prompt tokens ({n_image} image); "
        f"best of {repeats}")
  print(f"| {'step':<30} | {'unimm-jax ms':>12} | {'transformers ms':>15} | {'ratio':>6} |")
  print(f"|{'-' * 32}|{'-' * 14}|{'-' * 17}|{'-' * 8}|")
  result = {}
  with torch.no_grad():
    for decode, name in ((False, "prefill (vision + prompt)"), (True, f"prefill + {new_tokens} greedy tokens")):
      t0 = time.perf_counter()
      mine = np.asarray(ours(decode))                                   # compile
      compile_s = time.perf_counter() - t0
      ref_out = theirs[decode]().numpy()                                # warm-up
      times = race({"ours": lambda decode=decode: ours(decode), "ref": theirs[decode]}, repeats)
      print(f"| {name:<30} | {times['ours'] * 1e3:>12.1f} | {times['ref'] * 1e3:>15.1f} | "
            f"{times['ref'] / times['ours']:>5.2f}x |")
      result[decode] = (mine, ref_out, compile_s)
  logits_diff = float(np.max(np.abs(result[False][0] - result[False][1])))
  same = np.array_equal(result[True][0], result[True][1])
  print(f"image question: last-token logits max |diff| {logits_diff:.1e}; greedy tokens identical: {same}; "
        f"our first-call compile {result[False][2]:.1f} s (prefill), {result[True][2]:.1f} s (generate)")


if __name__ == "__main__":
  main()
