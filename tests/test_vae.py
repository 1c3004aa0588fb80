"""VAEs: KL, likelihoods, the ELBO step, the importance-weighted bound."""

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from genimg_jax import classifier, data, parallel, train, vae
from conftest import assert_metrics_agree, assert_trees_near, steps_on_mesh
from conftest import tiny_config

CONV = "vae_conv.py"
# 1 vs 8 devices: summation order moved the metrics by <= 3e-7 (relative)
# and each parameter's 4-step update by <= 1e-5 (||d1 - d8|| / ||d1||).
RTOL_METRICS, RTOL_UPDATES = 2e-5, 1e-3


def test_conv_vae_parameter_count():
  model = vae.VAE("conv", 32, (28, 28, 1))
  params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)),
                      jax.random.key(1))["params"]
  assert sum(x.size for x in jax.tree.leaves(params)) == 997_505


@pytest.mark.parametrize("architecture,shape,likelihood", [
    ("conv", (32, 32, 3), "logistic"), ("mlp", (28, 28, 1), "bernoulli")])
def test_vae_shapes(architecture, shape, likelihood):
  model = vae.VAE(architecture, 8, shape, likelihood, num_classes=10)
  x = jnp.zeros((3, *shape))
  labels = jnp.arange(3)
  variables = model.init(jax.random.key(0), x, jax.random.key(1), labels)
  outputs, mean, logvar = model.apply(variables, x, jax.random.key(2), labels)
  channels = shape[-1] * (1 if likelihood == "bernoulli" else 2)
  assert outputs.shape == (3, *shape[:2], channels)
  assert mean.shape == logvar.shape == (3, 8)


def test_closed_form_kl_matches_monte_carlo():
  mean = jnp.array([[0.5, -1.0, 2.0]])
  logvar = jnp.array([[0.3, -0.7, 0.1]])
  z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(jax.random.key(0),
                                                       (200_000, 3))
  mc = jnp.mean(vae.gaussian_log_prob(z, mean, logvar) -
                vae.gaussian_log_prob(z, 0.0, jnp.zeros(3)))
  closed = vae.kl_to_standard_normal(mean, logvar)[0]
  assert float(closed) == pytest.approx(float(mc), rel=1e-2)
  assert float(vae.kl_to_standard_normal(jnp.zeros((1, 4)),
                                         jnp.zeros((1, 4)))[0]) == 0.0


def test_bernoulli_log_prob():
  x = jnp.array([[1.0, 0.0, 1.0]])
  logits = jnp.array([[0.0, 2.0, -1.0]])
  p = jax.nn.sigmoid(logits)
  expected = np.log(0.5) + np.log(1 - p[0, 1]) + np.log(p[0, 2])
  np.testing.assert_allclose(vae.bernoulli_log_prob(x, logits), [expected],
                             rtol=1e-6)


def test_discretized_logistic_is_a_distribution_over_256_values():
  values = jnp.arange(256, dtype=jnp.uint8).reshape(256, 1, 1, 1)
  for mean, log_scale in ((0.0, -2.0), (0.9, -4.0), (-0.3, 0.5),
                          (0.5, -7.0)):
    m = jnp.full(values.shape, mean)
    s = jnp.full(values.shape, log_scale)
    log_p = vae.discretized_logistic_log_prob(values, m, s)
    assert float(jnp.sum(jnp.exp(log_p))) == pytest.approx(1.0, abs=2e-3)


def _np_logistic_bin_log_prob(x_uint8, mean, log_scale):
  """log P(x) in float64: a logistic(mean, exp(log_scale)) on the [-1, 1]
  scale (x / 127.5 - 1) integrated over the bin x +- 1/255, the bins of 0
  and 255 open to -inf and +inf (PixelCNN++'s discretization)."""
  x = np.asarray(x_uint8, np.float64) / 127.5 - 1.0
  cdf = lambda u: 1.0 / (1.0 + np.exp(-(u - mean) / np.exp(log_scale)))
  upper = np.where(x_uint8 == 255, 1.0, cdf(x + 1 / 255))
  lower = np.where(x_uint8 == 0, 0.0, cdf(x - 1 / 255))
  return np.log(upper - lower)


def test_discretized_logistic_known_values():
  """Per pixel against the CDF differences in float64, at an asymmetric
  mean and scales from wide to narrower than a bin: a flipped mean, a
  scale used as its inverse, another pixel mapping or bin width fail.
  Far in a tail (bin mass < 1e-5) the density at the bin centre times its
  width stands in, within 3% there (sinh(h) / h, h the half-bin over the
  scale)."""
  pixels = np.array([0, 1, 37, 120, 128, 131, 200, 254, 255, 30, 250],
                    np.uint8)
  mean = np.array([0.137, -0.9, 0.137, 0.137, 0.03, 0.05, 0.5, 0.98, 0.4,
                   0.35, -0.1])
  log_scale = np.array([-1.3, -2.2, -1.0, -4.6, -5.5, -3.1, -2.0, -3.5,
                        -1.7, -4.0, -3.0])
  got = vae.discretized_logistic_log_prob(
      jnp.asarray(pixels).reshape(-1, 1, 1, 1),
      jnp.asarray(mean, jnp.float32).reshape(-1, 1, 1, 1),
      jnp.asarray(log_scale, jnp.float32).reshape(-1, 1, 1, 1))
  want = _np_logistic_bin_log_prob(pixels, mean, log_scale)
  exact = np.exp(want) > 1e-5
  assert exact.sum() == 8
  np.testing.assert_allclose(np.asarray(got)[exact], want[exact], rtol=2e-4,
                             atol=2e-4)
  np.testing.assert_allclose(np.asarray(got)[~exact], want[~exact],
                             rtol=0, atol=3e-2)
  # Summed over the pixels of an image [B, H, W, C] -> [B].
  both = vae.discretized_logistic_log_prob(
      jnp.asarray(pixels[:10]).reshape(2, 5, 1, 1),
      jnp.asarray(mean[:10], jnp.float32).reshape(2, 5, 1, 1),
      jnp.asarray(log_scale[:10], jnp.float32).reshape(2, 5, 1, 1))
  np.testing.assert_allclose(both, np.asarray(got)[:10].reshape(2, 5).sum(1),
                             rtol=1e-6)


def test_dynamic_binarization_draws_fresh_pixels():
  image = jnp.full((1, 28, 28, 1), 128, jnp.uint8)
  a = vae.model_input(image, "bernoulli", jax.random.key(0))
  b = vae.model_input(image, "bernoulli", jax.random.key(1))
  assert set(np.unique(a).tolist()) == {0.0, 1.0}
  assert not np.array_equal(a, b)
  assert abs(float(a.mean()) - 128 / 255) < 0.06


# A tiny MLP VAE on 4 x 4 x 1 images, recomputed by hand in float64 numpy.
TINY_SHAPE = (4, 4, 1)


def _tiny_vae_state(tx=None):
  model = vae.VAE("mlp", 3, TINY_SHAPE, "bernoulli", hidden=8)
  params = model.init(jax.random.key(0), jnp.zeros((1, *TINY_SHAPE)),
                      jax.random.key(1))["params"]
  return classifier.TrainState.create(apply_fn=model.apply, params=params,
                                      batch_stats={},
                                      tx=tx or optax.sgd(0.1))


def _black_and_white(n, seed=0):
  """uint8 {0, 255} [n, 4, 4, 1]: binarization leaves x = image / 255."""
  rng = np.random.default_rng(seed)
  return (rng.integers(0, 2, (n, *TINY_SHAPE)) * 255).astype(np.uint8)


def _np_dense(p, x):
  return x @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"],
                                                              np.float64)


def _np_encode(params, x_BD):
  e = params["encoder"]
  out = _np_dense(e["Dense_1"], np.maximum(_np_dense(e["Dense_0"], x_BD), 0))
  return np.split(out, 2, axis=-1)


def _np_decode(params, z):
  d = params["decoder"]
  return _np_dense(d["Dense_1"], np.maximum(_np_dense(d["Dense_0"], z), 0))


def _np_bernoulli(x, logits):
  return np.sum(-x * np.logaddexp(0, -logits) -
                (1 - x) * np.logaddexp(0, logits), axis=-1)


def _np_normal(z, mean, logvar):
  return -0.5 * np.sum(np.log(2 * np.pi) + logvar +
                       (z - mean) ** 2 * np.exp(-logvar), axis=-1)


def _np_kl(mean, logvar):
  return 0.5 * np.sum(np.exp(logvar) + mean ** 2 - 1 - logvar, axis=-1)


def _np_sample(params, images, eps):
  """(x [B, D], mean, logvar [B, Z], z = mean + exp(logvar / 2) * eps)."""
  x = images.reshape(len(images), -1) / 255.0
  mean, logvar = _np_encode(params, x)
  return x, mean, logvar, mean + np.exp(0.5 * logvar) * np.asarray(
      eps, np.float64)


def _np_elbo_terms(params, images, eps_BZ):
  """(log p(x|z), closed-form KL) [B] in float64."""
  x, mean, logvar, z = _np_sample(params, images, eps_BZ)
  return _np_bernoulli(x, _np_decode(params, z)), _np_kl(mean, logvar)


def _np_log_weights(params, images, eps_KBZ):
  """log p(x|z) + log p(z) - log q(z|x) [K, B] in float64, one per eps."""
  x, mean, logvar, z = _np_sample(params, images, eps_KBZ)
  return (_np_bernoulli(x, _np_decode(params, z)) +
          _np_normal(z, 0.0, np.zeros_like(z)) - _np_normal(z, mean, logvar))


def _linear_gaussian(num=4096, noise=0.5):
  """z ~ N(0, I_2), x | z ~ N(W z + b, noise^2 I_3) with orthogonal columns
  of W, so the exact posterior is diagonal. Returns (log p(x|z) [k, B] as a
  function of z [k, B, 2], exact log p(x) [B], posterior mean and logvar
  [B, 2]), x being `num` draws from the model."""
  rng = np.random.default_rng(0)
  w = np.linalg.qr(rng.normal(size=(3, 2)))[0] * np.array([1.5, 0.7])
  b = np.array([0.1, -0.2, 0.3])
  x = (rng.normal(size=(num, 2)) @ w.T + b +
       noise * rng.normal(size=(num, 3)))
  cov = w @ w.T + noise ** 2 * np.eye(3)
  d = x - b
  log_px = -0.5 * (3 * np.log(2 * np.pi) + np.linalg.slogdet(cov)[1] +
                   np.einsum("bi,ij,bj->b", d, np.linalg.inv(cov), d))
  post_var = 1.0 / (1.0 + np.sum(w ** 2, 0) / noise ** 2)
  post_mean = d @ w / noise ** 2 * post_var
  w32, b32, x32 = (jnp.asarray(a, jnp.float32) for a in (w, b, x))

  def log_px_given_z(z_kBZ):
    return -0.5 * jnp.sum(math.log(2 * math.pi * noise ** 2) +
                          (x32 - z_kBZ @ w32.T - b32) ** 2 / noise ** 2, -1)

  return (log_px_given_z, log_px, post_mean,
          np.broadcast_to(np.log(post_var), post_mean.shape))


def test_importance_weighted_bound_is_log_px_under_the_exact_posterior():
  """q = p(z|x): every weight is p(x), so the bound is log p(x) for any K."""
  log_px_fn, log_px, mean, logvar = _linear_gaussian()
  for k in (1, 10, 1000):
    bound = vae.log_mean_importance_weight(
        log_px_fn, jnp.asarray(mean, jnp.float32),
        jnp.asarray(logvar, jnp.float32), jax.random.key(k), k)
    np.testing.assert_allclose(bound, log_px, rtol=0, atol=1e-4)


def test_importance_weighted_bound_rises_to_log_px_with_a_worse_q():
  """q shifted by 0.3 and twice as wide as p(z|x): E bound_1 = log p(x) - KL,
  below log p(x) and closer as K grows (means over 4,096 examples)."""
  log_px_fn, log_px, mean, logvar = _linear_gaussian()
  q_mean, q_logvar = mean + 0.3, logvar + math.log(2.0)
  kl_q_post = 0.5 * np.sum(np.exp(q_logvar - logvar) +
                           (q_mean - mean) ** 2 / np.exp(logvar) - 1 -
                           (q_logvar - logvar), -1)
  gaps = {k: float(np.mean(log_px - vae.log_mean_importance_weight(
      log_px_fn, jnp.asarray(q_mean, jnp.float32),
      jnp.asarray(q_logvar, jnp.float32), jax.random.key(k), k)))
          for k in (1, 10, 100, 1000)}
  assert gaps[1] == pytest.approx(float(np.mean(kl_q_post)), abs=0.06)
  assert gaps[1] > gaps[10] + 0.5 and gaps[10] > gaps[100] + 0.02
  assert gaps[10] > 0.02
  assert abs(gaps[1000]) < 0.005


def test_vae_importance_weighted_bound_by_hand():
  """K = 1: log p(x|z) + log p(z) - log q(z|x) of the same z; K = 6 drawn 2,
  3 or 6 at a time (the last decoded 4 samples at a time: a batch of 4 and a
  remainder of 2): the log-mean-exp of the six weights, all in numpy."""
  state = _tiny_vae_state()
  params = jax.device_get(state.params)
  images = _black_and_white(5)
  settings = vae.Settings()
  rng = jax.random.key(3)
  z_rng = jax.random.split(rng)[1]
  for k, chunk, decode_samples in ((1, 1, 1), (6, 2, 1), (6, 3, 1),
                                    (6, 6, 4)):
    bound = vae.importance_weighted_bound(state.apply_fn, state.params, images,
                                          None, rng, settings, k, chunk,
                                          decode_samples)
    eps = np.concatenate([jax.random.normal(key, (chunk, 5, 3)) for key in
                          jax.random.split(z_rng, k // chunk)])
    log_w = _np_log_weights(params, images, eps)
    expected = np.logaddexp.reduce(log_w, axis=0) - np.log(k)
    np.testing.assert_allclose(bound, expected, rtol=1e-5, atol=1e-4)


def test_vae_steps_report_the_elbo_computed_by_hand():
  """train_step's and eval_step's numbers against a float64 numpy ELBO."""
  state = _tiny_vae_state()
  params = jax.device_get(state.params)
  images = _black_and_white(6)
  settings = vae.Settings(beta=2.0)
  rng = jax.random.key(4)
  new_state, metrics = jax.jit(functools.partial(
      vae.train_step, settings=settings))(state, {"image": images}, rng)
  # train_step: fold in the step, split into (binarization, z).
  z_rng = jax.random.split(jax.random.fold_in(rng, 0))[1]
  log_px, kl = _np_elbo_terms(params, images,
                              jax.random.normal(z_rng, (6, 3)))
  nelbo = np.mean(kl - log_px)
  np.testing.assert_allclose(
      [metrics[k] for k in ("loss", "nelbo", "recon", "kl", "bits_per_dim")],
      [np.mean(2.0 * kl - log_px), nelbo, -np.mean(log_px), np.mean(kl),
       nelbo / (16 * np.log(2))], rtol=1e-5)
  new_params = jax.tree.leaves(jax.device_get(new_state.params))
  assert float(metrics["param_norm"]) == pytest.approx(math.sqrt(sum(
      np.sum(np.asarray(p, np.float64) ** 2) for p in new_params)), rel=1e-5)

  # eval_step: split into (ELBO, IWAE); each into (binarization, z); the
  # K = 1 bound splits its z key once more. Example 2 is padding.
  mask = np.array([1, 1, 0, 1, 1, 1], np.float32)
  sums = vae.eval_step(state, {"image": images, "mask": mask}, rng,
                       settings=settings, iw_samples=1)
  elbo_rng, iw_rng = jax.random.split(rng)
  log_px, kl = _np_elbo_terms(params, images, jax.random.normal(
      jax.random.split(elbo_rng)[1], (6, 3)))
  iw_log_w = _np_log_weights(params, images, jax.random.normal(
      jax.random.split(jax.random.split(iw_rng)[1], 1)[0], (1, 6, 3)))[0]
  np.testing.assert_allclose(
      [sums[k] for k in ("nelbo", "recon", "kl", "iw_nll", "count")],
      [np.sum((kl - log_px) * mask), np.sum(-log_px * mask),
       np.sum(kl * mask), np.sum(-iw_log_w * mask), 5], rtol=1e-5)


def test_param_norm_shows_an_update_that_overflows_the_parameters():
  """The loss and gradient of the step are finite; only the new parameters
  are not, and the trainer's check stops on param_norm."""
  state = _tiny_vae_state(tx=optax.sgd(float("inf")))
  _, metrics = vae.train_step(state, {"image": _black_and_white(4)},
                              jax.random.key(0), settings=vae.Settings())
  metrics = jax.device_get(metrics)
  assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])
  assert not np.isfinite(metrics["param_norm"])
  with pytest.raises(FloatingPointError, match="param_norm"):
    train.check_finite(1, metrics)


def test_vae_train_and_evaluate(idx_dir, tmp_path):
  """The end-of-run evaluation, then the same evaluator called directly."""
  config = tiny_config(idx_dir, CONV, **{"vae.iw_samples": 10})
  workdir = str(tmp_path / "run")
  state, metrics = train.train_and_evaluate(config, workdir)
  samples = sorted(os.listdir(tmp_path / "run" / "samples"))
  assert samples == ["interp_000006.png", "prior_000006.png",
                     "recon_000006.png"]
  # E[iw_nll] <= E[nelbo] (Jensen); the gap of K = 10 is well under log 10.
  assert 0.0 < metrics["nelbo"] - metrics["iw_nll"] < 1.5

  mesh = parallel.make_mesh(config.mesh.num_devices)
  evaluator = vae.make_evaluator(
      config, mesh, data.load_split(config.data, "test"), workdir)
  # The noise is folded with the step: a resumed run's evaluation at step 6
  # gives the same numbers, one at another step other z draws. The test set
  # is binarized once, so its KL (closed form) does not change.
  assert evaluator(state, 6) == metrics
  other = evaluator(state, 5)
  assert other["kl"] == metrics["kl"]
  for name in ("nelbo", "recon", "iw_nll"):
    assert abs(other[name] - metrics[name]) > 1e-3, name
  assert 0.0 < other["nelbo"] - other["iw_nll"] < 1.5

  # Zero parameters: q(z|x) = p(z) = N(0, I) and p(x|z) = Bernoulli(1/2) per
  # pixel, so every bound is exactly 784 log 2 nats, 1 bit per dim.
  zero = state.replace(params=jax.tree.map(jnp.zeros_like, state.params))
  exact = evaluator(zero, 6)
  for name in ("nelbo", "recon", "iw_nll"):
    assert exact[name] == pytest.approx(784 * math.log(2), rel=1e-4), name
  assert exact["kl"] == 0.0
  assert exact["bits_per_dim"] == pytest.approx(1.0, rel=1e-4)
  assert exact["iw_bits_per_dim"] == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize("overrides", [
    {"vae.architecture": "mlp", "vae.latent_dim": 4},
    {"vae.likelihood": "logistic", "vae.beta": 4.0},
    {"vae.conditional": True},
])
def test_vae_variants_train(idx_dir, overrides):
  config = tiny_config(idx_dir, CONV, **overrides)
  mesh = parallel.make_mesh()
  state = train.init_state(config, mesh, jax.random.key(0), 4)
  step = train.compile_train_step(config, mesh)
  batch = {"image": np.random.default_rng(0).integers(
      0, 256, (16, 28, 28, 1), dtype=np.uint8),
           "label": np.arange(16, dtype=np.int32) % 10}
  losses = []
  for _ in range(3):
    state, metrics = step(state, batch, jax.random.key(1))
    losses.append(float(metrics["loss"]))
  assert all(np.isfinite(losses))


def test_vae_one_and_eight_devices_agree(idx_dir):
  """Per-step metrics and each parameter's update d, ||d1 - d8|| /
  max(||d1||, ||d8||), to ~100 times their summation-order noise; a loss
  that is not reduced over the whole batch (one device's shard) moves them
  by percents."""
  config = tiny_config(idx_dir, CONV)
  rng = np.random.default_rng(0)
  batches = [{"image": rng.integers(0, 256, (16, 28, 28, 1), dtype=np.uint8),
              "label": np.zeros(16, np.int32)} for _ in range(4)]
  (init1, s1, m1), (init8, s8, m8) = (
      steps_on_mesh(config, n, batches, num_train_steps=len(batches))
      for n in (1, 8))
  jax.tree.map(np.testing.assert_array_equal, init1.params, init8.params)
  assert_metrics_agree(m1, m8, rtol=RTOL_METRICS)
  def update(state):
    return jax.tree.map(lambda p, p0: np.asarray(p, np.float64) - p0,
                        state.params, init1.params)
  assert_trees_near(update(s1), update(s8), rtol=RTOL_UPDATES)


def test_vae_stopped_and_resumed_equals_uninterrupted(tmp_path, idx_dir):
  config = tiny_config(idx_dir, CONV, **{"vae.iw_samples": 0,
                                         "checkpoint_every": 100})
  full, full_metrics = train.train_and_evaluate(config, str(tmp_path / "full"))
  workdir = str(tmp_path / "stopped")
  train.train_and_evaluate(config, workdir, stop_at_step=2)
  resumed, resumed_metrics = train.train_and_evaluate(config, workdir)
  for a, b in zip(jax.tree.leaves(jax.device_get(full)),
                  jax.tree.leaves(jax.device_get(resumed))):
    np.testing.assert_array_equal(a, b)
  assert full_metrics == resumed_metrics


def test_evaluation_scores_prior_samples_with_the_feature_network(
    tmp_path, idx_dir):
  """eval_samples > 0: FID and score of prior samples (shipped network); the
  samples' noise is folded with the step, as are the bounds' z draws, and
  each evaluation batch draws its own."""
  config = tiny_config(idx_dir, CONV, eval_samples=32,
                       **{"vae.iw_samples": 0})
  mesh = parallel.make_mesh()
  state = train.init_state(config, mesh, jax.random.key(0), 1)
  # 32 black-and-white images (their binarization is themselves), twice:
  # the second batch of 32 must not reuse the first batch's z.
  images = (np.random.default_rng(0).integers(0, 2, (32, 28, 28, 1)) *
            255).astype(np.uint8)
  twice = data.ArraySource(np.concatenate([images, images]),
                           np.zeros(64, np.int32))
  config.eval_batch_size = 32
  evaluator = vae.make_evaluator(config, mesh, twice, str(tmp_path))
  first, again, other = (evaluator(state, s) for s in (1, 1, 2))
  assert first["fid"] > 0 and 1.0 <= first["score"] <= 10.0
  assert again == first
  for name in ("fid", "score", "recon", "nelbo"):
    assert other[name] != first[name], name
  config.eval_samples = 0
  single = vae.make_evaluator(config, mesh, data.ArraySource(
      images, np.zeros(32, np.int32)), str(tmp_path))(state, 1)
  assert abs(single["recon"] - first["recon"]) > 1e-3
