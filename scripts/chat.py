"""Chat with a converted (or HF) LLM checkpoint using its tokenizer's chat template, or ask a checkpoint of a
family with an image pipeline (InternVL3, TUNA; `Family.pipeline`) about images.

  python scripts/chat.py --ckpt DIR --prompt "Why is the sky blue?" [--max_new_tokens 128]
      [--temperature 0.7 --top_p 0.9 --top_k 50] [--system "..."] [--seed 0]
  python scripts/chat.py --ckpt TUNA_DIR --image shapes.png --prompt "what colour is the circle?"
  # several images in one question (InternVL3): each prompt gets every --image, in order, where its <image>
  # markers stand (none: the images come first, one per line)
  python scripts/chat.py --ckpt InternVL3-1B --image a.png --image b.png --prompt "<image> vs <image>: what changed?"
"""

from __future__ import annotations

import sys

from absl import app, flags
from tqdm import tqdm

import unimm_jax
from unimm_jax.sampling import SamplerConfig, generate

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
flags.DEFINE_multi_string("image", None, "an image to ask about (checkpoints of a family with an image pipeline); "
                          "repeat the flag for several images in each prompt")


def encode(tokenizer, prompt: str, system: str | None) -> list[int]:
  messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
  if getattr(tokenizer, "chat_template", None):
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
  return tokenizer(prompt)["input_ids"]


def ask_about_images() -> None:
  model = unimm_jax.load_pipeline(FLAGS.ckpt)
  limit = getattr(model, "max_images", 1)   # pipelines without the attribute take one image per question
  if limit is not None and len(FLAGS.image) > limit:
    raise ValueError(f"--image given {len(FLAGS.image)} times; the {type(model).__name__} pipeline of {FLAGS.ckpt} "
                     f"takes at most {limit} image(s) per prompt")
  if FLAGS.system is not None:
    if not hasattr(model, "system"):
      raise ValueError(f"--system: the {type(model).__name__} pipeline of {FLAGS.ckpt} has no system turn")
    model.system = FLAGS.system
  images = [model.read_image(path) for path in FLAGS.image]
  per_prompt = images[0] if len(images) == 1 else images
  bar = tqdm(total=FLAGS.max_new_tokens, desc="decode", unit="tok", file=sys.stderr)
  answers = model.answer([per_prompt] * len(FLAGS.prompt), FLAGS.prompt, max_new_tokens=FLAGS.max_new_tokens,
                         sampler=SamplerConfig(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p), seed=FLAGS.seed,
                         on_step=lambda step: bar.update(1))
  bar.close()
  for prompt, answer in zip(FLAGS.prompt, answers):
    print(f"> {prompt}\n{answer}\n")


def main(argv):
  del argv
  if FLAGS.image:
    try:
      return ask_about_images()
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
