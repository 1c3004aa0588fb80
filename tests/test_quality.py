"""FID and score against direct computations."""

import json

import numpy as np
import pytest
import scipy.linalg

from genimg_jax import cli, data, parallel, quality, train
from conftest import tiny_config


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


def test_export_features_then_use_it_for_fid(tmp_path, idx_dir, capsys):
  """A trained ResNet workdir -> feature network -> FID of a GAN run."""
  workdir, net = str(tmp_path / "resnet"), str(tmp_path / "net.msgpack")
  config = tiny_config(idx_dir, "resnet.py", num_steps=2, **{
      "model.width": 4, "model.blocks_per_stage": "(1,)"})
  train.train_and_evaluate(config, workdir)
  assert cli.main(["export-features", "--workdir", workdir,
                   "--output", net]) == 0
  meta = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert meta["step"] == 2 and meta["image_shape"] == [28, 28, 1]
  assert meta["sha256"] == quality.file_sha256(net)
  network = quality.load_feature_network(parallel.make_mesh(), net,
                                         (28, 28, 1))
  features, probs = network(np.zeros((16, 28, 28, 1), np.uint8))
  assert features.shape == (16, 4) and probs.shape == (16, 10)  # 1 stage.
  with pytest.raises(ValueError, match=r"takes images of shape \(28, 28, 1\)"):
    quality.load_feature_network(parallel.make_mesh(), net, (32, 32, 3))
  gan_config = tiny_config(idx_dir, "dcgan.py", num_steps=1,
                           eval_samples=32, feature_network=net)
  _, metrics = train.train_and_evaluate(gan_config, str(tmp_path / "gan"))
  assert metrics["fid"] > 0 and 1.0 <= metrics["score"] <= 10.0


def test_export_refuses_a_generative_workdir(tmp_path, idx_dir, capsys):
  workdir = str(tmp_path / "gan")
  train.train_and_evaluate(tiny_config(idx_dir, "dcgan.py", num_steps=1),
                           workdir)
  assert cli.main(["export-features", "--workdir", workdir,
                   "--output", str(tmp_path / "x")]) == 2
  assert "not a classifier" in capsys.readouterr().err


def test_fid_without_feature_network_says_what_to_do(idx_dir):
  config = tiny_config(idx_dir, "dcgan.py", eval_samples=16,
                       feature_network="")
  with pytest.raises(ValueError, match="needs config.feature_network"):
    quality.metrics_for_config(config, parallel.make_mesh(), data.ArraySource(
        np.zeros((16, 28, 28, 1), np.uint8), np.zeros(16, np.int32)))


def test_shipped_network_is_found_by_name():
  assert quality.feature_network_path("fashion_mnist_resnet") == (
      quality.FEATURE_NETWORK)
  assert quality.feature_network_path("/x/net.msgpack") == "/x/net.msgpack"
