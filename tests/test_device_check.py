"""scripts/device_check.py --dry-run: every section runs on CPU at tiny shapes and lands in the report."""

import importlib.util
import json
import os
import sys

import jax.numpy as jnp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "device_check.py")


@pytest.fixture(scope="module")
def dc():
  spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules["device_check"] = module  # its dataclass looks its module up
  spec.loader.exec_module(module)
  yield module
  del sys.modules["device_check"]


@pytest.mark.slow   # ~55 s on 2 cores: every section of the GPU check, dry
def test_dry_run_writes_every_section_into_the_json_and_markdown_reports(dc, tmp_path):
  report = dc.main(["--dry-run", "--out", str(tmp_path)])
  with open(tmp_path / "device_check.json") as f:
    assert json.load(f)["sections"].keys() == report["sections"].keys()
  sections = report["sections"]
  assert set(sections) == {"environment", "correctness", "attention", "train", "sampling"}
  assert all("result" in s for s in sections.values()), {k: s.get("error") for k, s in sections.items()}
  assert sections["environment"]["result"]["jax"] and sections["environment"]["result"]["device_count"] == 8
  corr = sections["correctness"]["result"]
  assert corr["passed"] == {"pallas_gpu": True} and len(corr["cases"]) == 4
  rows = sections["attention"]["result"]["rows"]
  assert {(r["pass_"], "ms" in r) for r in rows} == {("fwd", True), ("fwd+bwd", True)}
  train = sections["train"]["result"]["runs"]["xla"]
  assert train["devices"] == 1 and train["batch"] == 2 and train["step_s"] > 0 and jnp.isfinite(train["loss"]) and 0 < train["mfu"] < 1
  assert sections["sampling"]["result"]["runs"]["xla"]["step_ms"] > 0
  assert report["goals"] is None and report["proven_lines"] == []
  md = (tmp_path / "device_check.md").read_text()
  assert "## Correctness" in md and "## Attention" in md and "## train" in md and "## sampling" in md


def test_a_backend_with_a_wrong_mask_fails_its_correctness_case(dc):
  """The criterion can fail: "xla" fed causal=False is checked against the causal reference."""
  case = dc.Case("causal", 1, 24, 24, 2, 1, 16, causal=True)
  good = dc.check_case(case, "xla", "float32")
  (q, k, v), kw, w = dc.case_inputs(case)
  wrong = dc.relative_errors(dc.out_and_grads("xla", q, k, v, w, {**kw, "causal": False}),
                             dc.out_and_grads("xla", q, k, v, w, kw))
  assert good["passed"] and max(wrong.values()) > dc.FLOOR["float32"]
