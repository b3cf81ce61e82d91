"""One-shot device check: are the Pallas attention kernels correct on this GPU/TPU, and how fast is it all.

Writes <out>/device_check.json and <out>/device_check.md. Sections, in order; each is guarded (an error is
recorded in the report and the next section runs) and the report is rewritten after every section, so a
crash keeps what was measured:
  environment  device kind and count, platform version (CUDA / TPU runtime), python, jax, jaxlib, flax, commit
  correctness  the Pallas kernels compiled for this device (interpret=False; cuDNN where it applies) against
               the XLA reference in fp32 at highest matmul precision: out and dq/dk/dv of dense and causal GQA,
               packed rows, packed rows with spans, MQA, head dim 72 at an odd length, cross-attention with own
               kv segments, a decode step; bf16 (and fp32 for two cases)
  attention    scripts/bench_attention.py's headline rows: d128 bf16 non-causal 4k/8k/16k, fwd and fwd+bwd,
               pallas vs cudnn vs xla, and the packed 8 docs / 8k row against cuDNN on the padded batch
  train        a TUNA-2B-width train step (configs/tuna.py:2b, reduced depth) with Pallas and with XLA
               attention: step time and MFU (scripts/bench_train.py's `measure`)
  sampling     one guided Euler step of TUNA-2B-width text-to-image (4 images, 32x32 latent tokens, 2 branches)

A kernel family whose correctness cases all pass on a device may be added to kernels/attention.py PROVEN (and
docs/performance.md, "Proven backends"); the report prints the line.

  python scripts/device_check.py --out device_check             # GPU/TPU: < 8 min on one H100/H200
  python scripts/device_check.py --dry-run --out /tmp/dc        # CPU, tiny shapes, kernels in interpret mode
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from unimm_jax import kernels, schema  # noqa: E402
from unimm_jax.data import packing  # noqa: E402
from unimm_jax.data import tuna_sequences as ts  # noqa: E402
from unimm_jax.kernels import segments  # noqa: E402

FAMILIES = {"gpu": ("pallas_gpu",), "tpu": ("pallas_tpu",), "cpu": ("pallas_gpu",)}  # cpu: the dry run
# On CPU (the dry run) the kernels interpret into large while loops that XLA optimises longer than they run.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
# Relative error (max |diff| / max |ref|) a backend may show against the fp32 reference: twice XLA's own in
# the same dtype, or this floor (bf16 rounding; TF32 dots of fp32 inputs on GPU), whichever is larger.
# A wrong mask or a race gives errors of order 1.
FLOOR = {"bfloat16": 3e-2, "float32": 1e-2}
GOALS = dict(forward_tflops=400.0, backward_tflops=250.0, train_mfu=0.40)  # issue 30, H100/H200 bf16 d128


# =============================================================================================
# Correctness
# =============================================================================================

@dataclasses.dataclass(frozen=True)
class Case:
  """One attention problem: q [b t h e], k/v [b s k e] and its ids."""

  name: str
  b: int
  t: int
  s: int
  h: int
  kh: int
  e: int
  causal: bool = False
  packed: bool = False     # several documents per row and a padding tail
  spans: bool = False      # a bidirectional span inside each document (causal only)
  decode: bool = False     # t = 1 over a cache filled to a different length per row
  fp32: bool = False       # also checked in fp32

  def masked(self) -> bool:
    return self.packed or self.spans or self.decode


def cases(dry_run: bool) -> list[Case]:
  if dry_run:  # interpret mode on CPU: tiny, one case per way of building the ids
    return [Case("dense GQA 2", 2, 40, 40, 4, 2, 16),
            Case("packed causal + spans, MQA", 2, 48, 48, 4, 1, 24, causal=True, packed=True, spans=True),
            Case("cross-attention, own kv segments", 2, 24, 56, 4, 2, 16, packed=True),
            Case("decode over a partly filled cache", 2, 1, 48, 4, 2, 16, decode=True)]
  return [
      Case("dense GQA 4", 2, 2048, 2048, 16, 4, 128),
      Case("causal GQA 4", 2, 2048, 2048, 16, 4, 128, causal=True, fp32=True),
      Case("packed causal, 8 docs + padding", 2, 2048, 2048, 16, 4, 128, causal=True, packed=True),
      Case("packed causal + spans", 2, 2048, 2048, 16, 4, 128, causal=True, packed=True, spans=True, fp32=True),
      Case("packed bidirectional MQA, head dim 64", 2, 2048, 2048, 16, 1, 64, packed=True),
      Case("head dim 72, odd length 1000 (SigLIP)", 2, 1000, 1000, 16, 16, 72, packed=True),
      Case("cross-attention, own kv segments", 2, 500, 1777, 16, 4, 128, packed=True),
      Case("decode over a partly filled cache", 8, 1, 4096, 16, 4, 128, decode=True),
  ]


def _documents(rng, length: int, docs: int) -> list[int]:
  """`docs` lengths filling ~95% of `length` (the rest is padding)."""
  used = int(length * 0.95)
  cuts = np.sort(rng.choice(np.arange(1, used), docs - 1, replace=False))
  return np.diff(np.concatenate([[0], cuts, [used]])).tolist()


def case_inputs(case: Case, seed: int = 0) -> tuple[tuple[jax.Array, ...], dict, jax.Array]:
  """-> ((q, k, v) fp32, attention ids kwargs, output cotangent w) for `case`."""
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((case.b, case.t, case.h, case.e))
  k, v = rng.standard_normal((2, case.b, case.s, case.kh, case.e))
  kw: dict = dict(causal=case.causal)
  if case.packed:
    q_docs = [_documents(rng, case.t, 8 if case.t >= 64 else 3) for _ in range(case.b)]
    kw["segment_ids"] = np.stack([segments.segment_ids_from_lengths(d, case.t) for d in q_docs])
    if case.s != case.t:  # as many kv documents, of other lengths
      kv_docs = [_documents(rng, case.s, len(d)) for d in q_docs]
      kw["kv_segment_ids"] = np.stack([segments.segment_ids_from_lengths(d, case.s) for d in kv_docs])
    if case.spans:
      spans = [[(a + n // 4, a + 3 * n // 4) for a, n in zip(np.cumsum([0, *d[:-1]]), d) if n >= 4] for d in q_docs]
      kw["span_ids"] = np.stack([segments.span_ids_from_spans(sp, case.t) for sp in spans])
  if case.decode:
    filled = rng.integers(1, case.s + 1, case.b)
    kw["segment_ids"] = np.ones((case.b, 1), np.int32)
    kw["kv_segment_ids"] = (np.arange(case.s)[None] < filled[:, None]).astype(np.int32)
  kw = {name: jnp.asarray(x, jnp.int32) if name != "causal" else x for name, x in kw.items()}
  w = rng.standard_normal(q.shape)
  return tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v)), kw, jnp.asarray(w, jnp.float32)


def out_and_grads(impl: str, q, k, v, w, kw) -> tuple[jax.Array, ...]:
  """(out, dq, dk, dv) in fp32 for the cotangent w, jitted."""
  def fn(q, k, v):
    out, vjp = jax.vjp(lambda q, k, v: kernels.attention(q, k, v, impl=impl, **kw), q, k, v)
    return (out, *vjp(w.astype(out.dtype)))
  options = FAST_COMPILE if jax.default_backend() == "cpu" else None
  return tuple(x.astype(jnp.float32) for x in jax.jit(fn, compiler_options=options)(q, k, v))


def relative_errors(got, want) -> dict[str, float]:
  return {name: float(jnp.max(jnp.abs(g - r)) / max(float(jnp.max(jnp.abs(r))), 1e-30))
          for name, g, r in zip(("out", "dq", "dk", "dv"), got, want)}


def check_case(case: Case, impl: str, dtype: str) -> dict:
  """Runs `impl` on `case` in `dtype`; -> the errors of it and of XLA in the same dtype vs the fp32 reference."""
  (q, k, v), kw, w = case_inputs(case)
  q, k, v = (x.astype(dtype) for x in (q, k, v))
  with jax.default_matmul_precision("highest"):
    want = out_and_grads("xla", *(x.astype(jnp.float32) for x in (q, k, v)), w, kw)
  baseline = relative_errors(out_and_grads("xla", q, k, v, w, kw), want)
  got = out_and_grads(impl, q, k, v, w, kw)
  errors = relative_errors(got, want)
  finite = all(bool(jnp.all(jnp.isfinite(x))) for x in got)
  passed = finite and all(errors[n] <= max(2 * baseline[n], FLOOR[dtype]) for n in errors)
  return dict(case=case.name, impl=impl, dtype=dtype, errors=errors, xla_errors=baseline, finite=finite,
              passed=passed)


def correctness(dry_run: bool, deadline: float) -> dict:
  families = FAMILIES[jax.default_backend()]
  cudnn = ("cudnn",) if jax.default_backend() == "gpu" else ()
  results = []
  for case in cases(dry_run):
    for dtype in ("float32",) if dry_run else ("bfloat16", "float32") if case.fp32 else ("bfloat16",):
      for impl in families + (cudnn if not case.masked() and dtype == "bfloat16" else ()):
        if time.monotonic() > deadline:
          results.append(dict(case=case.name, impl=impl, dtype=dtype, skipped="time budget spent"))
          continue
        try:
          results.append(check_case(case, impl, dtype))
        except Exception as err:  # a kernel that does not compile is a failed case, recorded
          results.append(dict(case=case.name, impl=impl, dtype=dtype, passed=False, error=_short(err)))
        print(f"  {_case_line(results[-1])}", flush=True)
  verdict = {impl: all(r.get("passed") for r in results if r["impl"] == impl)
             for impl in families + cudnn}
  return dict(cases=results, passed=verdict)


# =============================================================================================
# Attention benchmark, train step, sampling step
# =============================================================================================

def attention(dry_run: bool) -> dict:
  import bench_attention
  argv = (["--tiny", "--seqs", "64", "--iters", "1", "--packed-len", "0", "--causal", "0", "--impls", "pallas"]
          if dry_run else ["--seqs", "4096,8192,16384", "--head-dims", "128", "--causal", "0", "--iters", "5"])
  rows = []
  for row in bench_attention.main(argv):
    result = row["result"]
    rows.append(dict(case=row["case"], pass_=row["pass_"], impl=row["impl"],
                     **({"error": result} if isinstance(result, str) else {"ms": result[0], "tflops": result[1]})))
  for row in rows:  # backward alone: the fwd+bwd time minus the forward's, 2.5x the forward's FLOPs
    fwd = next((r for r in rows if r["pass_"] == "fwd" and r["case"] == row["case"] and r["impl"] == row["impl"]
                and "ms" in r), None)
    if row["pass_"] == "fwd+bwd" and "ms" in row and fwd and row["ms"] > fwd["ms"]:
      row["backward_tflops"] = 2.5 * fwd["tflops"] * fwd["ms"] / (row["ms"] - fwd["ms"])
  return dict(argv=argv, rows=rows)


def tuna_config(dry_run: bool, impl: str, batch: int):
  """configs/tuna.py:2b at 4 LLM / 4 head / 2 SigLIP layers (tiny at depth 1 on a dry run), attention `impl`."""
  from configs import tuna as tuna_configs
  config = tuna_configs.get_config("tiny" if dry_run else "2b")
  if dry_run:
    config.model.llm.depth, config.model.head.depth = 1, 1
  else:
    config.model.llm.depth, config.model.head.depth, config.model.siglip.depth = 4, 4, 3  # feature_layer -2: 2 run
  for tower in ("llm", "head", "siglip"):
    if config.model.get(tower) is not None:
      config.model[tower].attention_impl = impl
  config.batch_size = batch
  config.optim.warmup_steps = 1
  return config


TOKENS = ts.TunaTokens(bos=1, eos=2, boi=3, eoi=4, image_pad=5)  # random-init models: any distinct ids
CONFIG_NAME = {False: "configs/tuna.py:2b at llm 4, head 4, siglip 2 layers", True: "configs/tuna.py:tiny at depth 1"}


def tuna_batches(cfg, batch: int, seq_len: int, max_spans: int, grid: tuple[int, int]):
  """Endless batches of packed text-to-image rows: a random prompt and a random `grid` image each."""
  rng = np.random.default_rng(0)
  while True:
    rows = [packing.pack_row([ts.t2i_sample(rng.integers(10, cfg.llm.vocab, 24).tolist(),
                                            rng.standard_normal((*grid, cfg.token_features)).astype(np.float32),
                                            TOKENS)], seq_len) for _ in range(batch)]
    yield ts.to_batch(rows, max_spans, cfg.token_features)


def train(dry_run: bool, impls: list[str], batch: int, steps: int) -> dict:
  import bench_train

  from unimm_jax.training import tuna_task
  runs = {}
  for impl in impls:
    config = tuna_config(dry_run, impl, batch)
    cfg = tuna_task.config_from(config)
    batches = tuna_batches(cfg, batch, int(config.data.seq_len), int(config.data.max_spans),
                           (4, 4) if dry_run else (32, 32))
    try:
      cpu = jax.default_backend() == "cpu"  # the dry run: one device, a fast compile, no peak measurement
      if cpu:
        config.peak_tflops = 1.0
      runs[impl] = bench_train.measure(config, batches, steps, FAST_COMPILE if cpu else None,
                                       jax.devices()[:1] if cpu else None)
    except Exception as err:
      runs[impl] = dict(error=_short(err))
    print(f"  train attention={impl}: {runs[impl]}", flush=True)
  return dict(config=CONFIG_NAME[dry_run], runs=runs)


def sampling(dry_run: bool, impls: list[str], images: int, steps: int) -> dict:
  import flax.linen as nn

  from unimm_jax.models import tuna
  from unimm_jax.sampling import tuna as tuna_sampling
  from unimm_jax.training import tuna_task
  grid = (4, 4) if dry_run else (32, 32)
  runs = {}
  for impl in impls:
    try:
      cfg = tuna_task.config_from(tuna_config(dry_run, impl, 1))
      module = tuna.Tuna(cfg)
      inputs = schema.example_inputs(cfg.token_features, 16, 1)
      params = nn.meta.unbox(jax.jit(module.init)(jax.random.key(0), inputs)["params"])
      sampler = tuna_sampling.TunaSampler(module, params, TOKENS)
      prompts = [list(range(10 + i, 34 + i)) for i in range(images)]
      start = time.perf_counter()
      sampler.text_to_image(prompts, grid, tuna_sampling.FlowSamplerConfig(steps=2))  # compiles; one step
      compile_s = time.perf_counter() - start
      start = time.perf_counter()
      sampler.text_to_image(prompts, grid, tuna_sampling.FlowSamplerConfig(steps=steps + 1))
      step_s = (time.perf_counter() - start) / steps
      runs[impl] = dict(step_ms=1e3 * step_s, first_call_s=compile_s, images=images, grid=list(grid),
                        branches=2, steps=steps)
    except Exception as err:
      runs[impl] = dict(error=_short(err))
    print(f"  sampling attention={impl}: {runs[impl]}", flush=True)
  return dict(config=CONFIG_NAME[dry_run], guidance=7.5, runs=runs)


def environment() -> dict:
  import flax
  import jaxlib
  dev = jax.devices()[0]
  backend = jax.extend.backend.get_backend()

  def git(*args):
    try:
      return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
      return ""
  return dict(device_kind=dev.device_kind, device_count=jax.device_count(), platform=dev.platform,
              platform_version=backend.platform_version, compute_capability=getattr(dev, "compute_capability", None),
              python=platform.python_version(), jax=jax.__version__, jaxlib=jaxlib.__version__,
              flax=flax.__version__, commit=git("rev-parse", "--short", "HEAD"), dirty=bool(git("status", "--porcelain")),
              date=datetime.date.today().isoformat())


# =============================================================================================
# Report
# =============================================================================================

def _short(err: BaseException) -> str:
  lines = traceback.format_exception_only(type(err), err)
  return "".join(lines).strip()[:1500]


def _case_line(r: dict) -> str:
  head = f"{r['case']:<40} {r['impl']:<10} {r['dtype']:<8}"
  if "skipped" in r or "error" in r:
    return f"{head} {r.get('skipped') or 'ERROR ' + r['error'].splitlines()[0][:200]}"
  errs = " ".join(f"{n} {e:.1e}" for n, e in r["errors"].items())
  return f"{head} {'pass' if r['passed'] else 'FAIL'}  {errs}  (xla {max(r['xla_errors'].values()):.1e})"


def goals(report: dict) -> list[dict]:
  """The issue's targets against what this run measured (None: not measured)."""
  out = []
  rows = report["sections"].get("attention", {}).get("result", {}).get("rows", [])
  pallas = [r for r in rows if r["impl"] == "pallas" and not r["case"].startswith("packed") and "ms" in r]
  fwd = [r["tflops"] for r in pallas if r["pass_"] == "fwd"]
  bwd = [r["backward_tflops"] for r in pallas if "backward_tflops" in r]
  out.append(dict(goal=f"forward >= {GOALS['forward_tflops']:.0f} TFLOP/s (d128 bf16 non-causal, seq >= 4k)",
                  measured=min(fwd) if fwd else None, met=bool(fwd) and min(fwd) >= GOALS["forward_tflops"]))
  out.append(dict(goal=f"backward >= {GOALS['backward_tflops']:.0f} TFLOP/s", measured=min(bwd) if bwd else None,
                  met=bool(bwd) and min(bwd) >= GOALS["backward_tflops"]))
  packed = {(r["impl"], r["pass_"]): r["ms"] for r in rows if r["case"].startswith("packed") and "ms" in r}
  ratio = packed.get(("cudnn", "fwd+bwd"), 0) / packed[("pallas", "fwd+bwd")] if ("pallas", "fwd+bwd") in packed \
      and ("cudnn", "fwd+bwd") in packed else None
  out.append(dict(goal="packed 8 docs row (pallas) faster than cuDNN on the padded batch, fwd+bwd",
                  measured=ratio, met=ratio is not None and ratio > 1))
  mfu = report["sections"].get("train", {}).get("result", {}).get("runs", {}).get("pallas", {}).get("mfu")
  out.append(dict(goal=f"TUNA-2B-width train step >= {GOALS['train_mfu']:.0%} MFU (Pallas attention)",
                  measured=mfu, met=mfu is not None and mfu >= GOALS["train_mfu"]))
  return out


def markdown(report: dict) -> str:
  env = report["sections"].get("environment", {}).get("result", {})
  lines = [f"# Device check: {env.get('device_kind', '?')} x {env.get('device_count', '?')}", "",
           f"{report['mode']}; started {report['started']}; {report['elapsed_s']:.0f} s.", "",
           "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in env.items()], ""]
  for name, section in report["sections"].items():
    if "error" in section:
      lines += [f"## {name}: ERROR ({section['seconds']:.0f} s)", "", "```", section["error"], "```", ""]
  corr = report["sections"].get("correctness", {}).get("result")
  if corr:
    lines += ["## Correctness (relative max error vs the fp32 reference; XLA in the same dtype for scale)", "",
              "| case | impl | dtype | out | dq | dk | dv | xla worst | verdict |", "|---|---|---|---|---|---|---|---|---|"]
    for r in corr["cases"]:
      if "errors" in r:
        errs = " | ".join(f"{e:.1e}" for e in r["errors"].values())
        lines.append(f"| {r['case']} | {r['impl']} | {r['dtype']} | {errs} | {max(r['xla_errors'].values()):.1e} | "
                     f"{'pass' if r['passed'] else '**FAIL**'} |")
      else:
        lines.append(f"| {r['case']} | {r['impl']} | {r['dtype']} | | | | | | {r.get('skipped') or '**ERROR**'} |")
    lines += ["", "Families: " + ", ".join(f"{k} {'passed' if v else 'FAILED'}" for k, v in corr["passed"].items()), ""]
    for line in report.get("proven_lines", []):
      lines += [f"Add to kernels/attention.py PROVEN: `{line}`", ""]
  att = report["sections"].get("attention", {}).get("result")
  if att:
    lines += ["## Attention (scripts/bench_attention.py " + " ".join(att["argv"]) + ")", "",
              "| case | pass | impl | ms | TFLOP/s | backward TFLOP/s |", "|---|---|---|---|---|---|"]
    for r in att["rows"]:
      num = (f"{r['ms']:.3f} | {r['tflops']:.1f} | " + (f"{r['backward_tflops']:.1f}" if "backward_tflops" in r
                                                         else "")) if "ms" in r else f"| | {r['error'][:80]}"
      lines.append(f"| {r['case']} | {r['pass_']} | {r['impl']} | {num} |")
    lines.append("")
  for name in ("train", "sampling"):
    sec = report["sections"].get(name, {}).get("result")
    if sec:
      lines += [f"## {name} ({sec['config']})", "", "```", json.dumps(sec["runs"], indent=1, default=str), "```", ""]
  if report["goals"] is not None:
    lines += ["## Goals (issue 30)", "", "| goal | measured | met |", "|---|---|---|"]
    lines += [f"| {g['goal']} | {'' if g['measured'] is None else format(g['measured'], '.3g')} | {g['met']} |"
              for g in report["goals"]]
  return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="device_check", help="folder for device_check.json / .md")
  p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, kernels in interpret mode")
  p.add_argument("--sections", default="environment,correctness,attention,train,sampling")
  p.add_argument("--budget-s", type=float, default=450.0, help="no section (or correctness case) starts after this")
  p.add_argument("--train-impls", default="pallas,xla", help="attention impls of the train and sampling steps")
  p.add_argument("--train-batch", type=int, default=16)
  p.add_argument("--train-steps", type=int, default=3)
  p.add_argument("--sample-images", type=int, default=4)
  p.add_argument("--sample-steps", type=int, default=4)
  args = p.parse_args(argv)
  if args.dry_run:  # the code paths at tiny sizes; XLA attention in the model steps (interpreted Pallas kernels
    # in a whole train step compile for half a minute; the model-level Pallas path is tests/test_kernels_qwen.py's)
    args.train_batch, args.train_steps, args.sample_images, args.sample_steps = 2, 1, 2, 1
    args.train_impls = "xla"
  elif jax.default_backend() == "cpu":
    p.error("no GPU or TPU here: run with --dry-run (tiny shapes, interpret mode)")
  start = time.monotonic()
  deadline = start + args.budget_s
  impls = args.train_impls.split(",")
  report = dict(mode="dry run (CPU, tiny shapes, interpret mode)" if args.dry_run else "device run",
                started=datetime.datetime.now().isoformat(timespec="seconds"), elapsed_s=0.0, sections={})
  runners = dict(environment=environment, correctness=lambda: correctness(args.dry_run, deadline),
                 attention=lambda: attention(args.dry_run),
                 train=lambda: train(args.dry_run, impls, args.train_batch, args.train_steps),
                 sampling=lambda: sampling(args.dry_run, impls, args.sample_images, args.sample_steps))
  os.makedirs(args.out, exist_ok=True)
  for name in args.sections.split(","):
    if name not in runners:
      p.error(f"--sections: unknown section {name!r}; choose from {sorted(runners)}")
    print(f"== {name}", flush=True)
    t = time.monotonic()
    if t > deadline:
      report["sections"][name] = dict(skipped="time budget spent", seconds=0.0)
    else:
      try:
        report["sections"][name] = dict(result=runners[name]())
      except Exception as err:  # recorded; the next section still runs
        report["sections"][name] = dict(error=_short(err))
      report["sections"][name]["seconds"] = time.monotonic() - t
    corr = report["sections"].get("correctness", {}).get("result")
    env = report["sections"].get("environment", {}).get("result", {})
    report["proven_lines"] = [] if args.dry_run or not corr else [
        f'("{impl}", "{env.get("device_kind")}"): "{env.get("date")}, {env.get("commit")}"'
        for impl, ok in corr["passed"].items() if ok and impl.startswith("pallas")]
    report["goals"] = None if args.dry_run else goals(report)  # CPU numbers say nothing about the goals
    report["elapsed_s"] = time.monotonic() - start
    with open(os.path.join(args.out, "device_check.json"), "w") as f:
      json.dump(report, f, indent=1, default=str)
    with open(os.path.join(args.out, "device_check.md"), "w") as f:
      f.write(markdown(report))
  print(f"wrote {args.out}/device_check.json and .md in {report['elapsed_s']:.0f} s")
  return report


if __name__ == "__main__":
  main()
