"""VAEs: KL, likelihoods, the ELBO step, the importance-weighted bound."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genimg_jax import parallel, train, vae
from conftest import tiny_config

CONV = "vae_conv.py"


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


def test_dynamic_binarization_draws_fresh_pixels():
  image = jnp.full((1, 28, 28, 1), 128, jnp.uint8)
  a = vae.model_input(image, "bernoulli", jax.random.key(0))
  b = vae.model_input(image, "bernoulli", jax.random.key(1))
  assert set(np.unique(a).tolist()) == {0.0, 1.0}
  assert not np.array_equal(a, b)
  assert abs(float(a.mean()) - 128 / 255) < 0.06


def _trained_state(idx_dir, tmp_path, **overrides):
  config = tiny_config(idx_dir, CONV, **{"vae.iw_samples": 0, **overrides})
  state, metrics = train.train_and_evaluate(config, str(tmp_path / "run"))
  return config, state, metrics


def test_importance_weighted_bound_tightens(idx_dir, tmp_path):
  config, state, _ = _trained_state(idx_dir, tmp_path)
  settings = vae.settings_from_config(config)
  images = vae.binarize_once(np.random.default_rng(0).integers(
      0, 256, (64, 28, 28, 1), dtype=np.uint8))
  elbo = jnp.mean(sum(vae.elbo_terms(state.apply_fn, state.params, images,
                                     None, jax.random.key(i), settings)[0] -
                      vae.elbo_terms(state.apply_fn, state.params, images,
                                     None, jax.random.key(i), settings)[1]
                      for i in range(20)) / 20)
  bounds = {k: float(jnp.mean(vae.importance_weighted_bound(
      state.apply_fn, state.params, images, None, jax.random.key(5), settings,
      k, chunk=min(k, 50)))) for k in (1, 10, 100)}
  assert bounds[1] == pytest.approx(float(elbo), rel=0.02)
  assert float(elbo) < bounds[10] < bounds[100]


def test_vae_train_and_evaluate(idx_dir, tmp_path):
  config, state, metrics = _trained_state(
      idx_dir, tmp_path, **{"vae.iw_samples": 10})
  assert metrics["nelbo"] == pytest.approx(metrics["recon"] + metrics["kl"],
                                           rel=1e-5)
  assert metrics["iw_nll"] <= metrics["nelbo"] + 1.0
  assert metrics["bits_per_dim"] == pytest.approx(
      metrics["nelbo"] / (784 * math.log(2)))
  samples = sorted(os.listdir(tmp_path / "run" / "samples"))
  assert samples == ["interp_000006.png", "prior_000006.png",
                     "recon_000006.png"]


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
  assert float(metrics["nelbo"]) == pytest.approx(
      float(metrics["recon"]) + float(metrics["kl"]), rel=1e-5)
  if config.vae.beta != 1.0:
    assert float(metrics["loss"]) == pytest.approx(
        float(metrics["recon"]) + 4.0 * float(metrics["kl"]), rel=1e-5)


def test_vae_one_and_eight_devices_agree(tmp_path, idx_dir):
  params = {}
  for n in (1, 8):
    config = tiny_config(idx_dir, CONV, **{"mesh.num_devices": n,
                                           "vae.iw_samples": 0})
    state, _ = train.train_and_evaluate(config, str(tmp_path / str(n)))
    params[n] = jax.device_get(state.params)
  # Adam rescales near-zero gradients, so summation-order noise in those
  # shows up at ~1e-5 in a few of the 800k weights.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4,
                                                       atol=5e-5),
               params[1], params[8])


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
  """eval_samples > 0: FID and score of prior samples (shipped network)."""
  config = tiny_config(idx_dir, CONV, num_steps=1, eval_samples=32,
                       **{"vae.iw_samples": 0})
  _, metrics = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert metrics["fid"] > 0 and 1.0 <= metrics["score"] <= 10.0
  assert np.isfinite(metrics["nelbo"])
