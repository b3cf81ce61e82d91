"""OpenUni released state dict (`OpenUniInternVL3SANAHF.state_dict()`) -> unimm_jax.models.openuni.

Prefixes (reference openuni.md a): `lmm.` the InternVL3 remote-code release (maps/internvl.py RULES_ORIGINAL),
`meta_queries`, `connector.layers.N.` SigLIP encoder layers (maps/pre_ln.py, without its `encoder.`),
`projector.`, `transformer.` diffusers SANA (maps/sana.py), `vae.` diffusers DC-AE (maps/dc_ae.py). The released
`.pth` may hold only the trained tensors; convert/openuni.py fills the rest from the base repositories.
"""

from __future__ import annotations

from unimm_jax.convert import transforms as T
from unimm_jax.convert.engine import prefixed
from unimm_jax.convert.family import Family, Reference
from unimm_jax.convert.maps import dc_ae as dc_ae_map
from unimm_jax.convert.maps import internvl as internvl_map
from unimm_jax.convert.maps import pre_ln
from unimm_jax.convert.maps import sana as sana_map
from unimm_jax.models import openuni
from unimm_jax.models.openuni import OpenUniConfig

# the connector is SiglipEncoder's `layers` without the `encoder.` of a SigLIP tower
_CONNECTOR = tuple((r"connector\." + src.removeprefix(r"encoder\."), "connector/" + dst, t)
                   for src, dst, t in pre_ln.RULES)
PREFIXES = {"lmm": "lmm.", "transformer": "transformer.", "vae": "vae."}   # parts that come from base repos


def rules(cfg: OpenUniConfig) -> tuple:
  return (
      *prefixed(internvl_map.RULES_ORIGINAL, r"lmm\.", "lmm/"),
      (r"meta_queries", "meta_queries", T.identity),
      *_CONNECTOR,
      (r"projector\.weight", "projector/kernel", T.transpose),
      (r"projector\.bias", "projector/bias", T.identity),
      *prefixed(sana_map.FAMILY.rules(cfg.transformer), r"transformer\.", "transformer/"),
      *prefixed(dc_ae_map.RULES, r"vae\.", "vae/"),
  )


def ignore(cfg: OpenUniConfig) -> tuple[str, ...]:
  """The InternVL3 IGNORE under `lmm.`; the vit_mean / vit_std buffers are non-persistent (never saved)."""
  return tuple(r"lmm\." + p for p in internvl_map.FAMILY_ORIGINAL.ignore(cfg.lmm))


FAMILY = Family(
    name="openuni", config_cls=OpenUniConfig, module=openuni.OpenUni, example_inputs=openuni.example_inputs,
    rules=rules, ignore=ignore, pipeline="unimm_jax.sampling.openuni:load",
    reference=Reference(
        flag="openuni", help=f"OpenUni variant ({', '.join(v for v in openuni.VARIANTS if v != 'tiny')}) of a "
        "released .pth / .safetensors --src; tensors it lacks come from --lmm, --sana, --vae",
        convert="unimm_jax.convert.openuni:convert_cli",
        parts={"lmm": "OpenUni: InternVL3 directory (OpenGVLab/InternVL3-1B or -2B, remote-code naming)",
               "sana": "OpenUni: SANA diffusers directory (pipeline root or its transformer/ folder)",
               "vae": "DC-AE diffusers directory (pipeline root or its vae/ folder)"}))
