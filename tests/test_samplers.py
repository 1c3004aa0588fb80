"""Sampler conventions: DDIM timestep tables and their guard, the DDPM
variances, the sampler options of configs and `genimg sample`, and parity
with diffusers' schedulers (a reference nobody here wrote).

The parity tests need torch and diffusers (the `test` and `parity` extras)
and skip without them; CI sets GENIMG_REQUIRE_PARITY=1, so there a missing
one fails instead. The DDPM and DDIM steps run diffusers' formulas in float64
(its linear schedule rebuilt in float64, see `_in_float64`) against ours in
float32 with coefficients computed in float64; the flow solvers and the
schedules compare with diffusers' float32. The tolerances (1e-5 relative,
1e-6 to 1e-5 absolute on values of order 1) hold on any x86-64 CPU and are
far below what a wrong formula (a swapped variance, a grid off by one, an eps
not recomputed from the clipped x0) changes.
"""

import fractions
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genimg_jax import config as config_lib, diffusion, samplers
from conftest import REPO


@pytest.fixture(scope="module")
def reference():
  """(torch, diffusers' schedulers module), or a skip without them."""
  if os.environ.get("GENIMG_REQUIRE_PARITY"):
    import torch  # pylint: disable=g-import-not-at-top
    import diffusers.schedulers as schedulers  # pylint: disable=g-import-not-at-top
  else:
    torch = pytest.importorskip("torch")
    schedulers = pytest.importorskip("diffusers.schedulers")
  return torch, schedulers


def _config(experiment="ddpm.py"):
  return config_lib.load_config_file(os.path.join(REPO, "experiments",
                                                  experiment))


# --- DDIM timestep tables ---------------------------------------------------


@pytest.mark.parametrize("T", [100, 1000])
def test_trailing_timesteps_for_every_step_count(T):
  """For every S in 1..T: S + 1 steps, strictly decreasing, from T - 1 to -1,
  each round(T (S - i) / S) - 1 with exact ties to even. (The float formula
  np.round(np.arange(T, 0, -T / S)) kept a last element of about 1e-12 for
  62 of the S at T = 1000, S = 61 first: a table ending 15, -1, -1.)"""
  for S in range(1, T + 1):
    ts = samplers.ddim_timesteps(T, S)
    assert ts.dtype == np.int32 and len(ts) == S + 1, S
    assert ts[0] == T - 1 and ts[-1] == -1, S
    assert np.all(np.diff(ts) < 0), S
    expected = [round(fractions.Fraction((S - i) * T, S)) - 1
                for i in range(S)]
    np.testing.assert_array_equal(ts[:-1], expected, err_msg=str(S))
    samplers.check_ddim_timesteps(ts, T)  # The guard accepts it.


@pytest.mark.parametrize("T", [100, 1000])
def test_other_spacings_for_every_step_count(T):
  """leading: S steps (T // S) i, as diffusers' timestep_spacing="leading"
  (steps_offset 0); uniform: DDIM's range(0, T, T // S); quadratic: DDIM's
  int(c^2), c in linspace(0, sqrt(0.8 T), S), without repeats. All strictly
  decreasing to -1, within 0..T-1, accepted by the guard."""
  for S in range(1, T + 1):
    tables = {s: samplers.ddim_timesteps(T, S, s)
              for s in samplers.DDIM_SPACINGS}
    for spacing, ts in tables.items():
      assert ts[-1] == -1 and np.all(np.diff(ts) < 0), (spacing, S)
      assert 0 <= ts[-2] and ts[0] <= T - 1, (spacing, S)
      samplers.check_ddim_timesteps(ts, T)
    np.testing.assert_array_equal(
        tables["leading"], [(T // S) * i for i in range(S - 1, -1, -1)] + [-1])
    np.testing.assert_array_equal(
        tables["uniform"], list(range(0, T, T // S))[::-1] + [-1])
    ddim_quadratic = [int(c) for c in np.linspace(0, np.sqrt(T * 0.8), S) ** 2]
    np.testing.assert_array_equal(
        tables["quadratic"], sorted(set(ddim_quadratic), reverse=True) + [-1])
    if T % S == 0:
      np.testing.assert_array_equal(tables["leading"], tables["uniform"])


def test_spacings_by_hand():
  np.testing.assert_array_equal(samplers.ddim_timesteps(1000, 10, "leading"),
                                [900, 800, 700, 600, 500, 400, 300, 200, 100,
                                 0, -1])
  # DDIM's CIFAR-10 table for 10 steps (from 0.8 T = 800).
  np.testing.assert_array_equal(
      samplers.ddim_timesteps(1000, 10, "quadratic"),
      [800, 632, 483, 355, 246, 158, 88, 39, 9, 0, -1])
  assert len(samplers.ddim_timesteps(1000, 300, "uniform")) == 334 + 1
  assert len(samplers.ddim_timesteps(1000, 300, "leading")) == 300 + 1
  with pytest.raises(ValueError, match="spacing 'linspace'"):
    samplers.ddim_timesteps(1000, 10, "linspace")


@pytest.mark.parametrize("timesteps,eta,match", [
    ([999, 15, -1, -1], 0.0, "strictly monotone"),  # The old S = 61 end.
    ([999, 500], 0.0, "down to -1"),  # Does not end at the clean image.
    ([1000, 500, -1], 0.0, "down to -1"),  # 1000 is outside 0..999.
    ([999, 5, -2], 0.0, "down to -1"),
    ([999, 1, 5, -1], 0.0, "strictly monotone"),
    ([0, 10, 20], 0.0, "down to -1"),  # Inversion must start at -1.
    ([-1, 10, 1000], 0.0, "down to -1"),
    ([-1, 10, 20], 1.0, "need eta = 0"),
    ([-1], 0.0, ">= 2 integers"),
    ([999.0, -1.0], 0.0, ">= 2 integers"),
])
def test_ddim_sample_refuses_bad_timestep_tables(timesteps, eta, match):
  ab = diffusion.linear_alpha_bars(1000)
  denoise_fn = lambda x, t: (x, x)
  with pytest.raises(ValueError, match=match):
    samplers.ddim_sample(denoise_fn, ab, jnp.zeros((1, 1, 1, 1)),
                         np.array(timesteps), eta, jax.random.key(0))


def _point_mass_network(value, settings):
  """The exact eps network for data always equal to `value`, defined on the
  schedule's steps 0..T-1 only (NaN at any other step, as a network's time
  outside its training range would be garbage): eps = (x - sqrt(ab) value)
  / sqrt(1 - ab). Records every time it is called at (host callback)."""
  tables = settings.sqrt_tables()
  calls = []

  def network(x, time_B):
    jax.debug.callback(lambda t: calls.append(int(t[0])), time_B,
                       ordered=True)
    t = time_B.astype(jnp.int32)
    valid = (t >= 0) & (t < settings.num_timesteps)  # jnp.take wraps -1.
    a, s = (diffusion.bcast(jnp.where(valid, table[t], jnp.nan), x)
            for table in tables)
    return (x - a * value) / s
  return network, calls


@pytest.mark.parametrize("spacing", samplers.DDIM_SPACINGS)
def test_ddim_61_steps_return_the_data_of_an_exact_model(spacing):
  """Data fixed at 0.3 and its exact eps network, through `generate` (the
  path of `genimg sample`): DDIM with 61 steps returns 0.3 exactly, and the
  network is called once per step of the table, never at -1. (With the old
  trailing table, 999, ..., 15, -1, -1, the last step called it at -1,
  which JAX wraps to 999.)"""
  settings = diffusion.Settings(objective="eps")
  network, calls = _point_mass_network(0.3, settings)
  apply_fn = lambda variables, x, time, labels: network(x, time)
  options = diffusion.SamplerOptions("ddim", 61, ddim_spacing=spacing)
  x_T = jax.random.normal(jax.random.key(0), (4, 2, 2, 1))
  out = diffusion.generate({}, x_T, None, jax.random.key(1),
                           apply_fn=apply_fn, settings=settings,
                           options=options)
  jax.effects_barrier()
  np.testing.assert_allclose(out, 0.3, atol=1e-5)
  assert min(calls) >= 0 and max(calls) <= 999
  assert calls == sorted(set(calls), reverse=True)  # Each step once.
  # uniform: range(0, 1000, 16) has 63 steps; quadratic: 2 of DDIM's 61
  # are repeats.
  assert len(calls) == {"uniform": 63, "quadratic": 59}.get(spacing, 61)
  assert calls == list(samplers.ddim_timesteps(1000, 61, spacing)[:-1])


def test_ddim_inversion_from_minus_1_calls_the_network_at_the_next_step():
  """Increasing steps from -1 encode (eta 0): the step t -> t' calls the
  network at t' only (diffusers' DDIMInverseScheduler), so the network
  never sees -1, and takes x0_hat from eps_hat at t: x' = sqrt(ab_t')
  x0_hat + sqrt(1 - ab_t') eps_hat, x0_hat = (x - sqrt(1 - ab_t) eps_hat) /
  sqrt(ab_t), ab_{-1} = 1 (here against that formula in float64)."""
  settings = diffusion.Settings(objective="eps")
  ab = settings.alpha_bars()
  network, calls = _point_mass_network(0.3, settings)
  denoise_fn = diffusion.make_denoise_fn(network, settings, clip=False)
  x0 = np.array([-0.5, 0.1, 0.9]).reshape(3, 1, 1, 1)
  ts = np.array([-1, 0, 250, 999])
  out = samplers.ddim_sample(denoise_fn, ab, jnp.asarray(x0, jnp.float32), ts)
  jax.effects_barrier()
  assert calls == [0, 250, 999]
  x, ab_now = x0, 1.0
  for t in ts[1:]:
    eps = (x - np.sqrt(ab[t]) * 0.3) / np.sqrt(1 - ab[t])
    x_hat = (x - np.sqrt(1 - ab_now) * eps) / np.sqrt(ab_now)
    x, ab_now = np.sqrt(ab[t]) * x_hat + np.sqrt(1 - ab[t]) * eps, ab[t]
  np.testing.assert_allclose(out, x, rtol=1e-5, atol=1e-6)


# --- Sampler options in configs and `genimg sample` -------------------------


@pytest.mark.parametrize("experiment", ["ddpm.py", "ddpm_cond.py", "flow.py",
                                        "flow_cond.py"])
def test_configs_have_the_sampler_conventions(experiment):
  d = _config(experiment).diffusion
  assert (d.ddpm_variance, d.ddim_spacing, d.clip_denoised) == (
      "fixedsmall", "trailing", True)
  for key in ("ddpm_variance", "ddim_spacing", "clip_denoised"):
    assert f"diffusion.{key}" in config_lib.RESUMABLE_FIELDS


def test_sampler_options_thread_the_conventions():
  config = _config()
  config.diffusion.sampler = "ddpm"
  config.diffusion.ddpm_variance = "fixedlarge"
  config.diffusion.ddim_spacing = "quadratic"
  options = diffusion.sampler_options(config)
  assert (options.sampler, options.ddpm_variance, options.ddim_spacing) == (
      "ddpm", "fixedlarge", "quadratic")
  assert diffusion.sampler_options(config, ddim_spacing="leading",
                                   sampler="ddim").ddim_spacing == "leading"
  # A config saved before these fields existed (config.json of an older
  # run) samples as before: fixedsmall, trailing.
  old = _config().to_dict()
  del old["diffusion"]["ddpm_variance"], old["diffusion"]["ddim_spacing"]
  import ml_collections  # pylint: disable=g-import-not-at-top
  options = diffusion.sampler_options(ml_collections.ConfigDict(old))
  assert (options.ddpm_variance, options.ddim_spacing) == ("fixedsmall",
                                                           "trailing")
  with pytest.raises(config_lib.ConfigError, match="choose from"):
    diffusion.sampler_options(config, ddim_spacing="linspace")


def test_generate_uses_the_ddpm_variance_and_ddim_spacing():
  """`generate` (what `genimg sample` and the evaluator compile) runs the
  sampler with the options' variance and spacing: equal to the samplers
  called directly with them, and different from the defaults."""
  settings = diffusion.Settings(objective="eps", num_timesteps=50)
  ab = settings.alpha_bars()
  eps_net = lambda x, time: jnp.tanh(x + time[:, None, None, None] / 50.0)
  apply_fn = lambda variables, x, time, labels: eps_net(x, time)
  denoise_fn = diffusion.make_denoise_fn(eps_net, settings, clip=True)
  x_T = jax.random.normal(jax.random.key(0), (4, 2, 2, 1))
  rng = jax.random.key(1)
  run = lambda **kw: diffusion.generate(
      {}, x_T, None, rng, apply_fn=apply_fn, settings=settings,
      options=diffusion.SamplerOptions(**kw))
  large = run(sampler="ddpm", ddpm_variance="fixedlarge")
  np.testing.assert_allclose(large, jnp.clip(samplers.ddpm_sample(
      denoise_fn, ab, x_T, rng, "fixedlarge"), -1, 1), atol=1e-6)
  assert float(jnp.max(jnp.abs(large - run(sampler="ddpm")))) > 1e-3
  quadratic = run(sampler="ddim", steps=10, ddim_spacing="quadratic")
  np.testing.assert_allclose(quadratic, jnp.clip(samplers.ddim_sample(
      denoise_fn, ab, x_T, samplers.ddim_timesteps(50, 10, "quadratic")),
                                                 -1, 1), atol=1e-6)
  assert float(jnp.max(jnp.abs(quadratic - run(sampler="ddim",
                                               steps=10)))) > 1e-3


def test_ddpm_with_explicit_steps_is_refused():
  """`genimg sample --steps N --sampler ddpm`: the ddpm sampler always takes
  T steps, so an N other than T is an error, not ignored."""
  config = _config()
  with pytest.raises(config_lib.ConfigError,
                     match=r"^--steps 20: the ddpm sampler always takes all "
                           r"1000 steps .*use --sampler ddim"):
    diffusion.sampler_options(config, sampler="ddpm", steps=20)
  ddpm = config_lib.apply_overrides(config, ["diffusion.sampler=ddpm"])
  with pytest.raises(config_lib.ConfigError, match="--steps 5"):
    diffusion.sampler_options(ddpm, steps=5)
  # No --steps (the config's sample_steps is ddim's), or all T: fine.
  assert diffusion.sampler_options(ddpm).sampler == "ddpm"
  assert diffusion.sampler_options(ddpm, steps=1000).sampler == "ddpm"
  assert diffusion.sampler_options(config, steps=20).steps == 20  # ddim.


def test_ddpm_variance_tables_by_hand():
  """fixedsmall: beta~_t; fixedlarge: beta_t; both 0 at t = 0 (DDPM adds no
  noise at its last step); the same posterior mean."""
  ab = diffusion.linear_alpha_bars(1000)
  beta = 1e-4 + (0.02 - 1e-4) * np.arange(1000) / 999
  small, large = (samplers.ddpm_tables(ab, v) for v in samplers.DDPM_VARIANCES)
  np.testing.assert_allclose(large[2][1:] ** 2, beta[1:], rtol=1e-9)
  np.testing.assert_allclose(small[2][1:] ** 2, beta[1:] * (1 - ab[:-1]) /
                             (1 - ab[1:]), rtol=1e-9)
  assert small[2][0] == 0 and large[2][0] == 0
  for a, b in zip(small[:2], large[:2]):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="fixed_large"):
    samplers.ddpm_tables(ab, "fixed_large")


# --- Parity with diffusers --------------------------------------------------


@pytest.mark.parametrize("schedule,beta_schedule", [
    ("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
def test_schedules_equal_diffusers(reference, schedule, beta_schedule):
  """alpha-bar [1000] against DDPMScheduler's alphas_cumprod (float32)."""
  _, schedulers_ = reference
  theirs = schedulers_.DDPMScheduler(
      num_train_timesteps=1000, beta_schedule=beta_schedule).alphas_cumprod
  ours = diffusion.alpha_bars_for(schedule, 1000)
  # atol: the last few cosine values are about 1e-9.
  np.testing.assert_allclose(ours, theirs.double().numpy(), rtol=1e-5,
                             atol=1e-12)


def _eps_network(xp, x, t):
  """An eps "network" of (x, integer step t) written once for numpy-like
  modules (jax.numpy, torch): about eps = x at high noise (data near 0),
  with a wiggle in x and t; at high noise x0_hat = (x - sqrt(1 - ab) eps) /
  sqrt(ab) often leaves [-1, 1], so clipping matters."""
  return xp.tanh(1.2 * x) + 0.2 * xp.sin(3.0 * x + t / 200.0)


def _jax_network(x, time_B):
  return _eps_network(jnp, x, diffusion.bcast(time_B, x))


_VARIANCE_TYPES = [("fixedsmall", "fixed_small"), ("fixedlarge", "fixed_large")]


def _in_float64(torch, scheduler):
  """`scheduler` with its linear schedule rebuilt in float64 by its own
  formula, so that its steps run in float64: diffusers' float32 1 - ab_t
  loses digits near t = 0 (1e-4 at t = 0, as this project's float64 tables
  avoid), and the comparison should measure only our float32 rounding.
  (The float32 schedule itself is compared in test_schedules_equal_diffusers.)
  """
  c = scheduler.config
  scheduler.betas = torch.linspace(c.beta_start, c.beta_end,
                                   c.num_train_timesteps, dtype=torch.float64)
  scheduler.alphas = 1.0 - scheduler.betas
  scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, 0)
  scheduler.one = scheduler.final_alpha_cumprod = torch.tensor(
      1.0, dtype=torch.float64)
  return scheduler


def _ddpm_scheduler(torch, schedulers_, monkeypatch, T, variance_type, clip):
  """(diffusers' DDPMScheduler in float64, a dict whose "now" entry is the
  noise its next step draws, in place of its own draw)."""
  noise = {}
  monkeypatch.setattr(schedulers_.scheduling_ddpm, "randn_tensor",
                      lambda *args, **kwargs: noise["now"])
  return _in_float64(torch, schedulers_.DDPMScheduler(
      num_train_timesteps=T, beta_schedule="linear",
      variance_type=variance_type, clip_sample=clip,
      prediction_type="epsilon")), noise


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("variance,variance_type", _VARIANCE_TYPES)
def test_ddpm_step_equals_diffusers(reference, monkeypatch, variance,
                                    variance_type, clip):
  """One DDPM step t -> t - 1 at t = 999 ... 0 (T = 1,000): its mean
  (noise 0), its standard deviation (noise 1 minus noise 0) and a step with
  Gaussian noise against DDPMScheduler.step, x0_hat clipped (clip_sample)
  or not. Ours: x0_hat from make_denoise_fn, the coefficients of
  ddpm_tables in float32, as ddpm_sample applies them."""
  torch, schedulers_ = reference
  T = 1000
  settings = diffusion.Settings(objective="eps", num_timesteps=T)
  denoise_fn = diffusion.make_denoise_fn(_jax_network, settings, clip)
  coef_x0, coef_xt, std = (np.float32(v) for v in samplers.ddpm_tables(
      settings.alpha_bars(), variance))
  scheduler, noise = _ddpm_scheduler(torch, schedulers_, monkeypatch, T,
                                     variance_type, clip)
  shape = (3, 4, 4, 1)
  x = 1.5 * np.asarray(jax.random.normal(jax.random.key(0), shape))
  z = np.asarray(jax.random.normal(jax.random.key(1), shape), np.float64)
  clipped = 0
  for t in (999, 998, 900, 500, 100, 10, 2, 1, 0):
    x0, _ = denoise_fn(jnp.asarray(x), t)
    clipped += int(np.any(np.abs(np.asarray(x0)) == 1.0))
    mean = coef_x0[t] * x0 + coef_xt[t] * x
    step = {}
    for name, value in (("zero", np.zeros(shape)), ("one", np.ones(shape)),
                        ("z", z)):
      noise["now"] = torch.from_numpy(value)
      x_torch = torch.from_numpy(x.astype(np.float64))
      step[name] = scheduler.step(_eps_network(torch, x_torch, float(t)), t,
                                  x_torch).prev_sample.numpy()
    np.testing.assert_allclose(mean, step["zero"], rtol=1e-5, atol=1e-6,
                               err_msg=f"mean at t = {t}")
    np.testing.assert_allclose(std[t], step["one"] - step["zero"], rtol=1e-5,
                               atol=1e-6, err_msg=f"std at t = {t}")
    np.testing.assert_allclose(mean + std[t] * z, step["z"], rtol=1e-5,
                               atol=1e-6, err_msg=f"step at t = {t}")
  assert clipped >= clip * 3  # Clipping was in play at high noise.


@pytest.mark.parametrize("variance,variance_type", _VARIANCE_TYPES)
def test_ddpm_sampler_equals_diffusers(reference, monkeypatch, variance,
                                       variance_type):
  """ddpm_sample's whole run (the scan over t = T-1 .. 0) against
  DDPMScheduler's loop with the same noise (ours draws step t's from
  fold_in(rng, t)), on a short linear schedule (T = 10) where float32
  rounding does not build up over the steps; x0_hat clipped."""
  torch, schedulers_ = reference
  T = 10
  settings = diffusion.Settings(objective="eps", num_timesteps=T)
  x_T = np.array(jax.random.normal(jax.random.key(0), (3, 4, 4, 1)))
  rng = jax.random.key(1)
  ours = samplers.ddpm_sample(
      diffusion.make_denoise_fn(_jax_network, settings, clip=True),
      settings.alpha_bars(), jnp.asarray(x_T), rng, variance)
  scheduler, noise = _ddpm_scheduler(torch, schedulers_, monkeypatch, T,
                                     variance_type, True)
  x = torch.from_numpy(x_T.astype(np.float64))
  for t in range(T - 1, -1, -1):
    noise["now"] = torch.from_numpy(np.asarray(jax.random.normal(
        jax.random.fold_in(rng, t), x_T.shape), np.float64))
    x = scheduler.step(_eps_network(torch, x, float(t)), t, x).prev_sample
  np.testing.assert_allclose(ours, x.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("spacing,steps", [("trailing", 10),
                                           ("leading", 10),
                                           ("leading", 7)])
def test_ddim_sampler_equals_diffusers(reference, spacing, steps, eta):
  """A whole DDIM run (every step t -> t' of the grid, eta 0 and 1) against
  DDIMScheduler.step with the same noise (variance_noise), x0_hat clipped and
  eps_hat recomputed from it: this project's denoise_fn with clip on is
  diffusers' clip_sample=True with use_clipped_model_output=True. The grids
  are diffusers' timestep_spacing (steps_offset 0), the last step going to
  alpha-bar 1 (set_alpha_to_one)."""
  torch, schedulers_ = reference
  T = 1000
  settings = diffusion.Settings(objective="eps", num_timesteps=T)
  table = samplers.ddim_timesteps(T, steps, spacing)
  x_T = np.array(jax.random.normal(jax.random.key(0), (3, 4, 4, 1)))
  rng = jax.random.key(1)
  ours = samplers.ddim_sample(
      diffusion.make_denoise_fn(_jax_network, settings, clip=True),
      settings.alpha_bars(), jnp.asarray(x_T), table, eta, rng)

  scheduler = _in_float64(torch, schedulers_.DDIMScheduler(
      num_train_timesteps=T, beta_schedule="linear", clip_sample=True,
      set_alpha_to_one=True, steps_offset=0, timestep_spacing=spacing,
      prediction_type="epsilon"))
  scheduler.set_timesteps(steps)
  np.testing.assert_array_equal(scheduler.timesteps.numpy(), table[:-1])
  x = torch.from_numpy(x_T.astype(np.float64))
  for i, t in enumerate(scheduler.timesteps):
    noise = torch.from_numpy(np.asarray(jax.random.normal(
        jax.random.fold_in(rng, i), x_T.shape), np.float64))
    x = scheduler.step(_eps_network(torch, x, float(t)), int(t), x, eta=eta,
                       use_clipped_model_output=True,
                       variance_noise=noise).prev_sample
  np.testing.assert_allclose(ours, x.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T", [100, 1000])
def test_ddim_grids_equal_diffusers(reference, T):
  """Our grids against DDIMScheduler.set_timesteps for every S in 1..T.
  leading (steps_offset 0): equal for all S. trailing: equal except where
  diffusers' float np.arange(T, 0, -T / S) (a) keeps a spurious last element
  (about 1e-12, which becomes step -1: the bug fixed here) or (b) rounds an
  exact tie T (S - i) / S = k + 1/2 the other way; each (b) entry differs by
  exactly 1."""
  _, schedulers_ = reference
  make = lambda spacing: schedulers_.DDIMScheduler(
      num_train_timesteps=T, steps_offset=0, timestep_spacing=spacing)
  leading, trailing = make("leading"), make("trailing")
  spurious, ties = [], []
  for S in range(1, T + 1):
    leading.set_timesteps(S)
    np.testing.assert_array_equal(samplers.ddim_timesteps(T, S, "leading")[
        :-1], leading.timesteps.numpy(), err_msg=str(S))
    trailing.set_timesteps(S)
    theirs, ours = trailing.timesteps.numpy(), samplers.ddim_timesteps(T, S)[
        :-1]
    if len(theirs) == S + 1:  # (a)
      assert theirs[-1] == -1, S
      spurious.append(S)
      theirs = theirs[:-1]
    differ = np.flatnonzero(theirs != ours)
    for i in differ:  # (b)
      assert abs(int(theirs[i]) - int(ours[i])) == 1, (S, i)
      assert 2 * ((S - i) * T % S) == S, (S, i)
    if len(differ):
      ties.append(S)
  assert spurious and (T != 1000 or spurious[0] == 61)
  assert len(ties) < T // 10


def _velocity(x, t):
  """E[x1 - x0 | x_t] for x_t = t x1 + (1 - t) x0, x1 ~ N(0.3, 0.5^2),
  x0 ~ N(0, 1): a velocity field whose trajectories curve (for numpy-like
  x and a float t)."""
  mu, s2 = 0.3, 0.25
  var = t ** 2 * s2 + (1 - t) ** 2
  return mu + t * s2 * (x - t * mu) / var - (1 - t) * (x - t * mu) / var


@pytest.mark.parametrize("solver,name", [("euler", "FlowMatchEuler"),
                                         ("heun", "FlowMatchHeun")])
@pytest.mark.parametrize("num_steps", [1, 4, 25])
def test_flow_solvers_equal_diffusers(reference, solver, name, num_steps):
  """Euler and Heun on the uniform grid against diffusers' flow-matching
  schedulers. Conventions: here t = 0 is noise and t = 1 data, x_t = t x +
  (1 - t) eps and the network predicts v = dx/dt = x - eps; diffusers
  integrates sigma = 1 - t from 1 to 0, x_sigma = (1 - sigma) x + sigma eps,
  and its model predicts dx/dsigma = eps - x = -v(x, 1 - sigma). With
  num_train_timesteps = N its default sigmas are 1, 1 - 1/N, ..., 1/N (then
  0): our grid t = i / N. Its Heun ends with an Euler step into sigma = 0,
  as ours (EDM)."""
  torch, schedulers_ = reference
  x_T = np.array(jax.random.normal(jax.random.key(0), (3, 4, 4, 1)))
  ours = {"euler": samplers.euler_sample, "heun": samplers.heun_sample}[
      solver](_velocity, jnp.asarray(x_T), num_steps)
  scheduler = getattr(schedulers_, f"{name}DiscreteScheduler")(
      num_train_timesteps=num_steps)
  scheduler.set_timesteps(num_steps)
  np.testing.assert_allclose(
      np.unique(scheduler.sigmas.numpy()),
      np.arange(num_steps + 1) / num_steps, atol=1e-7)
  x, evaluations = torch.from_numpy(x_T).float(), 0
  for timestep in scheduler.timesteps:
    sigma = float(timestep) / num_steps
    model_output = -_velocity(x, 1.0 - sigma)
    x = scheduler.step(model_output, timestep, x).prev_sample
    evaluations += 1
  assert evaluations == (num_steps if solver == "euler" else
                         2 * num_steps - 1)
  np.testing.assert_allclose(ours, x.numpy(), rtol=1e-5, atol=1e-5)
