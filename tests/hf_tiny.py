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


def tiny_tokenizer(vocab_size: int = 211) -> transformers.PreTrainedTokenizerFast:
  """A word-level tokenizer with Qwen's chat special tokens, built offline."""
  import tokenizers
  words = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>", "\n", "<|vision_start|>", "<|vision_end|>",
           "<|image_pad|>"]
  words += [w for w in "user assistant system the a is what colour shape red blue green circle square".split()]
  words += [f"w{i}" for i in range(vocab_size - len(words))]
  tk = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  tk.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
      tokenizers.pre_tokenizers.Split(tokenizers.Regex(r"<\|[a-z_]+\|>|\n"), behavior="isolated"),
      tokenizers.pre_tokenizers.Split(" ", behavior="removed")])
  tk.decoder = tokenizers.decoders.WordPiece(prefix="##")
  tok = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>")
  tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                                        "<|vision_end|>", "<|image_pad|>"]})
  tok.chat_template = CHAT_TEMPLATE
  return tok
