"""FlowMatchEuler against diffusers' FlowMatchEulerDiscreteScheduler: the grid and every step's sample, for the
FLUX / SD3 configs and every option the scheduler has; and clear errors for bad configs and options."""

import json

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.pipelines.flux import pipeline_flux
from diffusers.schedulers import scheduling_flow_match_euler_discrete as reference

from flux_tiny import FLUX_DEV_SCHEDULER, FLUX_SCHNELL_SCHEDULER
from unimm_jax.sampling import schedulers
from unimm_jax.sampling.diffusion import denoise
from unimm_jax.sampling.flow_match_euler import FlowMatchEuler, calculate_shift

CASES = [  # (config, steps, set_timesteps options)
    (FLUX_DEV_SCHEDULER, 28, dict(mu=0.8)),
    (FLUX_DEV_SCHEDULER, 4, dict(mu=1.15, sigmas=list(np.linspace(1.0, 1 / 4, 4)))),   # what FluxPipeline passes
    (FLUX_SCHNELL_SCHEDULER, 4, dict(sigmas=list(np.linspace(1.0, 1 / 4, 4)))),
    (dict(shift=3.0), 10, {}),                                                          # SD3
    (dict(shift=3.0, use_dynamic_shifting=True, time_shift_type="linear"), 7, dict(mu=1.3)),
    (dict(shift=2.0, shift_terminal=0.1), 9, {}),
    (dict(shift=3.0, use_karras_sigmas=True), 9, {}),
    (dict(shift=3.0, use_exponential_sigmas=True), 9, {}),
    (dict(shift=3.0, use_beta_sigmas=True), 9, {}),
    (dict(shift=3.0, invert_sigmas=True), 6, {}),
    (dict(shift=2.0, num_train_timesteps=500), 5, dict(timesteps=[450.0, 350.0, 250.0, 150.0, 50.0])),
    (dict(shift=1.0), 1, {}),
]


def _reference(config, steps, options):
  ref = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
  ref.set_timesteps(steps, **options)
  return ref


@pytest.mark.parametrize("config,steps,options", CASES, ids=[f"{i}" for i in range(len(CASES))])
def test_grid_and_every_step_match_diffusers(config, steps, options):
  ref = _reference(config, steps, options)
  ours = schedulers.from_config({"_class_name": "FlowMatchEulerDiscreteScheduler", **config}, steps, **options)
  np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), atol=1e-6, rtol=0)
  np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), atol=1e-3, rtol=0)   # sigma x 1000
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 12, 8)).astype(np.float32)
  xt, xj, state = torch.from_numpy(x), jnp.asarray(x), ours.init(jnp.asarray(x))
  step = jax.jit(ours.step)
  for i, t in enumerate(ref.timesteps):
    out = rng.standard_normal(x.shape).astype(np.float32)
    xt = ref.step(torch.from_numpy(out), t, xt).prev_sample
    xj, state = step(state, jnp.asarray(out), jnp.int32(i), xj)
    np.testing.assert_allclose(xj, xt.numpy(), atol=1e-5, rtol=0, err_msg=f"step {i}")


def test_denoise_loop_with_a_model_matches_the_diffusers_loop_step_by_step():
  steps, mu = 6, 0.9
  ref = _reference(FLUX_DEV_SCHEDULER, steps, dict(mu=mu))
  ours = FlowMatchEuler.from_config(FLUX_DEV_SCHEDULER, steps, mu=mu)
  x = np.random.default_rng(1).standard_normal((1, 16, 4)).astype(np.float32)
  model = lambda x, t, w: np.sin(3 * x + t / 1000) * w  # noqa: E731   any function of (x, t), same on both sides
  want, xt = [], torch.from_numpy(x)
  for t in ref.timesteps:
    xt = ref.step(torch.from_numpy(model(xt.numpy(), t.numpy(), 1.5)), t, xt).prev_sample
    want.append(xt.numpy())
  got = []
  denoise(lambda p, x, t, c: jnp.sin(3 * x + t / 1000) * p, jnp.float32(1.5), ours, jnp.asarray(x),
          on_step=lambda i, x: got.append(np.asarray(x)))
  assert len(got) == steps
  for i, (g, w) in enumerate(zip(got, want)):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=0, err_msg=f"step {i}")


def test_stochastic_sampling_renoises_the_clean_prediction_as_diffusers(monkeypatch):
  config, steps = dict(shift=3.0, stochastic_sampling=True), 4
  rng = jax.random.key(7)
  ours = FlowMatchEuler.from_config(config, steps, rng=rng)
  x = np.random.default_rng(2).standard_normal((2, 6)).astype(np.float32)
  noises, key = [], rng
  for _ in range(steps):   # the keys our state walks through
    key, sub = jax.random.split(key)
    noises.append(np.asarray(jax.random.normal(sub, x.shape, jnp.float32)))
  monkeypatch.setattr(reference, "randn_tensor", lambda shape, **kw: torch.from_numpy(np.array(noises.pop(0))))
  ref = _reference(config, steps, {})
  xt, xj, state = torch.from_numpy(x), jnp.asarray(x), ours.init(jnp.asarray(x))
  outs = np.random.default_rng(3).standard_normal((steps, *x.shape)).astype(np.float32)
  for i, t in enumerate(ref.timesteps):
    xt = ref.step(torch.from_numpy(outs[i]), t, xt).prev_sample
    xj, state = ours.step(state, jnp.asarray(outs[i]), jnp.int32(i), xj)
    np.testing.assert_allclose(xj, xt.numpy(), atol=1e-5, rtol=0)
  assert not noises
  with pytest.raises(ValueError, match="stochastic_sampling needs the option rng"):
    FlowMatchEuler.from_config(config, steps)


def test_dynamic_shift_from_the_sequence_length_is_fluxs_calculate_shift(tmp_path):
  for n in (64, 256, 1024, 4096):
    assert calculate_shift(n) == pytest.approx(pipeline_flux.calculate_shift(n), abs=1e-12)
  by_len = FlowMatchEuler.from_config(FLUX_DEV_SCHEDULER, 8, image_seq_len=1024)
  by_mu = FlowMatchEuler.from_config(FLUX_DEV_SCHEDULER, 8, mu=pipeline_flux.calculate_shift(1024))
  np.testing.assert_array_equal(by_len.sigmas, by_mu.sigmas)
  (tmp_path / "scheduler_config.json").write_text(json.dumps(FLUX_DEV_SCHEDULER))   # a diffusers scheduler folder
  from_dir = schedulers.from_config(str(tmp_path), 8, image_seq_len=1024)
  np.testing.assert_array_equal(from_dir.timesteps, by_len.timesteps)


@pytest.mark.parametrize("config,options,match", [
    (FLUX_DEV_SCHEDULER, dict(mu=1.0, guidance=3), r"unknown scheduler options \['guidance'\]"),
    ({**FLUX_DEV_SCHEDULER, "use_flow_sigmas": True}, dict(mu=1.0), r"fields \['use_flow_sigmas'\]"),
    (FLUX_DEV_SCHEDULER, {}, "use_dynamic_shifting is set; pass the option mu or image_seq_len"),
    (FLUX_DEV_SCHEDULER, dict(mu=1.0, image_seq_len=256), "mu or image_seq_len, not both"),
    ({**FLUX_DEV_SCHEDULER, "base_shift": None}, dict(image_seq_len=256), r"fields \['base_shift'\]"),
    (FLUX_SCHNELL_SCHEDULER, dict(sigmas=[1.0, 0.5]), "sigmas has 2 values for num_inference_steps=3"),
    (dict(use_karras_sigmas=True, use_beta_sigmas=True), {}, "at most one of"),
    (dict(time_shift_type="cosine"), {}, "time_shift_type 'cosine'"),
])
def test_bad_config_fields_and_options_are_named(config, options, match):
  with pytest.raises(ValueError, match=match):
    FlowMatchEuler.from_config(config, 3, **options)


def test_missing_class_name_or_config_file_is_named(tmp_path):
  with pytest.raises(ValueError, match="scheduler _class_name None is not one of"):
    schedulers.from_config({"shift": 3.0}, 4)
  with pytest.raises(ValueError, match="no scheduler_config.json"):
    schedulers.from_config(str(tmp_path), 4)
