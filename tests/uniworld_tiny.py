"""The UniWorld-V1 golden fixture laid out as the release's directories, and the parts the fixture does not hold
(FLUX.1-dev's text encoders, task_head_final.pt) made at its widths: shared by test_uniworld*.py."""

import json
import os

import transformers

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "uniworld")


def release_dirs(root, with_weights=True):
  """The fixture laid out as the release directories: UniWorld (config.json + weights + processor), SigLIP
  (config.json; its weights sit in the bundle as siglip.*), FLUX.1-dev (vae/config.json, scheduler/)."""
  with open(os.path.join(FIXTURES, "config.json")) as f:
    c = json.load(f)
  dirs = {n: os.path.join(root, n) for n in ("uniworld", "siglip", "flux")}
  for d in (*dirs.values(), os.path.join(dirs["flux"], "vae"), os.path.join(dirs["flux"], "scheduler")):
    os.makedirs(d, exist_ok=True)
  for path, content in ((os.path.join(dirs["uniworld"], "config.json"), c["univa_config"]),
                        (os.path.join(dirs["siglip"], "config.json"), c["siglip_config"]),
                        (os.path.join(dirs["flux"], "vae", "config.json"), c["flux_vae_config"]),
                        (os.path.join(dirs["flux"], "scheduler", "scheduler_config.json"), c["flux_scheduler_config"])):
    with open(path, "w") as f:
      json.dump(content, f)
  if with_weights:
    os.symlink(os.path.join(FIXTURES, "uniworld.safetensors"), os.path.join(dirs["uniworld"], "model.safetensors"))
  proc = os.path.join(FIXTURES, "qwen_processor")
  for n in os.listdir(proc):
    os.symlink(os.path.join(proc, n), os.path.join(dirs["uniworld"], n))
  return dirs, c


def tiny_flux_dir(flux_dir, seed=0):
  """FLUX.1-dev's text encoders at the fixture's widths (T5 d_model = joint_attention_dim 32, CLIP width =
  pooled_projection_dim 24), random, with the fixture's byte-level tokenizer standing in for both tokenizers."""
  import torch
  torch.manual_seed(seed)
  tok = os.path.join(FIXTURES, "qwen_processor")
  vocab = 404
  t5 = transformers.T5EncoderModel(transformers.T5Config(
      vocab_size=vocab, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=2, feed_forward_proj="gated-gelu",
      relative_attention_num_buckets=8, relative_attention_max_distance=16))
  clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=vocab, hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
      max_position_embeddings=77))
  for model, sub, tok_dir in ((t5, "text_encoder_2", "tokenizer_2"), (clip, "text_encoder", "tokenizer")):
    model.save_pretrained(os.path.join(flux_dir, sub))
    transformers.AutoTokenizer.from_pretrained(tok).save_pretrained(os.path.join(flux_dir, tok_dir))


def task_head_file(path, width=64, hidden=16, seed=0, prefer=None):
  """cli.py's router nn.Sequential(Linear, SiLU, Dropout, Linear) with seeded random weights, saved as
  task_head_final.pt; prefer "generate" / "answer" adds a bias of 100 to that logit (a route known in advance)."""
  import torch
  torch.manual_seed(seed)
  head = torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.SiLU(), torch.nn.Dropout(0.3),
                             torch.nn.Linear(hidden, 2))
  if prefer is not None:
    with torch.no_grad():
      head[3].bias[("answer", "generate").index(prefer)] += 100.0
  torch.save(head.state_dict(), path)
  return head
