"""Every key map against the names and shapes of the real release it reads (tests/fixtures/keys/, no weights).

Each committed list (header: where it came from) goes through the same code as a conversion, on shapes only
(engine.check / check_bundle): every listed tensor must be mapped or ignored by the family's table, and every
param of our config of that release filled with its exact shape. Families with an export must write back
exactly the listed names. Only abstract shapes (jax.eval_shape) are built.
"""

import json
import pathlib
import re

import jax
import numpy as np
import pytest

from unimm_jax import registry
from unimm_jax.convert import engine, hf
from unimm_jax.convert import transforms as T
from unimm_jax.convert import tuna as tuna_convert
from unimm_jax.convert.errors import ConversionError
from unimm_jax.convert.family import abstract_params
from unimm_jax.convert.maps import vae_wan as vae_wan_map
from unimm_jax.models import qwen, siglip, tuna, vae_kl, vae_wan

KEYS = pathlib.Path(__file__).parent / "fixtures" / "keys"


def key_list(name: str) -> tuple[dict, dict[str, tuple[int, ...]]]:
  data = json.loads((KEYS / f"{name}.json").read_text())
  return data["source"], {k: tuple(s) for k, s in data["keys"].items()}


# Abstract params are the slow part (eval_shape of the real sizes); the Wan VAEs serve three lists each.
_ABSTRACT: dict = {}


def flat_abstract(fam, cfg) -> dict:
  if (fam.name, cfg) not in _ABSTRACT:
    _ABSTRACT[fam.name, cfg] = engine.flatten(abstract_params(fam, cfg))
  return _ABSTRACT[fam.name, cfg]


@pytest.fixture
def shared_abstract(monkeypatch):
  """The maps' own abstract_params through the cache above (same values, computed once per config)."""
  cached = lambda fam, cfg: engine.unflatten(flat_abstract(fam, cfg))
  for module in (hf, tuna_convert, vae_wan_map):
    monkeypatch.setattr(module, "abstract_params", cached)


def assert_fills(out: dict, abstract: dict) -> None:
  assert {k: (tuple(v.shape), v.dtype) for k, v in out.items()} == \
         {k: (tuple(v.shape), v.dtype) for k, v in abstract.items()}


# ------------------------------------------------------------------------------------------------
# engine.check runs convert's code on shapes
# ------------------------------------------------------------------------------------------------

_RULES = (
    (r"a\.(\d+)\.weight", r"a_\1/kernel", T.transpose),
    (r"qkv", "q/kernel", T.part(0, 2, T.to_heads)),
    (r"qkv", "k/kernel", T.part(1, 2, T.to_heads)),
    (r"emb", "emb", T.identity),
    (r"bad\.weight", "b/kernel", T.part(0, 2)),   # with no part 1: an incomplete fused read
)
_ABS = {"a_0/kernel": jax.ShapeDtypeStruct((3, 4), np.float32), "a_1/kernel": jax.ShapeDtypeStruct((3, 4), np.float32),
        "q/kernel": jax.ShapeDtypeStruct((4, 2, 2), np.float32), "k/kernel": jax.ShapeDtypeStruct((4, 2, 2), np.float32),
        "emb": jax.ShapeDtypeStruct((5,), "bfloat16"), "b/kernel": jax.ShapeDtypeStruct((2,), np.float32)}
_GOOD = {"a.0.weight": (4, 3), "a.1.weight": (4, 3), "qkv": (8, 4), "emb": (5,), "skip.me": (7,)}


def _source(shapes):
  rng = np.random.default_rng(0)
  return {k: (lambda s=s: rng.normal(size=s).astype(np.float32)) for k, s in shapes.items()}


def test_check_fills_the_leaves_convert_fills():
  abstract = {k: v for k, v in _ABS.items() if k != "b/kernel"}
  got = engine.check(_GOOD, _RULES, abstract, ignore=(r"skip\..*",))
  assert_fills(got, abstract)
  assert_fills(engine.convert(_source(_GOOD), _RULES, abstract, ignore=(r"skip\..*",)), abstract)


@pytest.mark.parametrize("shapes", [
    {**_GOOD, "a.1.weight": (5, 3), "extra": (1,), "a.2.weight": (4, 3)},  # wrong shape, unexpected, no such param
    {k: v for k, v in _GOOD.items() if k != "emb"} | {"qkv": (7, 4)},      # not filled; fused tensor does not split
    {**_GOOD, "bad.weight": (4,)},                                          # a fused key read by one slice of two
])
def test_check_reports_exactly_the_problems_convert_reports(shapes):
  with pytest.raises(ConversionError) as by_convert:
    engine.convert(_source(shapes), _RULES, _ABS, ignore=(r"skip\..*",), where="f")
  with pytest.raises(ConversionError) as by_check:
    engine.check(shapes, _RULES, _ABS, ignore=(r"skip\..*",), where="f")
  assert str(by_check.value) == str(by_convert.value)
  assert str(by_check.value).count("\n  ") >= 2   # several problems, raised together


def test_check_bundle_reports_exactly_the_problems_convert_bundle_reports():
  abstract = {k: v for k, v in _ABS.items() if k != "b/kernel"}
  parts = {"": engine.Part(_RULES, abstract, (r"skip\..*",)),
           "vae.": engine.Part(((r"w", "w", T.identity),), {"w": jax.ShapeDtypeStruct((2,), np.float32)}, (), False)}
  shapes = {**_GOOD, "vae.w": (3,), "vae.x": (1,)}
  with pytest.raises(ConversionError) as by_convert:
    engine.convert_bundle(_source(shapes), parts, where="f")
  with pytest.raises(ConversionError) as by_check:
    engine.check_bundle(shapes, parts, where="f")
  assert str(by_check.value) == str(by_convert.value)
  assert "[vae.]" in str(by_check.value) and "'x'" in str(by_check.value)
  out = engine.check_bundle(_GOOD, parts)     # the optional part absent -> None, as convert_bundle
  assert out["vae."] is None and set(out[""]) == set(abstract)


def test_check_and_export_shapes_allocate_nothing():
  """A 4 TB (1e6 x 1e6 fp32) table: only its shape goes through the transforms."""
  big = (10**6, 10**6)
  rules = ((r"w", "w/kernel", T.transpose), (r"h", "h/kernel", T.to_heads))
  abstract = {"w/kernel": jax.ShapeDtypeStruct(big, np.float32),
              "h/kernel": jax.ShapeDtypeStruct((10**6, 1000, 1000), np.float32)}
  out = engine.check({"w": big, "h": big}, rules, abstract)
  assert out["h/kernel"].shape == (10**6, 1000, 1000)
  assert engine.export_shapes(abstract, rules) == {"w": big, "h": big}


def test_export_shapes_equal_the_shapes_export_writes():
  params = engine.convert(_source(_GOOD), _RULES, {k: v for k, v in _ABS.items() if k != "b/kernel"},
                          ignore=(r"skip\..*",))
  rules = _RULES[:4]
  assert engine.export_shapes(params, rules) == {k: v.shape for k, v in engine.export(params, rules).items()}


# ------------------------------------------------------------------------------------------------
# Hugging Face / diffusers releases
# ------------------------------------------------------------------------------------------------

def _naflex():
  return siglip.SiglipVisionConfig.so400m(patch=16, image_size=256, posemb_resize="bilinear_antialias")


# list, family, our config of that release
HF_RELEASES = [
    ("qwen2_5_1_5b_instruct", "qwen", qwen.QwenConfig.qwen2_5_1_5b),
    ("qwen2_5_7b_instruct", "qwen", qwen.QwenConfig.qwen2_5_7b),
    ("qwen3_1_7b", "qwen", qwen.QwenConfig.qwen3_1_7b),
    ("siglip_so400m_patch14_384", "siglip", siglip.SiglipVisionConfig.so400m),
    ("siglip2_so400m_patch16_naflex", "siglip2", _naflex),
    ("sd_vae_ft_mse", "vae_kl", lambda: vae_kl.preset("sd")),
    ("sdxl_vae", "vae_kl", lambda: vae_kl.preset("sdxl")),
    ("flux1_dev_vae", "vae_kl", lambda: vae_kl.preset("flux")),
    ("wan2_1_vae_diffusers", "vae_wan", lambda: vae_wan.preset("wan2.1")),
    ("wan2_2_vae_diffusers", "vae_wan", lambda: vae_wan.preset("wan2.2")),
]


@pytest.mark.parametrize("name,family,make_cfg", HF_RELEASES, ids=[r[0] for r in HF_RELEASES])
def test_release_config_json_gives_our_config_of_it(name, family, make_cfg):
  header, _ = key_list(name)
  assert registry.family(family).config_from_hf(header["config"]) == make_cfg()


@pytest.mark.parametrize("name,family,make_cfg", HF_RELEASES, ids=[r[0] for r in HF_RELEASES])
def test_release_key_list_converts_into_every_param_and_exports_back(name, family, make_cfg, shared_abstract):
  header, shapes = key_list(name)
  fam, cfg, model_type = registry.family(family), make_cfg(), hf.model_type_of(header["config"])
  assert_fills(hf.check_key_list(shapes, fam, cfg, model_type, where=name), flat_abstract(fam, cfg))
  # export writes exactly the listed names that the map does not skip (the text tower of a full SigLIP)
  ignored = [re.compile(p) for p in fam.ignore(cfg)]
  in_family = hf.family_names(fam, model_type, {k: k for k in shapes})   # our name -> the file's
  kept = {k: shapes[k] for ours, k in in_family.items() if not any(p.fullmatch(ours) for p in ignored)}
  assert hf.export_key_list(fam, cfg, model_type) == kept


def test_tied_lm_head_is_absent_from_qwen2_5_1_5b_and_present_in_7b():
  assert "lm_head.weight" not in key_list("qwen2_5_1_5b_instruct")[1]
  assert key_list("qwen2_5_7b_instruct")[1]["lm_head.weight"] == (152064, 3584)


# ------------------------------------------------------------------------------------------------
# Original releases: Wan2.x_VAE.pth, the tuna-2 reference checkpoint
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,preset", [("wan2_1_vae_original", "wan2.1"), ("wan2_2_vae_original", "wan2.2")])
def test_original_wan_vae_file_converts_into_every_param_and_exports_back(name, preset, shared_abstract):
  _, shapes = key_list(name)
  cfg = vae_wan.preset(preset)
  part = vae_wan_map.original_part(cfg)               # what original.convert_wan_vae reads the .pth with
  assert_fills(engine.check_bundle(shapes, {"": part}, where=name)[""], part.abstract)
  assert engine.export_shapes(part.abstract, part.rules) == shapes


def test_tuna_2b_reference_checkpoint_converts_with_its_wan_vae(shared_abstract):
  _, shapes = key_list("tuna_2b_reference")
  cfg = tuna_convert.with_checkpoint_vocab(tuna.TunaConfig.tuna_2b(), shapes, "tuna_2b_reference")
  assert cfg.llm.vocab == 151669   # Qwen2.5's 151665 + [PAD], <image>, <|vid_start|>, <|vid_end|>
  parts = tuna_convert.reference_parts(cfg)            # the bundle convert_reference reads
  out = engine.check_bundle(shapes, parts, where="tuna_2b_reference")
  assert_fills(out[""], parts[""].abstract)
  assert_fills(out[tuna_convert.VAE_PREFIX], parts[tuna_convert.VAE_PREFIX].abstract)
  # the TUNA table backwards names every reference tensor but the VAE's and the tied lm_head
  fam = registry.family("tuna")
  want = {k: s for k, s in shapes.items() if not k.startswith(tuna_convert.VAE_PREFIX) and k != "tuna.lm_head.weight"}
  assert engine.export_shapes(parts[""].abstract, fam.rules(cfg)) == want
