"""FID and score against direct computations."""

import numpy as np
import pytest
import scipy.linalg

from genimg_jax import data, parallel, quality


def _scipy_frechet(mu1, s1, mu2, s2):
  covmean = scipy.linalg.sqrtm(s1 @ s2).real
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


def _random_cov(rng, d):
  a = rng.normal(size=(d, d))
  return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_matches_scipy():
  rng = np.random.default_rng(0)
  for d in (1, 4, 32):
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
    assert quality.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(
        _scipy_frechet(mu1, s1, mu2, s2), rel=1e-6, abs=1e-8)


def test_frechet_distance_known_gaussians():
  d = 5
  mu = np.arange(d, dtype=float)
  assert quality.frechet_distance(mu, np.eye(d), mu, np.eye(d)) == (
      pytest.approx(0.0, abs=1e-9))
  # N(0, a^2 I) vs N(m, b^2 I): |m|^2 + d (a - b)^2.
  m = np.full(d, 2.0)
  got = quality.frechet_distance(np.zeros(d), 4 * np.eye(d), m, 9 * np.eye(d))
  assert got == pytest.approx(np.sum(m ** 2) + d * (2 - 3) ** 2)


def test_gaussian_stats_recover_a_sampled_gaussian():
  rng = np.random.default_rng(1)
  cov = _random_cov(rng, 3)
  samples = rng.multivariate_normal(np.ones(3), cov, size=200_000)
  mu, sigma = quality.gaussian_stats(samples)
  assert quality.frechet_distance(mu, sigma, np.ones(3), cov) < 1e-3


def test_classifier_score_limits():
  k = 10
  confident_uniform = np.eye(k)[np.arange(1000) % k]
  assert quality.classifier_score(confident_uniform) == pytest.approx(k,
                                                                      rel=1e-6)
  one_class = np.tile(np.eye(k)[3], (100, 1))
  assert quality.classifier_score(one_class) == pytest.approx(1.0)
  assert quality.classifier_score(np.full((50, k), 1 / k)) == pytest.approx(1)


def test_shipped_feature_network_loads_and_classifies():
  network = quality.load_feature_network(parallel.make_mesh())
  images = data.load_idx_split(data.DEBIAN_FASHION_MNIST, "test").images
  features, probs = network(images[:1000])
  assert features.shape == (1000, 4 * network.model.width)
  np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
  labels = data.load_idx_split(data.DEBIAN_FASHION_MNIST, "test").labels
  assert np.mean(probs.argmax(1) == labels[:1000]) > 0.9


def test_corrupt_feature_network_is_refused(tmp_path):
  path = tmp_path / "net.msgpack"
  path.write_bytes(b"not a network")
  (tmp_path / "net.msgpack.json").write_text(
      '{"width": 4, "blocks_per_stage": [1], "sha256": "0"}')
  with pytest.raises(ValueError, match="SHA-256"):
    quality.load_feature_network(parallel.make_mesh(), str(path))
