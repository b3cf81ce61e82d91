"""Chat with a converted (or HF) LLM checkpoint using its tokenizer's chat template, or ask a checkpoint of a
family with an image pipeline (Qwen2.5-VL, InternVL3, TUNA; `Family.pipeline`) about images.

  python scripts/chat.py --ckpt DIR --prompt "Why is the sky blue?" [--max_new_tokens 128]
      [--temperature 0.7 --top_p 0.9 --top_k 50] [--system "..."] [--seed 0]
  python scripts/chat.py --ckpt TUNA_DIR --image shapes.png --prompt "what colour is the circle?"
  # several images in one prompt (at its <image> markers, else before the text), or one image per prompt
  python scripts/chat.py --ckpt QWEN_VL_DIR --image a.png --image b.png --prompt "what differs between them?"
  python scripts/chat.py --ckpt QWEN_VL_DIR --image a.png --image b.png --prompt "describe" --prompt "count"
  # a checkpoint with a generate-or-answer router (UniWorld --task_head) answers or draws per prompt
  python scripts/chat.py --ckpt UNIWORLD_DIR --route auto --prompt "a cat on a sofa" [--size 1024x1024 --steps 28]

The images go to the prompts as: one --prompt takes every --image; otherwise one --image per --prompt, in
order. Families whose pipeline answers text alone (Qwen2.5-VL) also chat without --image.
"""

from __future__ import annotations

import sys

from absl import app, flags
from tqdm import tqdm

import unimm_jax
from unimm_jax.sampling import SamplerConfig, cli, generate

FLAGS = flags.FLAGS
flags.DEFINE_string("ckpt", None, "converted or HF model directory", required=True)
flags.DEFINE_multi_string("prompt", None, "user message (repeat the flag for a batch)", required=True)
flags.DEFINE_string("system", None, "optional system message")
flags.DEFINE_integer("max_new_tokens", 128, "tokens to generate per prompt")
flags.DEFINE_float("temperature", 0.0, "0 = greedy")
flags.DEFINE_integer("top_k", 0, "0 = off")
flags.DEFINE_float("top_p", 1.0, "1 = off")
flags.DEFINE_integer("seed", 0, "sampling seed")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype (LLM checkpoints)")
flags.DEFINE_multi_string("image", None, "an image to ask about (repeat the flag for several; checkpoints of a "
                          "family with an image pipeline)")
flags.DEFINE_string("video", None, "a video file (GIF, MP4, ...) every prompt asks about (TUNA)")
flags.DEFINE_integer("video_frames", 5, "--video: frames spread over the clip (latent TUNA: 1 + 4k)")
cli.define_route_flags()


def encode(tokenizer, prompt: str, system: str | None) -> list[int]:
  messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
  if getattr(tokenizer, "chat_template", None):
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
  return tokenizer(prompt)["input_ids"]


def images_per_prompt(paths: list[str], prompts: list[str]) -> list[list[str]]:
  if not paths:
    return [[] for _ in prompts]
  if len(prompts) == 1:
    return [paths]
  if len(paths) == len(prompts):
    return [[p] for p in paths]
  raise ValueError(f"{len(paths)} --image for {len(prompts)} --prompt: give one --prompt (it takes every image) "
                   "or one --image per --prompt")


def ask_pipeline() -> None:
  """The family's pipeline answers the prompts, each with its images."""
  per_prompt = images_per_prompt(FLAGS.image or [], FLAGS.prompt)
  model = unimm_jax.load_pipeline(FLAGS.ckpt)
  most = max(len(p) for p in per_prompt)
  allowed = getattr(model, "max_images_per_prompt", 1)
  if not most and not getattr(model, "answers_text", False):
    raise ValueError(f"{FLAGS.ckpt}: this checkpoint's pipeline answers questions about an image: pass --image")
  if allowed is not None and most > allowed:
    raise ValueError(f"{FLAGS.ckpt}: this checkpoint's pipeline takes {allowed} image(s) per prompt, got {most}")
  lists = images = [[model.read_image(p) for p in paths] for paths in per_prompt]
  if all(len(i) == 1 for i in images):  # one image per question: what every pipeline takes
    images = [i[0] for i in images]
  bar = tqdm(total=FLAGS.max_new_tokens, desc="decode", unit="tok", file=sys.stderr)
  extra = {"system": FLAGS.system} if FLAGS.system else {}
  kw = dict(max_new_tokens=FLAGS.max_new_tokens, sampler=SamplerConfig(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p),
            on_step=lambda step: bar.update(1), **extra)
  if FLAGS.route == "auto":   # the router answers (text) or draws (an image written to --image_out) per prompt
    answers = cli.respond_routed(model, FLAGS.ckpt, lists, FLAGS.prompt, FLAGS, **kw)
  else:
    answers = model.answer(images, FLAGS.prompt, seed=FLAGS.seed, **kw)
  bar.close()
  for prompt, answer in zip(FLAGS.prompt, answers):
    print(f"> {prompt}\n{answer}\n")


def ask_video() -> None:
  """The pipeline answers every prompt about the --video clip."""
  if FLAGS.image:
    raise ValueError("--video and --image: ask about one or the other")
  model = unimm_jax.load_pipeline(FLAGS.ckpt)
  if not hasattr(model, "answer_video"):
    raise ValueError(f"{FLAGS.ckpt}: this checkpoint's pipeline does not answer questions about videos")
  clip = model.read_video(FLAGS.video, FLAGS.video_frames)
  answers = model.answer_video([clip] * len(FLAGS.prompt), FLAGS.prompt, max_new_tokens=FLAGS.max_new_tokens,
                               sampler=SamplerConfig(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p), seed=FLAGS.seed)
  for prompt, answer in zip(FLAGS.prompt, answers):
    print(f"> {prompt}\n{answer}\n")


def main(argv):
  del argv
  try:
    if FLAGS.video:
      return ask_video()
    if FLAGS.image or FLAGS.route == "auto" or unimm_jax.family_of(FLAGS.ckpt).pipeline is not None:
      return ask_pipeline()
  except (ValueError, OSError, unimm_jax.ConversionError) as e:
    print(f"chat: error: {e}", file=sys.stderr)
    sys.exit(2)
  model = unimm_jax.load(FLAGS.ckpt, dtype=FLAGS.dtype)
  tok = model.tokenizer
  if tok is None:
    print(f"chat: {FLAGS.ckpt} has no tokenizer files (tokenizer.json / vocab.json)", file=sys.stderr)
    sys.exit(2)
  prompts = [encode(tok, p, FLAGS.system) for p in FLAGS.prompt]
  stop = sorted({t for t in (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")) if isinstance(t, int) and t >= 0})
  bar = tqdm(total=FLAGS.max_new_tokens, desc="decode", unit="tok", file=sys.stderr)
  out = generate(
      model.module, model.params, prompts, max_new_tokens=FLAGS.max_new_tokens,
      sampler=SamplerConfig(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p), stop_tokens=stop,
      pad_id=tok.pad_token_id if tok.pad_token_id is not None else 0, seed=FLAGS.seed,
      on_step=lambda step: bar.update(1))
  bar.close()
  for prompt, ids in zip(FLAGS.prompt, out.as_lists()):
    print(f"> {prompt}\n{tok.decode(ids, skip_special_tokens=True)}\n")


if __name__ == "__main__":
  app.run(main)
