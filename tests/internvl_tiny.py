"""Tiny random InternVL3 checkpoints in both namings (transformers' and the original release's), with a tokenizer
and image-processor settings, for the parity and pipeline tests."""

from __future__ import annotations

import json
import os

import numpy as np
import torch
import transformers

import hf_tiny
from unimm_jax.convert import engine, hf
from unimm_jax.convert.family import abstract_params
from unimm_jax.convert.maps import internvl as internvl_map
from unimm_jax.convert.safetensors_writer import save_safetensors
from unimm_jax.models import internvl

# 28 px tiles of 7 px patches: a 4x4 grid, 2x2-merged into 4 image tokens per tile
VISION = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=28,
              patch_size=7, attention_bias=True)
TEXT = dict(hf_tiny.QWEN_TINY, model_type="qwen2", vocab_size=256, rope_theta=1e6)
IMAGE_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>"]   # ids 211, 212, 213 after the tiny tokenizer's 211
IMAGE_TOKEN_ID = 213
MAX_TILES = 6
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def hf_model(tie: bool = False, **kw) -> transformers.InternVLForConditionalGeneration:
  cfg = transformers.InternVLConfig(
      text_config=dict(TEXT, tie_word_embeddings=tie), vision_config=VISION, image_token_id=IMAGE_TOKEN_ID,
      image_seq_length=4, tie_word_embeddings=tie, **kw)
  torch.manual_seed(0)
  return hf_tiny._randomize(transformers.InternVLForConditionalGeneration(cfg).eval())


def image_processor() -> transformers.GotOcr2ImageProcessorPil:
  return transformers.GotOcr2ImageProcessorPil(size={"height": 28, "width": 28}, max_patches=MAX_TILES,
                                               image_mean=list(MEAN), image_std=list(STD))


def save_tokenizer(path: str) -> None:
  tok = hf_tiny.tiny_tokenizer()
  tok.add_tokens(IMAGE_TOKENS, special_tokens=True)
  tok.save_pretrained(path)
  # transformers' InternVL tokenizers name their image tokens (InternVLProcessor reads these attributes)
  with open(os.path.join(path, "tokenizer_config.json")) as f:
    tc = json.load(f)
  tc["extra_special_tokens"] = {"start_image_token": "<img>", "end_image_token": "</img>",
                                "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump(tc, f)


def save_hf_dir(path: str, model) -> str:
  """transformers' layout: InternVLForConditionalGeneration + tokenizer + preprocessor_config.json."""
  model.save_pretrained(path)
  save_tokenizer(path)
  image_processor().save_pretrained(path)
  return path


def state(model) -> dict:
  return {k: (lambda v=v: v.detach().numpy()) for k, v in model.state_dict().items()}


def convert(model) -> tuple[internvl.InternVLConfig, dict]:
  """Our config and (flat) params of a transformers model, through our converter."""
  fam = hf.family_for_model_type("internvl", "test")
  cfg = internvl.config_from_hf(model.config.to_dict())
  source = hf._renamed(state(model), fam.key_prefixes("internvl"))
  flat = engine.convert(source, fam.rules(cfg), engine.flatten(abstract_params(fam, cfg)), ignore=fam.ignore(cfg))
  return cfg, flat


def release_state(model) -> dict[str, np.ndarray]:
  """The same weights in the original release's naming, written by our export (RULES_ORIGINAL)."""
  _, flat = convert(model)
  return engine.export(flat, internvl_map.RULES_ORIGINAL)


def release_config(model) -> dict:
  """config.json of the original release (InternVLChatConfig) for a transformers InternVL config."""
  c = model.config
  v, t = c.vision_config, c.text_config.to_dict()
  return {
      "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "downsample_ratio": c.downsample_ratio,
      "dynamic_image_size": True, "force_image_size": v.image_size[0], "max_dynamic_patch": MAX_TILES,
      "min_dynamic_patch": 1, "ps_version": "v2", "select_layer": -1, "template": "internvl2_5",
      "tie_word_embeddings": False, "torch_dtype": "float32", "use_thumbnail": True,
      "llm_config": {**{k: t[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                           "num_key_value_heads", "vocab_size", "rms_norm_eps", "max_position_embeddings",
                                           "hidden_act")},
                     "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "rope_theta": 1e6,
                     "rope_scaling": {"factor": 2.0, "rope_type": "dynamic", "type": "dynamic"},
                     "tie_word_embeddings": False},
      "vision_config": {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
                        "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
                        "num_hidden_layers": v.num_hidden_layers, "num_attention_heads": v.num_attention_heads,
                        "image_size": v.image_size[0], "patch_size": v.patch_size[0], "qkv_bias": True,
                        "qk_normalization": False, "norm_type": "layer_norm", "layer_norm_eps": 1e-6,
                        "hidden_act": "gelu"},
  }


def save_release_dir(path: str, model) -> str:
  """The original release's layout (model_type internvl_chat): its names, its config.json, the tokenizer."""
  os.makedirs(path, exist_ok=True)
  save_safetensors(os.path.join(path, "model.safetensors"), release_state(model), {"format": "pt"})
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(release_config(model), f)
  save_tokenizer(path)
  return path
