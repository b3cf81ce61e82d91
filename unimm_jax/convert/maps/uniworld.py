"""UniWorld-V1 (`LanguageBind/UniWorld-V1`, a save_pretrained of UnivaQwen2p5VLForConditionalGeneration)
-> unimm_jax.models.uniworld, as a bundle of parts (engine.Part) read from several sources at once:

  ""                    the release: `visual.*` + `model.*` + `lm_head.weight` (maps/qwen_vl.py),
                        `denoise_tower.denoiser.*` (diffusers FLUX names, maps/flux.py),
                        `denoise_tower.{denoise,siglip,vae}_projector.{0,2}.*`
  "siglip."             google/siglip2-so400m-patch16-512 read by SiglipVisionModel (maps/siglip.py, conv stem)
  "vae."                FLUX.1-dev's vae/ (maps/vae_kl.py), saved as its own checkpoint beside ours
  "task_head."          task_head_final.pt: nn.Sequential(Linear, SiLU, Dropout, Linear) -> indices 0 and 3

The release carries no `siglip.` / `vae.` keys (they come from --siglip / --flux); the golden fixture's one file
holds all of them, so both are read the same way (convert/uniworld.py prefixes each source).
"""

from __future__ import annotations

from unimm_jax.convert import engine
from unimm_jax.convert import transforms as T
from unimm_jax.convert.engine import prefixed
from unimm_jax.convert.family import Family, Reference, abstract_params
from unimm_jax.convert.maps import flux as flux_map
from unimm_jax.convert.maps import qwen_vl as qwen_vl_map
from unimm_jax.convert.maps import siglip as siglip_map
from unimm_jax.convert.maps import vae_kl as vae_kl_map
from unimm_jax.models import uniworld, vae_kl

SIGLIP, VAE, TASK_HEAD = "siglip.", "vae.", "task_head."


def _connector(source: str, target: str, second: int = 2) -> tuple:
  """nn.Sequential(Linear, SiLU, [Dropout,] Linear) under the regex prefix `source` -> a uniworld.Connector."""
  pairs, target = ((0, 0), (second, 2)), target and target + "/"
  return (tuple((source + rf"{i}\.weight", f"{target}layers_{j}/kernel", T.transpose) for i, j in pairs)
          + tuple((source + rf"{i}\.bias", f"{target}layers_{j}/bias", T.identity) for i, j in pairs))


RULES = (
    *prefixed(qwen_vl_map.RULES, "", "vlm/"),
    *prefixed(flux_map.RULES, r"denoise_tower\.denoiser\.", "denoiser/"),
    *(rule for name in ("denoise_projector", "siglip_projector", "vae_projector")
      for rule in _connector(rf"denoise_tower\.{name}\.", name)),
)
RULES_SIGLIP = prefixed(siglip_map.RULES_SIGLIP, r"vision_model\.", "")
RULES_TASK_HEAD = _connector("", "", second=3)   # relative to task_head/ (its Part fills that sub-tree)


def ignore(cfg: uniworld.UniWorldConfig) -> tuple[str, ...]:
  return qwen_vl_map.ignore(cfg.vlm)


def ignore_siglip(cfg: uniworld.UniWorldConfig) -> tuple[str, ...]:
  """The text tower of a full SiglipModel and what the tower does not build (the MAP head: the original reads
  last_hidden_state only)."""
  return tuple(p if p in siglip_map.IGNORE_TEXT else r"vision_model\." + p for p in siglip_map.ignore(cfg.siglip))


def parts(cfg: uniworld.UniWorldConfig, vae_cfg: vae_kl.AutoencoderKLConfig) -> dict[str, engine.Part]:
  """The bundle: {source prefix: Part}. The SigLIP and task-head parts fill sub-trees of the UniWorld params."""
  flat = engine.flatten(abstract_params(FAMILY, cfg))
  sub = lambda top: {k[len(top) + 1:]: v for k, v in flat.items() if k.startswith(top + "/")}  # noqa: E731
  main = {k: v for k, v in flat.items() if not k.startswith(("siglip/", "task_head/"))}
  out = {"": engine.Part(RULES, main, ignore(cfg)),
         SIGLIP: engine.Part(RULES_SIGLIP, sub("siglip"), ignore_siglip(cfg)),
         VAE: engine.Part(vae_kl_map.RULES, engine.flatten(abstract_params(vae_kl_map.FAMILY, vae_cfg)))}
  if cfg.task_head:
    out[TASK_HEAD] = engine.Part(RULES_TASK_HEAD, sub("task_head"))
  return out


FAMILY = Family(
    name="uniworld", config_cls=uniworld.UniWorldConfig, module=uniworld.UniWorld,
    example_inputs=uniworld.example_inputs, rules=lambda cfg: RULES, ignore=ignore,
    pipeline="unimm_jax.sampling.uniworld:load",
    reference=Reference(
        flag="uniworld", help="UniWorld release (v1) in --src (the LanguageBind/UniWorld-V1 directory), with "
        "--flux and --siglip [--task_head]", convert="unimm_jax.convert.uniworld:convert_cli",
        parts={"flux": "FLUX.1-dev directory (vae/, text_encoder/ CLIP-L, text_encoder_2/ T5-XXL, tokenizers, "
                       "scheduler/)",
               "siglip": "SigLIP (SigLIP2) vision directory, e.g. google/siglip2-so400m-patch16-512",
               "task_head": "UniWorld's task_head_final.pt (the generate-or-answer router)"}))
