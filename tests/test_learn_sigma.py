"""The DiT's learned variance (config.model.learn_sigma; Improved DDPM,
Nichol & Dhariwal 2021, as DiT trains it): the Gaussian KL and the
discretized Gaussian likelihood against independent closed forms and
against guided-diffusion's formulas transcribed in numpy (float64), the
hybrid loss and its frozen mean, a DiT train and eval step against that
transcription, and the samplers' use of the variance channels."""

import functools
import os

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

from genimg_jax import config as config_lib, diffusion, samplers, vlb
from conftest import REPO

# A DiT that compiles in seconds, learning its variance, on a schedule of
# T = 100 steps (so that the 0.001 T weight of L_t is not 1).
TINY = ["model.hidden_size=16", "model.depth=1", "model.num_heads=2",
        "model.patch_size=4", "model.learn_sigma=true",
        "diffusion.num_timesteps=100"]


# --- guided-diffusion's / DiT's formulas, transcribed in numpy (float64)
# from facebookresearch/DiT diffusion/diffusion_utils.py and
# gaussian_diffusion.py (LEARNED_RANGE, LossType.RESCALED_MSE). -------------

def ref_normal_kl(mean1, logvar1, mean2, logvar2):
  return 0.5 * (-1.0 + logvar2 - logvar1 + np.exp(logvar1 - logvar2)
                + ((mean1 - mean2) ** 2) * np.exp(-logvar2))


def ref_approx_standard_normal_cdf(x):
  return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) *
                              (x + 0.044715 * np.power(x, 3))))


def ref_discretized_gaussian_log_likelihood(x, *, means, log_scales):
  centered_x = x - means
  inv_stdv = np.exp(-log_scales)
  plus_in = inv_stdv * (centered_x + 1.0 / 255.0)
  cdf_plus = ref_approx_standard_normal_cdf(plus_in)
  min_in = inv_stdv * (centered_x - 1.0 / 255.0)
  cdf_min = ref_approx_standard_normal_cdf(min_in)
  log_cdf_plus = np.log(np.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = np.log(np.maximum(1.0 - cdf_min, 1e-12))
  cdf_delta = cdf_plus - cdf_min
  return np.where(x < -0.999, log_cdf_plus,
                  np.where(x > 0.999, log_one_minus_cdf_min,
                           np.log(np.maximum(cdf_delta, 1e-12))))


def ref_training_losses(betas, x_start, x_t, t, noise, model_output):
  """(mse [N], vb [N], loss [N]) of GaussianDiffusion.training_losses with
  model_var_type LEARNED_RANGE, EPSILON, RESCALED_MSE (NHWC here)."""
  mean_flat = lambda v: v.mean(axis=tuple(range(1, v.ndim)))
  ex = lambda arr: np.asarray(arr)[t][:, None, None, None]
  num_timesteps = len(betas)
  alphas = 1.0 - betas
  alphas_cumprod = np.cumprod(alphas)
  alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
  posterior_variance = (betas * (1.0 - alphas_cumprod_prev) /
                        (1.0 - alphas_cumprod))
  posterior_log_variance_clipped = np.log(
      np.append(posterior_variance[1], posterior_variance[1:]))
  coef1 = betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)
  coef2 = ((1.0 - alphas_cumprod_prev) * np.sqrt(alphas) /
           (1.0 - alphas_cumprod))
  c = x_t.shape[-1]
  eps, model_var_values = model_output[..., :c], model_output[..., c:]
  # q_posterior_mean_variance.
  true_mean = ex(coef1) * x_start + ex(coef2) * x_t
  true_log_variance_clipped = ex(posterior_log_variance_clipped)
  # p_mean_variance (clip_denoised=False) on the frozen output.
  min_log = ex(posterior_log_variance_clipped)
  max_log = ex(np.log(betas))
  frac = (model_var_values + 1) / 2
  model_log_variance = frac * max_log + (1 - frac) * min_log
  pred_xstart = (ex(np.sqrt(1.0 / alphas_cumprod)) * x_t
                 - ex(np.sqrt(1.0 / alphas_cumprod - 1)) * eps)
  model_mean = ex(coef1) * pred_xstart + ex(coef2) * x_t
  # _vb_terms_bpd.
  kl = ref_normal_kl(true_mean, true_log_variance_clipped, model_mean,
                     model_log_variance)
  kl = mean_flat(kl) / np.log(2.0)
  decoder_nll = -ref_discretized_gaussian_log_likelihood(
      x_start, means=model_mean, log_scales=0.5 * model_log_variance)
  decoder_nll = mean_flat(decoder_nll) / np.log(2.0)
  vb = np.where(t == 0, decoder_nll, kl)
  vb_rescaled = vb * num_timesteps / 1000.0
  mse = mean_flat((noise - eps) ** 2)
  return mse, vb, mse + vb_rescaled


def _betas(alpha_bars):
  ab = np.asarray(alpha_bars, np.float64)
  return 1.0 - ab / np.append(1.0, ab[:-1])


# --- The formulas -----------------------------------------------------------

@pytest.mark.parametrize("m1,lv1,m2,lv2", [
    (0.0, 0.0, 0.0, 0.0), (0.3, -1.0, -0.2, 0.5), (1.0, 0.7, 0.0, -0.4),
    (-0.5, -3.0, -0.45, -2.0)])
def test_normal_kl_is_the_integral(m1, lv1, m2, lv2):
  """KL(p || q) = int p log(p / q), integrated by quadrature."""
  s1 = np.exp(lv1 / 2)
  p, q = stats.norm(m1, s1), stats.norm(m2, np.exp(lv2 / 2))
  want, _ = integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)),
                           m1 - 12 * s1, m1 + 12 * s1, epsabs=1e-12)
  got = float(vlb.normal_kl(jnp.float32(m1), jnp.float32(lv1),
                            jnp.float32(m2), jnp.float32(lv2)))
  assert got == pytest.approx(want, rel=1e-5, abs=1e-7)


def test_discretized_gaussian_is_the_mass_of_the_bin():
  """P(x) = Phi((x + 1/255 - m) / s) - Phi((x - 1/255 - m) / s) with the
  exact normal CDF, the outer bins open (x = -1: up to -1 + 1/255; x = 1:
  from 1 - 1/255); within 4e-4 (twice the tanh approximation's 1.8e-4)."""
  rng = np.random.default_rng(0)
  x = np.concatenate([[-1.0, 1.0, -1.0, 1.0],
                      rng.integers(0, 256, 60) / 127.5 - 1.0])
  means = np.clip(x + rng.normal(0, 0.03, x.shape), -1.2, 1.2)
  scales = rng.uniform(0.004, 0.1, x.shape)
  upper = stats.norm.cdf((x + 1 / 255 - means) / scales)
  lower = stats.norm.cdf((x - 1 / 255 - means) / scales)
  want = np.where(x == -1, upper, np.where(x == 1, 1 - lower, upper - lower))
  got = np.exp(np.asarray(vlb.discretized_gaussian_log_likelihood(
      jnp.asarray(x, jnp.float32), jnp.asarray(means, jnp.float32),
      jnp.asarray(np.log(scales), jnp.float32)), np.float64))
  assert want.max() > 0.3  # Bins that hold mass, not only tails.
  np.testing.assert_allclose(got, want, atol=4e-4)
  # And guided-diffusion's own function (the same tanh approximation; in
  # float32 a tail bin's difference of CDFs keeps about 1e-7).
  ref = ref_discretized_gaussian_log_likelihood(x, means=means,
                                                log_scales=np.log(scales))
  np.testing.assert_allclose(got, np.exp(ref), rtol=1e-4, atol=2e-7)


def test_learned_variance_range_ends():
  """frac 0: beta~_t (beta~_1 at t = 0, where beta~_0 = 0); frac 1: beta_t."""
  ab = diffusion.linear_alpha_bars(1000)
  beta = 1e-4 + (0.02 - 1e-4) * np.arange(1000) / 999
  small = beta[1:] * (1 - ab[:-1]) / (1 - ab[1:])
  min_log, max_log = samplers.learned_log_variance_range(ab)
  np.testing.assert_allclose(np.exp(min_log[1:]), small, rtol=1e-9)
  assert np.exp(min_log[0]) == pytest.approx(small[0], rel=1e-9)
  np.testing.assert_allclose(np.exp(max_log), beta, rtol=1e-9)
  mid = samplers.learned_log_variance(0.25, min_log, max_log)
  np.testing.assert_allclose(mid, 0.25 * np.log(beta) + 0.75 * min_log)


def _example(t, schedule="linear", num_timesteps=1000, seed=0):
  """(settings, x0 on the 8-bit grid, x_t, noise, output [.., 2C]) at
  steps t [B] (numpy float32)."""
  settings = diffusion.Settings(schedule=schedule,
                                num_timesteps=num_timesteps, learn_sigma=True)
  ab = settings.alpha_bars()
  rng = np.random.default_rng(seed)
  t = np.asarray(t)
  shape = (len(t), 4, 4, 2)
  x0 = (rng.integers(0, 256, shape) / 127.5 - 1).astype(np.float32)
  x0[:, 0, 0] = [-1, 1]  # The open outer bins.
  noise = rng.normal(size=shape).astype(np.float32)
  a, s = (np.sqrt(v)[t][:, None, None, None] for v in (ab, 1 - ab))
  x_t = (a * x0 + s * noise).astype(np.float32)
  eps_hat = noise + rng.normal(0, 0.1, shape)  # A near miss.
  v = rng.uniform(-1.2, 1.2, shape)
  output = np.concatenate([eps_hat, v], -1).astype(np.float32)
  return settings, x0, x_t, noise, output


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_hybrid_loss_terms_equal_guided_diffusions(schedule):
  """L_simple and L_t (bits/dim) at t = 0 (the decoder NLL), 1, 2, 500,
  998, 999 (the KL) against the transcription, from float32 inputs."""
  t = np.array([0, 1, 2, 500, 998, 999])
  settings, x0, x_t, noise, output = _example(t, schedule)
  mse, vb = diffusion.hybrid_loss_terms(
      settings, jnp.asarray(output), jnp.asarray(noise), jnp.asarray(x0),
      jnp.asarray(x_t), jnp.asarray(t, jnp.float32))
  f64 = lambda v: np.asarray(v, np.float64)
  want_mse, want_vb, _ = ref_training_losses(
      _betas(settings.alpha_bars()), f64(x0), f64(x_t), t, f64(noise),
      f64(output))
  np.testing.assert_allclose(mse, want_mse, rtol=1e-5)
  # At t near T, beta~_t ~ beta_t and the KL is ~1e-4 bits: float32 keeps
  # it to about 1e-7 absolute (so does guided-diffusion's float32).
  np.testing.assert_allclose(vb, want_vb, rtol=1e-4, atol=1e-6)
  assert np.all(want_vb[:3] > 1e-2)


def test_the_bound_trains_only_the_variance_channels():
  """The gradient of L_vlb reaches the variance channels only (the mean is
  frozen): d loss / d eps channels is that of L_simple alone."""
  t = np.array([0, 3, 400, 999])
  settings, x0, x_t, noise, output = _example(t)
  args = [jnp.asarray(v) for v in (noise, x0, x_t)] + [jnp.asarray(
      t, jnp.float32)]

  def terms(out):
    return diffusion.hybrid_loss_terms(settings, out, *args)

  grad_vb = jax.grad(lambda o: jnp.sum(terms(o)[1]))(jnp.asarray(output))
  assert float(jnp.max(jnp.abs(grad_vb[..., :2]))) == 0.0
  assert float(jnp.min(jnp.sum(jnp.abs(grad_vb[..., 2:]), (1, 2, 3)))) > 0
  grad_mse = jax.grad(lambda o: jnp.sum(terms(o)[0]))(jnp.asarray(output))
  assert float(jnp.max(jnp.abs(grad_mse[..., 2:]))) == 0.0


# --- The family's step, evaluation and samplers ------------------------------

def _config(*overrides):
  return config_lib.apply_overrides(config_lib.load_config_file(
      os.path.join(REPO, "experiments", "dit.py")), [*TINY, *overrides])


def _perturbed(params, seed=5, scale=0.05):
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  return unravel(flat + scale * jax.random.normal(jax.random.key(seed),
                                                  flat.shape))


def test_the_network_outputs_2c_channels_and_flow_is_refused():
  config = _config()
  model = diffusion.make_model(config, 0)
  out = jax.eval_shape(lambda: model.init_with_output(
      jax.random.key(0), jnp.zeros((2, 28, 28, 1)), jnp.zeros((2,)))[0])
  assert out.shape == (2, 28, 28, 2)
  assert diffusion.settings_from_config(config).learn_sigma
  with config.unlocked():
    config.diffusion.objective = "v"
  with pytest.raises(config_lib.ConfigError, match="learn_sigma=false"):
    diffusion.settings_from_config(config)


def test_train_and_eval_step_losses_equal_guided_diffusions():
  """One step of the tiny DiT (random weights, T = 100): loss = L_simple +
  0.001 T L_t, mse and vlb as the transcription computes them from the
  network's output on the step's own draws; finite; the test loss the same
  per example."""
  config = _config()
  settings = diffusion.settings_from_config(config)
  state = jax.jit(lambda r: diffusion.create_train_state(config, r, 10))(
      jax.random.key(0))
  params = jax.jit(_perturbed)(state.params)  # Off the zero output.
  state = state.replace(params=params, ema_params=params)
  images = np.random.default_rng(1).integers(0, 256, (8, 28, 28, 1),
                                             dtype=np.uint8)
  batch = {"image": images, "label": np.zeros(8, np.int32),
           "mask": np.ones(8, np.float32)}
  key = jax.random.key(3)
  _, metrics = jax.jit(functools.partial(diffusion.train_step,
                                         settings=settings))(state, batch, key)
  sums = jax.jit(functools.partial(diffusion.eval_step, settings=settings))(
      state, batch, key)

  @jax.jit
  def draws_and_outputs(params):
    """(x0, x_t, t, noise, output) of train_step's draws and eval_step's."""
    rng = jax.random.fold_in(key, 0)
    example_rng, _, dropout_rng = jax.random.split(rng, 3)
    x0 = diffusion.clean_input(settings, images, rng, train=True)
    x_t, time, noise = diffusion.training_example(settings, x0, example_rng)
    train = (x0, x_t, time, noise, state.apply_fn(
        {"params": params}, x_t, time, None, train=True,
        rngs={"dropout": dropout_rng}))
    x0 = diffusion.clean_input(settings, images, key, train=False)
    x_t, time, noise = diffusion.training_example(settings, x0, key)
    return train, (x0, x_t, time, noise, state.apply_fn(
        {"params": params}, x_t, time, None))

  betas = _betas(settings.alpha_bars())
  (x0, x_t, time, noise, output), evaluated = jax.tree.map(
      lambda v: np.asarray(v, np.float64), draws_and_outputs(params))
  mse, vb, loss = ref_training_losses(betas, x0, x_t, time.astype(int),
                                      noise, output)
  assert np.isfinite(float(metrics["loss"]))
  assert float(metrics["mse"]) == pytest.approx(mse.mean(), rel=1e-5)
  assert float(metrics["vlb"]) == pytest.approx(vb.mean(), rel=1e-4)
  assert float(metrics["loss"]) == pytest.approx(loss.mean(), rel=1e-4)
  assert float(metrics["loss"]) == pytest.approx(
      mse.mean() + 0.001 * 100 * vb.mean(), rel=1e-4)
  assert 0.001 * 100 * vb.mean() > 1e-3 * loss.mean()  # 10x the tolerance.
  x0, x_t, time, noise, output = evaluated
  _, _, loss = ref_training_losses(betas, x0, x_t, time.astype(int), noise,
                                   output)
  assert float(sums["count"]) == 8
  assert float(sums["loss"]) == pytest.approx(loss.sum(), rel=1e-4)


def _eps_net(x, time):
  return jnp.tanh(x + time[:, None, None, None] / 50.0)


def _generate(settings, apply_fn, **options):
  x_T = jax.random.normal(jax.random.key(0), (4, 2, 2, 1))
  return np.asarray(diffusion.generate(
      {}, x_T, None, jax.random.key(1), apply_fn=apply_fn, settings=settings,
      options=diffusion.SamplerOptions(**options)))


def test_ddpm_takes_the_learned_variance_and_ddim_ignores_it():
  """A network whose variance output is v = 2 frac - 1 everywhere: the ddpm
  sampler with frac 1 is the fixedlarge sampler (beta_t), with frac 0
  fixedsmall (beta~_t), frac 0.5 neither (same noise); ddim gives the
  samples of the eps channels alone."""
  fixed = diffusion.Settings(num_timesteps=50)
  learned = diffusion.Settings(num_timesteps=50, learn_sigma=True)
  eps_only = lambda variables, x, time, labels: _eps_net(x, time)

  def with_frac(frac):
    return lambda variables, x, time, labels: jnp.concatenate(
        [_eps_net(x, time), jnp.full_like(x, 2 * frac - 1)], -1)

  large = _generate(fixed, eps_only, sampler="ddpm",
                    ddpm_variance="fixedlarge")
  small = _generate(fixed, eps_only, sampler="ddpm")
  assert np.abs(large - small).max() > 1e-2
  np.testing.assert_allclose(_generate(learned, with_frac(1.0),
                                       sampler="ddpm"), large, atol=2e-5)
  np.testing.assert_allclose(_generate(learned, with_frac(0.0),
                                       sampler="ddpm"), small, atol=2e-5)
  half = _generate(learned, with_frac(0.5), sampler="ddpm")
  assert min(np.abs(half - large).max(), np.abs(half - small).max()) > 1e-3
  for eta in (0.0, 1.0):
    np.testing.assert_array_equal(
        _generate(learned, with_frac(0.3), sampler="ddim", steps=5, eta=eta),
        _generate(fixed, eps_only, sampler="ddim", steps=5, eta=eta))


def test_guidance_guides_eps_and_keeps_the_conditional_variance():
  """DiT's forward_with_cfg: out_u + s (out_c - out_u) on the eps channels,
  the conditional output's variance channels."""
  def apply_fn(variables, x, time, labels):
    del variables, time
    label = labels.astype(jnp.float32)[:, None, None, None]
    return jnp.concatenate([x + label, 10 * x - label], -1)

  x = jnp.ones((2, 1, 1, 1))
  labels = jnp.array([1, 2])
  out = diffusion.guided_network(apply_fn, {}, labels, 3, 2.0, True)(
      x, jnp.zeros(2))
  # Unconditional: label 3. eps: (1 + 3) + 2 ((1 + y) - (1 + 3)).
  np.testing.assert_allclose(out[:, 0, 0, 0], [4 + 2 * (1 - 3),
                                               4 + 2 * (2 - 3)])
  np.testing.assert_allclose(out[:, 0, 0, 1], [10 - 1, 10 - 2])
