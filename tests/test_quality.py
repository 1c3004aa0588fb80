"""FID and score against direct computations and known answers."""

import itertools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from genimg_jax import classifier, cli, data, parallel, quality, train
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


def _pixel_network(channels, batch_size):
  """A real FeatureNetwork (8-device mesh) around a hand-set ResNet without
  residual stages, on 1x1 images of `channels` channels: features = logits =
  the pixel values times c = 1/sqrt(1 + 1e-5) (BatchNorm's epsilon), so an
  image whose one nonzero channel k is 255 is class k with probability 1."""
  model = classifier.ResNet(num_classes=channels, width=channels,
                            blocks_per_stage=())
  eye = np.eye(channels, dtype=np.float32)
  kernel = np.zeros((3, 3, channels, channels), np.float32)
  kernel[1, 1] = 255 * eye  # Undoes to_float's / 255.
  zeros, ones = np.zeros(channels, np.float32), np.ones(channels, np.float32)
  variables = {
      "params": {"Conv_0": {"kernel": kernel},
                 "BatchNorm_0": {"scale": ones, "bias": zeros},
                 "Dense_0": {"kernel": eye, "bias": zeros}},
      "batch_stats": {"BatchNorm_0": {"mean": zeros, "var": ones}}}
  template = model.init(jax.random.key(0), jnp.zeros((1, 1, 1, channels)))
  assert jax.tree.structure(variables) == jax.tree.structure(template)
  return quality.FeatureNetwork(model, variables, parallel.make_mesh(),
                                batch_size)


def _cube(center, half_side, repeats):
  """Every corner of the cube center +- half_side, `repeats` times, as uint8
  1x1 images [16 * repeats, 1, 1, 4]: mean exactly `center`, covariance
  exactly half_side^2 N / (N - 1) I (np.cov's N - 1)."""
  corners = np.array(list(itertools.product((-1, 1), repeat=len(center))))
  pixels = np.tile(np.asarray(center) + half_side * corners, (repeats, 1))
  return pixels.astype(np.uint8)[:, None, None, :]


def test_fid_known_answer_through_the_whole_metric_path():
  """Real and generated features with known means and isotropic covariances:
  FID = ||m1 - m2||^2 + d (s1 - s2)^2 (s: standard deviations). 48 and 32
  images in chunks of 40: both sets end in a padded chunk."""
  network = _pixel_network(4, batch_size=40)
  m1, m2 = np.array([100, 120, 140, 60]), np.array([110, 100, 150, 90])
  real, fake = _cube(m1, 20, 3), _cube(m2, 10, 2)
  s1, s2 = 20 * math.sqrt(48 / 47), 10 * math.sqrt(32 / 31)
  want = (np.sum((m1 - m2) ** 2) + 4 * (s1 - s2) ** 2) / (1 + 1e-5)
  metrics = quality.QualityMetrics(network, real)
  assert metrics(fake)["fid"] == pytest.approx(want, rel=1e-4)  # 1904.1
  assert metrics(real)["fid"] == pytest.approx(0, abs=1e-6 * want)


def test_score_known_answer_through_the_whole_metric_path():
  """A perfect classifier: K classes evenly covered score K, one class 1,
  classes in proportion 3:1 exp(H) = 4 / 3^(3/4). 40 images in chunks of 16:
  the last chunk is padded with copies of its last image."""
  network = _pixel_network(4, batch_size=16)
  real = _cube([100, 100, 100, 100], 10, 1)

  def one_hot(classes):
    images = np.zeros((len(classes), 1, 1, 4), np.uint8)
    images[np.arange(len(classes)), 0, 0, classes] = 255
    return images

  metrics = quality.QualityMetrics(network, real)
  assert metrics(one_hot(np.arange(40) % 4))["score"] == pytest.approx(
      4, rel=1e-6)
  assert metrics(one_hot(np.full(40, 2)))["score"] == pytest.approx(
      1, rel=1e-6)
  uneven = one_hot(np.where(np.arange(40) < 30, 0, 3))
  assert metrics(uneven)["score"] == pytest.approx(4 / 3 ** 0.75, rel=1e-6)


def test_feature_network_matches_the_model_on_the_whole_array():
  """Sharding over the 8-device mesh, chunking (16, 16, then 5 padded to 16)
  and the removal of the padding give, image by image, what the flax model
  gives on the whole array at once."""
  model = classifier.ResNet(num_classes=10, width=4, blocks_per_stage=(1, 1))
  variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  rng = np.random.default_rng(1)
  # BatchNorm scales, biases and statistics in [0.5, 1.5], not 1 (or 0) / 0 /
  # 0 / 1, so that no BatchNorm is the identity or zeroes its branch.
  variables = jax.tree_util.tree_map_with_path(
      lambda path, x: (rng.uniform(0.5, 1.5, x.shape).astype(np.float32)
                       if "BatchNorm" in jax.tree_util.keystr(path) else x),
      variables)
  noise = np.random.default_rng(0).integers(0, 128, (37, 28, 28, 1))
  images = (noise + 3 * np.arange(37)[:, None, None, None]).astype(np.uint8)
  network = quality.FeatureNetwork(model, variables, parallel.make_mesh(),
                                   batch_size=16)
  features, probs = network(images)
  x = classifier.to_float(images)
  apply = jax.jit(model.apply, static_argnames="features")
  want_features = apply(variables, x, features=True)
  want_probs = jax.nn.softmax(apply(variables, x))
  assert features.shape == (37, 8) and probs.shape == (37, 10)
  np.testing.assert_allclose(features, want_features, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(probs, want_probs, rtol=1e-4, atol=1e-6)
  # Any two images' features differ by over 5x the tolerance (features are
  # under 1): a misordered row would show.
  assert np.max(np.abs(want_features)) < 1
  distance = np.abs(want_features[:, None] - want_features[None]).max(-1)
  assert np.min(distance + np.diag(np.full(37, np.inf))) > 5e-4


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
