"""The shapes tokenizer: a word-level HF tokenizer over the shapes vocabulary, built offline in memory.

It is a `transformers.PreTrainedTokenizerFast`, so everything downstream (tokenisation in the pipeline, the
demo's sampler, chat templates) treats it exactly like a real model's tokenizer. Special tokens follow the
Qwen2 names TUNA uses for images (`<|vision_start|> <|image_pad|> <|vision_end|>`) and chat turns
(`<|im_start|> <|im_end|>`); ids are fixed: specials first (in `SPECIAL_TOKENS` order), then newline, then
`shapes.vocabulary()`. With `video=True` the clips' words (`shapes.video_vocabulary()`) and the video tokens
(`VIDEO_TOKENS`, as tuna-2's misc.get_text_tokenizer adds them) come after, so no image-world id moves.
"""

from __future__ import annotations

import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from unimm_jax.data import shapes

SPECIAL_TOKENS = (
    "[PAD]", "[UNK]", "<|startoftext|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
)
VIDEO_TOKENS = ("<|vid_start|>", "<|vid_end|>", "<|video_pad|>")
# Qwen-style turns; `add_generation_prompt` opens the assistant turn.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def shapes_tokenizer(video: bool = False) -> transformers.PreTrainedTokenizerFast:
  """Word-level tokenizer for the shapes texts (unknown words -> [UNK]); same ids on every call."""
  words = list(SPECIAL_TOKENS) + ["\n", "user", "assistant", "system"] + shapes.vocabulary()
  if video:
    words += shapes.video_vocabulary() + list(VIDEO_TOKENS)
  vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  # Spaces separate words and are dropped; newlines, words and punctuation marks each become a token.
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
      pre_tokenizers.Split(Regex(r"\n|[A-Za-z]+|[0-9]+|[^\sA-Za-z0-9]"), behavior="isolated"),
  ])
  tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok,
      bos_token="<|startoftext|>",
      eos_token="<|endoftext|>",
      pad_token="[PAD]",
      unk_token="[UNK]",
      additional_special_tokens=list(SPECIAL_TOKENS[4:]) + (list(VIDEO_TOKENS) if video else []),
      chat_template=CHAT_TEMPLATE,
  )
