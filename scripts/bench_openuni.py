"""OpenUni text-to-image speed, ours (JAX) vs a PyTorch pipeline with the same weights, in one run.

The PyTorch side is assembled from library classes as the original wires them (wusize/OpenUni
internvl3_sana_hf.py): transformers InternVLForConditionalGeneration (its Qwen2 LLM runs the prompt + 256 meta
queries, positions cumsum(mask) - 1), a transformers SiglipEncoder connector, a Linear projector, then diffusers'
SanaPipeline (SanaTransformer2DModel, DPMSolverMultistepScheduler with flow sigmas) and AutoencoderDC's decode.
Its state dict, in the released `.pth` naming, goes through our converter (convert/maps/openuni.py).
Full widths of OpenUni-B-512 (InternVL3-1B LLM 896 wide with the 151674-token vocabulary, InternViT-300M width, SANA
0.6B, DC-AE f32c32), depths reduced (--llm-layers, --sana-layers, --connector-layers; the InternViT, unused by
text-to-image, 1 layer). Reports seconds per image (one prompt + its CFG prompt, --steps DPM-Solver++ steps,
decode), after a warm-up call, median of --iters, wall and process CPU time, and the ratio ours / torch per stage
(conditioning, sampling, decode) and in total.

  python scripts/bench_openuni.py                        # 512^2, 20 steps, 2 LLM / 2 SANA / 2 connector layers
  python scripts/bench_openuni.py --steps 5 --iters 1    # quicker
  python scripts/bench_openuni.py --tiny                 # tiny widths, 64^2: the smoke test

Measured (defaults: 512^2, 20 steps, guidance 4.5, 2 LLM / 2 connector / 2 SANA layers, 2 iterations; 2 CPU cores
shared with four other jobs, so wall times mostly measure the neighbours, CPU time the work): seconds per image
ours / torch, wall 140.1 / 231.5 (0.61), process CPU 36.4 / 56.2 (0.65); per stage (CPU) condition 0.75 / 1.62,
sampling 12.0 / 27.5, decode 23.6 / 27.1 (the DC-AE f32c32 decoder at full depth is two thirds of our time and
nearly equal on both sides); decoded images equal to 3.8e-6. Before the sampler's jitted step was cached
(sampling/diffusion.py) every image traced and compiled its step again: --tiny sampling was 18x torch's.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from unimm_jax import benchmark
from unimm_jax.convert import engine, hf
from unimm_jax.convert.family import abstract_params
from unimm_jax.convert.maps import internvl as internvl_map
from unimm_jax.convert.maps import openuni as openuni_map
from unimm_jax.models import openuni
from unimm_jax.sampling import openuni as ou

# OpenUni-B-512 widths (InternVL3-1B: InternViT-300M + Qwen2.5-0.5B; SANA_600M_512px; dc-ae-f32c32-sana-1.1)
VISION_B = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, image_size=448, patch_size=14,
                attention_bias=True)
TEXT_B = dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_attention_heads=14,
              num_key_value_heads=2, vocab_size=151674, rms_norm_eps=1e-6, rope_theta=1e6,
              max_position_embeddings=32768, tie_word_embeddings=False)
CONNECTOR_B = dict(hidden_size=896, intermediate_size=3072, num_attention_heads=14)
SANA_B = dict(in_channels=32, out_channels=32, num_attention_heads=36, attention_head_dim=32,
              num_cross_attention_heads=16, cross_attention_head_dim=72, cross_attention_dim=1152,
              caption_channels=2304, sample_size=16)
_VIT = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
DCAE_B = dict(encoder_block_types=_VIT, decoder_block_types=_VIT, downsample_block_type="Conv",
              upsample_block_type="interpolate", scaling_factor=0.41407)
# tiny widths (the smoke test): 4 image tokens of a 28 px tile, a 3-level DC-AE
VISION_TINY = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, image_size=28, patch_size=7,
                   attention_bias=True)
TEXT_TINY = dict(TEXT_B, hidden_size=64, intermediate_size=112, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=300, max_position_embeddings=1024)
CONNECTOR_TINY = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4)
SANA_TINY = dict(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8,
                 num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=24,
                 sample_size=16)
DCAE_TINY = dict(latent_channels=8, attention_head_dim=8, encoder_block_types=_VIT[2:5], decoder_block_types=_VIT[2:5],
                 encoder_block_out_channels=(8, 16, 32), decoder_block_out_channels=(8, 16, 32),
                 encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
                 encoder_qkv_multiscales=((), (5,), (5,)), decoder_qkv_multiscales=((), (5,), (5,)),
                 downsample_block_type="Conv", upsample_block_type="interpolate", scaling_factor=0.41407)
IMAGE_TOKEN_ID = 151667   # InternVL3's <IMG_CONTEXT>


@dataclasses.dataclass(frozen=True)
class Spec:
  """The PyTorch side's component configs (transformers / diffusers keyword arguments)."""

  vision: dict
  text: dict
  connector: dict
  sana: dict
  dcae: dict
  num_queries: int = 256
  image_token_id: int = IMAGE_TOKEN_ID

  @classmethod
  def b512(cls, llm_layers: int = 2, connector_layers: int = 2, sana_layers: int = 2) -> "Spec":
    return cls(dict(VISION_B, num_hidden_layers=1), dict(TEXT_B, num_hidden_layers=llm_layers),
               dict(CONNECTOR_B, num_hidden_layers=connector_layers), dict(SANA_B, num_layers=sana_layers), DCAE_B)

  @classmethod
  def tiny(cls, llm_layers: int = 2, connector_layers: int = 2, sana_layers: int = 2) -> "Spec":
    return cls(dict(VISION_TINY, num_hidden_layers=1), dict(TEXT_TINY, num_hidden_layers=llm_layers),
               dict(CONNECTOR_TINY, num_hidden_layers=connector_layers), dict(SANA_TINY, num_layers=sana_layers),
               DCAE_TINY, num_queries=16, image_token_id=TEXT_TINY["vocab_size"] - 1)


class TorchOpenUni(torch.nn.Module):
  """OpenUniInternVL3SANAHF's text-to-image path from library classes; the attribute names give the released
  state dict's prefixes (`lmm.`, `meta_queries`, `connector.`, `projector.`, `transformer.`, `vae.`)."""

  def __init__(self, spec: Spec, attn: str = "sdpa"):
    super().__init__()
    self.spec = spec
    cfg = transformers.InternVLConfig(vision_config=spec.vision, text_config=spec.text,
                                      image_token_id=spec.image_token_id, tie_word_embeddings=False)
    cfg._attn_implementation = attn
    self.lmm = transformers.InternVLForConditionalGeneration(cfg).eval()
    d = spec.text["hidden_size"]
    self.meta_queries = torch.nn.Parameter(torch.randn(spec.num_queries, d) * d ** -0.5)
    conn = transformers.SiglipVisionConfig(**spec.connector, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    conn._attn_implementation = attn
    self.connector = transformers.models.siglip.modeling_siglip.SiglipEncoder(conn).eval()
    self.projector = torch.nn.Linear(d, spec.sana["caption_channels"])
    self.transformer = diffusers.SanaTransformer2DModel(**spec.sana).eval()
    self.vae = diffusers.AutoencoderDC(**spec.dcae).eval()

  @torch.no_grad()
  def prompt_embeds(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """prepare_forward_input + the connector and projector: ids / mask [b t] (right-padded) -> stages."""
    b, q = input_ids.shape[0], self.spec.num_queries
    x = torch.cat([self.lmm.get_input_embeddings()(input_ids), self.meta_queries[None].expand(b, -1, -1)], 1)
    mask = torch.cat([attention_mask.long(), torch.ones(b, q, dtype=torch.long)], 1)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    hidden = self.lmm.model.language_model(inputs_embeds=x, attention_mask=mask, position_ids=positions
                                           ).last_hidden_state[:, -q:]
    connected = self.connector(inputs_embeds=hidden).last_hidden_state
    return {"query_hidden": hidden, "connector_out": connected, "prompt_embeds": self.projector(connected)}

  def scheduler(self, shift: float = 3.0) -> diffusers.DPMSolverMultistepScheduler:
    return diffusers.DPMSolverMultistepScheduler(**dict(ou.SCHEDULER, flow_shift=shift))

  @torch.no_grad()
  def sample(self, cond: torch.Tensor, uncond: torch.Tensor, latents: torch.Tensor, steps: int, guidance: float,
             on_step: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """SanaPipeline on prompt embeddings (as OpenUni's generate: all caption tokens valid) -> final latents NCHW."""
    pipe = diffusers.SanaPipeline(tokenizer=None, text_encoder=None, vae=self.vae, transformer=self.transformer,
                                  scheduler=self.scheduler())
    pipe.set_progress_bar_config(disable=True)
    ones = torch.ones(cond.shape[:2], dtype=torch.long)

    def callback(p, i, t, kw):
      if on_step is not None:
        on_step(i, kw["latents"])
      return {}

    return pipe(prompt_embeds=cond, prompt_attention_mask=ones, negative_prompt=None, negative_prompt_embeds=uncond,
                negative_prompt_attention_mask=ones, guidance_scale=guidance, num_inference_steps=steps,
                height=latents.shape[2] * pipe.vae_scale_factor, width=latents.shape[3] * pipe.vae_scale_factor,
                latents=latents, output_type="latent",
                use_resolution_binning=False, callback_on_step_end=callback).images

  @torch.no_grad()
  def decode(self, latents: torch.Tensor) -> torch.Tensor:
    """latents_to_pixels: vae.decode(z / scaling_factor), [-1, 1] NCHW (not clamped)."""
    return self.vae.decode(latents / self.vae.config.scaling_factor).sample


def release_state(model: TorchOpenUni) -> dict[str, Callable[[], np.ndarray]]:
  """The model's state dict under the released names; `lmm.` in the remote-code InternVL3 naming the releases use
  (transformers' names -> ours -> RULES_ORIGINAL, our exporter)."""
  fam = hf.family_for_model_type("internvl", "bench_openuni")
  lmm_cfg = openuni.internvl.config_from_hf(model.lmm.config.to_dict())
  torch_lmm = {k: (lambda v=v: v.detach().numpy()) for k, v in model.lmm.state_dict().items()}
  flat = engine.convert(hf._renamed(torch_lmm, fam.key_prefixes("internvl")), fam.rules(lmm_cfg),
                        engine.flatten(abstract_params(fam, lmm_cfg)), ignore=fam.ignore(lmm_cfg))
  out = {f"lmm.{k}": (lambda v=v: v) for k, v in engine.export(flat, internvl_map.RULES_ORIGINAL).items()}
  for k, v in model.state_dict().items():
    if not k.startswith("lmm."):
      out[k] = lambda v=v: v.detach().numpy()
  return out


def config_of(model: TorchOpenUni, image_size: int) -> openuni.OpenUniConfig:
  spec = model.spec
  conn = dict(spec.connector, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
  return openuni.config_from_hf(model.lmm.config.to_dict(), conn, dict(model.transformer.config),
                                dict(model.vae.config), num_queries=spec.num_queries, image_size=image_size)


def convert(model: TorchOpenUni, image_size: int) -> tuple[openuni.OpenUni, Any]:
  """Ours from the released-naming state dict, through the OpenUni family's conversion rules."""
  cfg = config_of(model, image_size)
  fam = openuni_map.FAMILY
  flat = engine.convert(release_state(model), fam.rules(cfg), engine.flatten(abstract_params(fam, cfg)),
                        ignore=fam.ignore(cfg), where="bench_openuni")
  return openuni.OpenUni(cfg), jax.tree.map(jnp.asarray, engine.unflatten(flat))




STAGES = ("condition", "sample", "decode")


def run(args: argparse.Namespace) -> dict:
  torch.manual_seed(0)
  spec = (Spec.tiny if args.tiny else Spec.b512)(args.llm_layers, args.connector_layers, args.sana_layers)
  size = 64 if args.tiny else args.size
  t0 = time.perf_counter()
  ref = TorchOpenUni(spec)
  module, params = convert(ref, size)
  build_s = time.perf_counter() - t0
  pipe = ou.OpenUniPipeline(module, params, tokenizer=None, where="bench_openuni")
  sampler = ou.OpenUniSamplerConfig(steps=args.steps, guidance=args.guidance)
  rng = np.random.default_rng(0)
  # one prompt and the CFG prompt, right-padded (the CFG prompt is the shorter)
  ids = rng.integers(0, spec.text["vocab_size"] - 8, (2, args.prompt_tokens)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, args.prompt_tokens * 2 // 3:] = 0
  f = module.cfg.vae.spatial_downscale
  noise = rng.standard_normal((1, module.cfg.transformer.in_channels, size // f, size // f)).astype(np.float32)

  def ours_stages() -> dict[str, Callable[[Any], Any]]:
    return {
        "condition": lambda _: jax.block_until_ready(pipe.condition_ids(jnp.asarray(ids), jnp.asarray(mask))),
        "sample": lambda e: jax.block_until_ready(pipe.sample_latents(e[:1], e[1:], sampler,
                                                                      jnp.asarray(np.moveaxis(noise, 1, -1)))),
        "decode": lambda z: jax.block_until_ready(pipe.decode(z)),
    }

  def torch_stages() -> dict[str, Callable[[Any], Any]]:
    return {
        "condition": lambda _: ref.prompt_embeds(torch.from_numpy(ids).long(), torch.from_numpy(mask))["prompt_embeds"],
        "sample": lambda e: ref.sample(e[:1], e[1:], torch.from_numpy(noise), args.steps, args.guidance),
        "decode": lambda z: ref.decode(z),
    }

  def one_image(stages) -> tuple[Any, dict[str, tuple[float, float]]]:
    x, times = None, {}
    for name in STAGES:
      x, wall, cpu = benchmark.timed(lambda: stages[name](x))
      times[name] = (wall, cpu)
    return x, times

  results = {}
  for side, stages in (("ours", ours_stages()), ("torch", torch_stages())):
    first, cold = one_image(stages)                      # ours: compiles; torch: allocator / oneDNN warm-up
    runs = [one_image(stages)[1] for _ in range(args.iters)]
    med = {k: tuple(statistics.median(r[k][j] for r in runs) for j in (0, 1)) for k in STAGES}
    image = first.numpy() if side == "torch" else np.moveaxis(np.asarray(first), -1, 1)   # NCHW
    results[side] = dict(first_s=sum(w for w, _ in cold.values()), stages=med, image=image)
  diff = float(np.max(np.abs(results["ours"]["image"] - results["torch"]["image"])))
  return dict(results=results, build_s=build_s, image_max_diff=diff, size=size, spec=spec)


def report(out: dict, args: argparse.Namespace) -> list[dict]:
  res = out["results"]
  rows = []
  for name in (*STAGES, "total"):
    pick = (lambda side, j: sum(res[side]["stages"][k][j] for k in STAGES)) if name == "total" else (
        lambda side, j, name=name: res[side]["stages"][name][j])
    o, t, oc, tc = pick("ours", 0), pick("torch", 0), pick("ours", 1), pick("torch", 1)
    rows.append(dict(stage=name, ours_s=o, torch_s=t, ratio=o / t, ours_cpu_s=oc, torch_cpu_s=tc, cpu_ratio=oc / tc))
  print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} ({torch.get_num_threads()} "
        f"threads), fp32, {out['size']}^2, {args.steps} steps, guidance {args.guidance}, LLM {args.llm_layers} / "
        f"connector {args.connector_layers} / SANA {args.sana_layers} layers; built + converted in "
        f"{out['build_s']:.1f} s; first call (ours compiles) ours {res['ours']['first_s']:.1f} s, torch "
        f"{res['torch']['first_s']:.1f} s; decoded image max |ours - torch| {out['image_max_diff']:.2e}")
  print(f"{'stage':10s} {'ours s':>8s} {'torch s':>8s} {'ours/torch':>10s} {'ours cpu s':>10s} {'torch cpu s':>11s} "
        f"{'cpu ratio':>9s}")
  for r in rows:
    print(f"{r['stage']:10s} {r['ours_s']:8.3f} {r['torch_s']:8.3f} {r['ratio']:10.2f} {r['ours_cpu_s']:10.3f} "
          f"{r['torch_cpu_s']:11.3f} {r['cpu_ratio']:9.2f}", flush=True)
  return rows


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tiny", action="store_true", help="tiny widths at 64^2 (smoke test)")
  p.add_argument("--size", type=int, default=512, help="image side (a multiple of 32)")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--guidance", type=float, default=4.5)
  p.add_argument("--llm-layers", type=int, default=2)
  p.add_argument("--connector-layers", type=int, default=2)
  p.add_argument("--sana-layers", type=int, default=2)
  p.add_argument("--prompt-tokens", type=int, default=32)
  p.add_argument("--iters", type=int, default=2)
  args = p.parse_args(argv)
  if args.size % 32:
    p.error(f"--size {args.size} is not a multiple of 32 (the DC-AE's downscale)")
  out = run(args)
  return dict(rows=report(out, args), image_max_diff=out["image_max_diff"])


if __name__ == "__main__":
  main()
