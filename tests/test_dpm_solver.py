"""DPM-Solver++ multistep on flow sigmas against diffusers' DPMSolverMultistepScheduler: every step within 1e-5."""

import json

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from unimm_jax.sampling import diffusion, dpm_solver, schedulers

NAME = "DPMSolverMultistepScheduler"
SANA = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)   # SANA's scheduler_config
OPTIONS = {
    "sana": dict(),
    "heun": dict(solver_type="heun", flow_shift=1.0),
    "no_lower_order_final": dict(lower_order_final=False, flow_shift=6.0),
    "first_order": dict(solver_order=1),
    "euler_at_final": dict(euler_at_final=True, flow_shift=2.0),
}


def reference(**kw) -> diffusers.DPMSolverMultistepScheduler:
  return diffusers.DPMSolverMultistepScheduler(**{**SANA, **kw})


def config_of(ref) -> dict:
  return {**dict(ref.config), "_class_name": NAME}


def run_both(ref, ours, steps: int, seed: int = 0):
  """Both schedulers on the same random model outputs; yields (ours, diffusers) samples after every step."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, 4, 6, 3)).astype(np.float32)
  ref_x, our_x, state = torch.from_numpy(x.copy()), jnp.asarray(x), ours.init(jnp.asarray(x))
  step = jax.jit(ours.step)
  for i, t in enumerate(ref.timesteps):
    out = rng.standard_normal(x.shape).astype(np.float32)
    ref_x = ref.step(torch.from_numpy(out), t, ref_x).prev_sample
    our_x, state = step(state, jnp.asarray(out), jnp.int32(i), our_x)
    yield np.asarray(our_x), ref_x.numpy()


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("steps", [1, 2, 5, 20])
def test_every_step_matches_diffusers(options, steps):
  ref = reference(**options)
  ref.set_timesteps(steps)
  ours = schedulers.from_config(config_of(ref), steps)
  np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
  np.testing.assert_array_equal(ours.sigmas, ref.sigmas.numpy())
  for i, (got, want) in enumerate(run_both(ref, ours, steps)):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=f"step {i} of {steps}")


def test_dynamic_shift_mu_matches_diffusers():
  ref = reference(use_dynamic_shifting=True)
  ref.set_timesteps(8, mu=0.7)
  ours = dpm_solver.DPMSolverMultistep.from_config(config_of(ref), 8, mu=0.7)
  np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
  for got, want in run_both(ref, ours, 8):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match="mu=0.7 needs use_dynamic_shifting=True"):
    dpm_solver.DPMSolverMultistep.from_config(config_of(reference()), 8, mu=0.7)


def test_reads_a_saved_scheduler_directory(tmp_path):
  reference().save_config(tmp_path)
  ours = schedulers.from_config(str(tmp_path), 20)
  assert isinstance(ours, dpm_solver.DPMSolverMultistep)
  assert ours.timesteps[0] == 999 and ours.sigmas[-1] == 0 and len(ours.sigmas) == 21


def test_unknown_missing_and_unsupported_fields_are_named(tmp_path):
  cfg = config_of(reference())
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['flow_shfit'\]"):
    schedulers.from_config({**cfg, "flow_shfit": 3.0}, 20)
  del cfg["flow_shift"]
  (tmp_path / "scheduler_config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=r"missing field\(s\) \['flow_shift'\]"):
    schedulers.from_config(str(tmp_path), 20)
  cfg = config_of(reference())
  for key, value in (("prediction_type", "epsilon"), ("solver_order", 3), ("use_flow_sigmas", False),
                     ("final_sigmas_type", "sigma_min"), ("thresholding", True), ("use_karras_sigmas", True)):
    with pytest.raises(NotImplementedError, match=f"{key}={value!r} is not supported"):
      schedulers.from_config({**cfg, key: value}, 20)


def test_denoise_traces_one_step_for_all_steps():
  ours = schedulers.from_config(config_of(reference()), 6)
  traces = []

  def model_fn(params, x, t, cond):
    traces.append(t)       # runs only while tracing
    return params * x + cond

  x0 = jnp.ones((1, 2, 2, 3))
  seen = []
  out = diffusion.denoise(model_fn, jnp.float32(0.5), ours, x0, jnp.float32(0.1), progress=True,
                          on_step=lambda i, x: seen.append(i))
  assert len(traces) == 1 and seen == list(range(6)) and out.shape == x0.shape
