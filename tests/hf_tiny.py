"""Tiny random Hugging Face models for parity tests (built from the original config classes)."""

from __future__ import annotations

import torch
import transformers

QWEN_TINY = dict(vocab_size=211, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6)


def qwen2(**kw) -> transformers.Qwen2ForCausalLM:
  cfg = transformers.Qwen2Config(**{**QWEN_TINY, "rope_theta": 10000.0, **kw})
  torch.manual_seed(0)
  return _randomize(transformers.Qwen2ForCausalLM(cfg).eval())


def qwen3(**kw) -> transformers.Qwen3ForCausalLM:
  cfg = transformers.Qwen3Config(**{**QWEN_TINY, "head_dim": 24, "rope_theta": 1e6, **kw})
  torch.manual_seed(0)
  return _randomize(transformers.Qwen3ForCausalLM(cfg).eval())


QWEN_VL_VISION_TINY = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1], tokens_per_second=2)
QWEN_VL_TOKENS = dict(vision_start_token_id=202, vision_end_token_id=203, image_token_id=204, video_token_id=205)


def qwen2_5_vl(vision: dict | None = None, **kw) -> transformers.Qwen2_5_VLForConditionalGeneration:
  """2 text layers of width 64 (M-RoPE sections 2/3/3), a 3-block vision tower of width 32 with 4x4-patch windows
  and block 1 full attention; the vision tokens sit at ids 202-205 of the 211-word vocabulary."""
  text = {**QWEN_TINY, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}}
  cfg = transformers.Qwen2_5_VLConfig(vision_config={**QWEN_VL_VISION_TINY, **(vision or {})}, text_config=text,
                                      **{**QWEN_VL_TOKENS, **kw})
  torch.manual_seed(0)
  return _randomize(transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval())


def assert_same_weights(dir_a, dir_b) -> None:
  """Two HF directories hold the same tensor names and bit-identical tensors (export round trips)."""
  import numpy as np
  from unimm_jax.convert.sources import open_weights
  a, b = open_weights(str(dir_a)), open_weights(str(dir_b))
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k](), b[k]())


def _randomize(model):
  """HF inits norms to 1 and biases to 0; random values make the parity test see every tensor."""
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:
        p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g) if "norm" in name else 0.1 * torch.randn(p.shape, generator=g))
  return model


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _word_tokenizer(words: list[str], specials: list[str], chat_template: str,
                    split: str = r"<\|[a-z_]+\|>|\n") -> transformers.PreTrainedTokenizerFast:
  """A word-level tokenizer over `words` (ids in order), splitting off `split` matches and spaces."""
  import tokenizers
  tk = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  tk.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
      tokenizers.pre_tokenizers.Split(tokenizers.Regex(split), behavior="isolated"),
      tokenizers.pre_tokenizers.Split(" ", behavior="removed")])
  tk.decoder = tokenizers.decoders.WordPiece(prefix="##")
  tok = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>")
  tok.add_special_tokens({"additional_special_tokens": specials})
  tok.chat_template = chat_template
  return tok


def tiny_tokenizer(vocab_size: int = 211) -> transformers.PreTrainedTokenizerFast:
  """A word-level tokenizer with Qwen's chat special tokens, built offline."""
  words = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>", "\n", "<|vision_start|>", "<|vision_end|>",
           "<|image_pad|>"]
  words += [w for w in "user assistant system the a is what colour shape red blue green circle square".split()]
  words += [f"w{i}" for i in range(vocab_size - len(words))]
  return _word_tokenizer(words, ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                                 "<|image_pad|>"], CHAT_TEMPLATE)


# Qwen2-VL's chat template (transformers' Qwen2_5_VLProcessor renders the same prompt)
QWEN_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_vl_tokenizer() -> transformers.PreTrainedTokenizerFast:
  """tiny_tokenizer's words with Qwen2.5-VL's vision tokens at the ids of qwen2_5_vl() (202-205)."""
  vision = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
  words = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>", "\n"]
  words += "user assistant system You are helpful . the a is what colour shape red blue green circle square".split()
  words += [f"w{i}" for i in range(202 - len(words))] + vision + [f"v{i}" for i in range(5)]
  return _word_tokenizer(words, ["<|im_start|>", "<|im_end|>", *vision], QWEN_VL_CHAT_TEMPLATE,
                         split=r"<\|[a-z_]+\|>|\n|\.")
