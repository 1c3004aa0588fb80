"""FID and score against direct computations and known answers."""

import itertools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from genimg_jax import classifier, cli, data, images as images_lib, parallel
from genimg_jax import config as config_lib, quality, train
from conftest import tiny_config, write_idx_dir


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


def _improved_gan_inception_score(logits, splits=10):
  """openai/improved-gan's `inception_score/model.py` after its softmax
  (there `softmax(pool_3 @ W)`), written out in float64 numpy."""
  x = np.asarray(logits, np.float64)
  preds = np.exp(x - x.max(1, keepdims=True))
  preds /= preds.sum(1, keepdims=True)
  scores = []
  for i in range(splits):
    part = preds[(i * preds.shape[0] // splits):
                 ((i + 1) * preds.shape[0] // splits), :]
    kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
    kl = np.mean(np.sum(kl, 1))
    scores.append(np.exp(kl))
  return np.mean(scores), np.std(scores)


def _skewed_logits(rng, n, k=1008):
  """Logits whose splits score differently: a few dominant classes, scale
  varying by row, so neither the marginal nor the scores are uniform."""
  prior = np.linspace(3.0, -3.0, k)
  scale = rng.uniform(0.5, 4.0, (n, 1))
  return (scale * rng.normal(size=(n, k)) + prior).astype(np.float32)


@pytest.mark.parametrize("n", [1000, 1003, 999])
def test_inception_score_equals_improved_gans_formula(n):
  """10 splits, mean and population std over them, every row used: split s
  holds rows [s n // 10, (s + 1) n // 10) (1003 rows: splits of 100 and 101,
  as improved-gan and torch-fidelity cut them)."""
  logits = _skewed_logits(np.random.default_rng(n), n)
  mean, std = quality.inception_score(logits)
  want_mean, want_std = _improved_gan_inception_score(logits)
  assert mean == pytest.approx(want_mean, rel=1e-10)
  assert std == pytest.approx(want_std, rel=1e-8)
  # The test can tell the plausible wrong protocols apart: one split, the
  # remainder dropped (splits of n // 10), a bias added to the logits.
  assert 1.5 < mean < 500 and std > 1e-3 * mean
  one_split = _improved_gan_inception_score(logits, splits=1)[0]
  assert abs(one_split - mean) > 1e-3 * mean
  biased = _improved_gan_inception_score(
      logits + np.random.default_rng(0).normal(0, 0.3, logits.shape[1]))[0]
  assert abs(biased - mean) > 1e-4 * mean
  if n % 10:
    cut = n // 10 * 10
    dropped = _improved_gan_inception_score(logits[:cut])
    assert abs(dropped[0] - mean) > 1e-6 * mean or abs(
        dropped[1] - std) > 1e-4 * std


def test_inception_score_limits_and_inputs():
  """Confident and evenly covering K classes: K, std 0; one class: 1."""
  k = 8
  confident = 50.0 * np.eye(k)[np.arange(400) % k]
  assert quality.inception_score(confident) == pytest.approx((k, 0.0),
                                                             abs=1e-9)
  assert quality.inception_score(np.tile(confident[3], (40, 1)))[0] == (
      pytest.approx(1.0))
  with pytest.raises(ValueError, match="N >= splits = 10"):
    quality.inception_score(np.zeros((9, 3)))


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
  return quality.FeatureNetwork(quality.resnet_features_and_logits(model),
                                variables, parallel.make_mesh(), batch_size)


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


def test_inception_score_through_the_whole_metric_path():
  """A network with score="inception" reports inception_score and its std
  (not "score") from its logits, cut into 10 splits in sample order: 37
  images in chunks of 16 (padded), splits of 3 and 4 rows."""
  base = _pixel_network(4, batch_size=16)
  network = quality.FeatureNetwork(base.features_and_logits, base.variables,
                                   base.mesh, 16, score="inception")
  rng = np.random.default_rng(0)
  fake = rng.integers(0, 4, (37, 1, 1, 4)).astype(np.uint8)
  fake[:, 0, 0, 0] += 2 * (np.arange(37) >= 20).astype(np.uint8)
  metrics = quality.QualityMetrics(network, _cube([100, 100, 100, 100], 10,
                                                  1))(fake)
  logits = fake[:, 0, 0, :].astype(np.float64) / math.sqrt(1 + 1e-5)
  want = _improved_gan_inception_score(logits)
  assert "score" not in metrics
  assert metrics["inception_score"] == pytest.approx(want[0], rel=1e-6)
  assert metrics["inception_score_std"] == pytest.approx(want[1], rel=1e-5)
  assert want[1] > 0.01  # The splits differ: their order matters.
  # The same network as a classifier: one split, key "score".
  classifier_metrics = quality.QualityMetrics(
      base, _cube([100, 100, 100, 100], 10, 1))(fake)
  assert "inception_score" not in classifier_metrics
  assert classifier_metrics["score"] == pytest.approx(
      _improved_gan_inception_score(logits, splits=1)[0], rel=1e-6)


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
  network = quality.FeatureNetwork(quality.resnet_features_and_logits(model),
                                   variables, parallel.make_mesh(),
                                   batch_size=16)
  features, logits = network(images)
  x = classifier.to_float(images)
  apply = jax.jit(model.apply, static_argnames="features")
  want_features = apply(variables, x, features=True)
  want_logits = apply(variables, x)
  assert features.shape == (37, 8) and logits.shape == (37, 10)
  np.testing.assert_allclose(features, want_features, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(logits, want_logits, rtol=1e-4, atol=1e-5)
  # Any two images' features differ by over 5x the tolerance (features are
  # under 1): a misordered row would show.
  assert np.max(np.abs(want_features)) < 1
  distance = np.abs(want_features[:, None] - want_features[None]).max(-1)
  assert np.min(distance + np.diag(np.full(37, np.inf))) > 5e-4


def test_shipped_feature_network_loads_and_classifies():
  network = quality.load_feature_network(parallel.make_mesh())
  images = data.load_idx_split(data.DEBIAN_FASHION_MNIST, "test").images
  features, logits = network(images[:1000])
  assert features.shape == (1000, 64)  # 4 x the shipped ResNet width 16.
  assert network.score == "classifier" and logits.shape == (1000, 10)
  labels = data.load_idx_split(data.DEBIAN_FASHION_MNIST, "test").labels
  assert np.mean(logits.argmax(1) == labels[:1000]) > 0.9


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
  features, logits = network(np.zeros((16, 28, 28, 1), np.uint8))
  assert features.shape == (16, 4) and logits.shape == (16, 10)  # 1 stage.
  with pytest.raises(ValueError, match=r"takes images of shape \(28, 28, 1\)"):
    quality.load_feature_network(parallel.make_mesh(), net, (32, 32, 3))
  gan_config = tiny_config(idx_dir, "dcgan.py", num_steps=1,
                           eval_samples=32, feature_network=net)
  _, metrics = train.train_and_evaluate(gan_config, str(tmp_path / "gan"))
  assert metrics["fid"] > 0 and 1.0 <= metrics["score"] <= 10.0
  assert 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
  assert metrics["kid"] > 0 and metrics["kid_std"] >= 0

  # `genimg fid-stats` writes the real split's statistics in pytorch-fid's
  # layout; an evaluation that reads them gets the same FID.
  stats = str(tmp_path / "stats.npz")
  assert cli.main(["fid-stats", "--config", "experiments/dcgan.py",
                   f"--config.data.idx_dir={idx_dir}",
                   f"--config.feature_network={net}", "--output", stats]) == 0
  saved = np.load(stats)
  real = data.load_idx_split(idx_dir, "test").images
  want_mu, want_sigma = quality.gaussian_stats(network(real)[0])
  np.testing.assert_allclose(saved["mu"], want_mu, rtol=1e-6)
  np.testing.assert_allclose(saved["sigma"], want_sigma, rtol=1e-6,
                             atol=1e-9)
  assert saved["sigma"].shape == (4, 4) and saved["mu"].dtype == np.float64
  gan_dir = str(tmp_path / "gan")
  with_stats = train.evaluate_workdir(gan_dir, [f"fid_stats={stats}"])
  assert with_stats["fid"] == pytest.approx(metrics["fid"], rel=1e-6)
  assert with_stats["kid"] == pytest.approx(metrics["kid"], rel=1e-6)
  np.savez(stats, mu=want_mu + 1.0, sigma=want_sigma)  # pytorch-fid's keys.
  shifted = train.evaluate_workdir(gan_dir, [f"fid_stats={stats}"])
  assert shifted["fid"] > metrics["fid"] + 1.0
  assert "kid" not in shifted and "precision" not in shifted  # Other set?
  np.savez(stats, mu=np.zeros(3), sigma=np.eye(3))
  with pytest.raises(ValueError, match="3 features do not fit"):
    train.evaluate_workdir(gan_dir, [f"fid_stats={stats}"])


def test_export_refuses_a_generative_workdir(tmp_path, idx_dir, capsys):
  workdir = str(tmp_path / "gan")
  train.train_and_evaluate(tiny_config(idx_dir, "dcgan.py", num_steps=1),
                           workdir)
  assert cli.main(["export-features", "--workdir", workdir,
                   "--output", str(tmp_path / "x")]) == 2
  assert "not a classifier" in capsys.readouterr().err


def test_fid_without_feature_network_says_what_to_do(idx_dir):
  with pytest.raises(config_lib.ConfigError,
                     match="eval_samples=16: an FID needs a feature network"):
    tiny_config(idx_dir, "dcgan.py", eval_samples=16, feature_network="")
  # A config built in code, not validated: the evaluator still says so.
  config = tiny_config(idx_dir, "dcgan.py")
  with config.unlocked():
    config.eval_samples, config.feature_network = 16, ""
  with pytest.raises(ValueError, match="needs config.feature_network"):
    quality.metrics_for_config(config, parallel.make_mesh(), data.ArraySource(
        np.zeros((16, 28, 28, 1), np.uint8), np.zeros(16, np.int32)))


def test_kid_and_precision_recall_through_the_whole_metric_path():
  """QualityMetrics reports KID and precision/recall of the network's
  features: identical sets give precision = recall = 1, far sets 0, and the
  values equal the functions applied to the features."""
  network = _pixel_network(4, batch_size=40)
  real = _cube([100, 120, 140, 60], 20, 3)
  far = _cube([20, 20, 20, 230], 10, 2)
  metrics = quality.QualityMetrics(network, real)
  same, other = metrics(real), metrics(far)
  assert same["precision"] == 1 and same["recall"] == 1
  assert other["precision"] == 0 and other["recall"] == 0
  features = lambda x: network(x)[0]
  assert other["kid"] == pytest.approx(quality.kernel_inception_distance(
      features(far), features(real))[0], rel=1e-9)
  assert abs(same["kid"]) < 1e-2 * other["kid"]  # Measured 3e-3.
  # Generated images cover one of the real set's two modes (48 and 32
  # images): all of them are real-looking (precision 1), the 48 of the
  # covered mode are the recalled part of the real set (recall 48 / 80).
  two_modes = quality.QualityMetrics(network, np.concatenate([real, far]))
  one_mode = two_modes(real)
  assert one_mode["precision"] == 1 and one_mode["recall"] == 0.6


def test_quality_metrics_keep_the_real_radii_across_evaluations():
  """The real set's k-NN radii are computed once; every evaluation's
  precision/recall equals the function on that evaluation's features."""
  network = _pixel_network(4, batch_size=40)
  rng = np.random.default_rng(0)
  real = rng.integers(0, 200, (60, 1, 1, 4), dtype=np.uint8)
  fakes = [rng.integers(90, 256, (n, 1, 1, 4), dtype=np.uint8)
           for n in (50, 30)]
  metrics = quality.QualityMetrics(network, real)
  for fake in fakes:
    got = metrics(fake)
    want = quality.precision_recall(network(real)[0], network(fake)[0])
    assert 0 < want["precision"] < 1 and 0 < want["recall"] < 1
    assert (got["precision"], got["recall"]) == (want["precision"],
                                                 want["recall"])
  with pytest.raises(ValueError, match="real_radii_sq_N must have shape"):
    quality.precision_recall(network(real)[0], network(fakes[0])[0],
                             real_radii_sq_N=np.ones(59))


def _untrained_feature_network(path, idx_dir):
  """A saved ResNet of width 4 (4 features), fresh from init."""
  config = tiny_config(idx_dir, "resnet.py", **{
      "model.width": 4, "model.blocks_per_stage": "(1,)"})
  state = classifier.create_train_state(config, jax.random.key(0), 1)
  quality.save_feature_network(state, config.model, path)


def test_reference_split_selects_the_real_images(tmp_path):
  """config.eval_reference_split picks the split whose images are the
  reference features (train: 48 images, test: 40); "eval" and configs
  without the field use data.eval_split, today's reference."""
  idx = str(tmp_path / "idx")
  train_split, test_split = write_idx_dir(idx, num_train=48, num_test=40)
  net = str(tmp_path / "net.msgpack")
  _untrained_feature_network(net, idx)
  mesh = parallel.make_mesh()
  network = quality.load_feature_network(mesh, net)
  config = tiny_config(idx, "dcgan.py", eval_samples=16, feature_network=net)
  assert config.eval_reference_split == "test" == config.data.eval_split
  eval_source = data.load_split(config.data, config.data.eval_split)
  for choice, want in (("test", test_split), ("train", train_split),
                       ("eval", test_split)):
    config.eval_reference_split = choice
    metric = quality.metrics_for_config(config, mesh, eval_source)
    np.testing.assert_allclose(metric.real_features,
                               network(want.images)[0], rtol=1e-6)
  with config.unlocked():
    del config.eval_reference_split  # A config.json of an older run.
  assert quality.reference_split(config) == "test"
  with config.unlocked():
    config.eval_reference_split = "validation"
  with pytest.raises(ValueError, match="eval_reference_split must be one"):
    quality.metrics_for_config(config, mesh, eval_source)


def test_fid_stats_turn_kid_and_precision_recall_off_unless_same_set(
    tmp_path, capsys):
  """With config.fid_stats, KID and precision/recall are computed only
  against the very images the statistics came from (`genimg fid-stats`
  records their split, count and SHA-256); otherwise they are off and a line
  says why. FID uses the file's statistics either way."""
  idx = str(tmp_path / "idx")
  train_split, _ = write_idx_dir(idx, num_train=48, num_test=40)
  net = str(tmp_path / "net.msgpack")
  _untrained_feature_network(net, idx)
  mesh = parallel.make_mesh()
  config = tiny_config(idx, "dcgan.py", eval_samples=16, feature_network=net,
                       eval_reference_split="train")
  eval_source = data.load_split(config.data, config.data.eval_split)
  train_stats = str(tmp_path / "train.npz")
  written = quality.write_fid_stats(config, mesh, train_stats)
  assert (written["split"], written["num_images"]) == ("train", 48)
  assert quality.fid_stats_reference(train_stats) == (
      quality.reference_identity("train", train_split.images))
  fake = np.random.default_rng(1).integers(0, 256, (20, 28, 28, 1),
                                           dtype=np.uint8)
  plain = quality.metrics_for_config(config, mesh, eval_source)(fake)

  # The same split: FID from the file (equal to the plain one), KID and
  # precision/recall against the same 48 images.
  config.fid_stats = train_stats
  same = quality.metrics_for_config(config, mesh, eval_source)(fake)
  assert "are off" not in capsys.readouterr().out
  assert same == pytest.approx(plain, rel=1e-6)
  assert {"kid", "kid_std", "precision", "recall"} <= set(same)

  def off(why):
    metrics = quality.metrics_for_config(config, mesh, eval_source)
    assert metrics.real_features is None  # The real set is not even run.
    got = metrics(fake)
    out = capsys.readouterr().out
    assert "KID and precision/recall are off" in out and why in out, out
    assert set(got) == {"fid", "score"}
    assert got["fid"] == pytest.approx(plain["fid"], rel=1e-6)

  config.eval_reference_split = "test"  # Stats of train, reference test.
  off("comes from 48 images of the 'train' split")
  config.eval_reference_split = "train"
  other = str(tmp_path / "other")  # Same split and count, other images.
  write_idx_dir(other, num_train=48, num_test=40, seed=5)
  config.data.idx_dir = other
  off("comes from other images")
  config.data.idx_dir = idx
  mu, sigma = quality.load_fid_stats(train_stats)
  np.savez(train_stats, mu=mu, sigma=sigma)  # pytorch-fid's keys only.
  off("records no reference set")


def test_fid_stats_file_checks(tmp_path):
  path = str(tmp_path / "s.npz")
  quality.save_fid_stats(path, np.zeros(3), np.eye(3), "inception")
  mu, sigma = quality.load_fid_stats(path, "inception")
  assert mu.shape == (3,) and sigma.shape == (3, 3)
  with pytest.raises(ValueError, match="'inception' features"):
    quality.load_fid_stats(path, "fashion_mnist_resnet.msgpack")
  np.savez(path, m=np.zeros(3))
  with pytest.raises(ValueError, match="'mu' and 'sigma'"):
    quality.load_fid_stats(path)
  with pytest.raises(FileNotFoundError, match="genimg fid-stats"):
    quality.load_fid_stats(str(tmp_path / "missing.npz"))


def test_shipped_network_is_found_by_name():
  assert quality.feature_network_path("fashion_mnist_resnet") == (
      quality.FEATURE_NETWORK)
  assert quality.feature_network_path("/x/net.msgpack") == "/x/net.msgpack"


def _brute_force_kid(x, y):
  """Unbiased MMD^2 with k(u, v) = (u.v / D + 1)^3, by explicit loops."""
  m, d = x.shape

  def kernel(u, v):
    return (sum(u[t] * v[t] for t in range(d)) / d + 1) ** 3

  xx = sum(kernel(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
  yy = sum(kernel(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
  xy = sum(kernel(x[i], y[j]) for i in range(m) for j in range(m))
  return xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2 * xy / (m * m)


def test_kid_matches_brute_force_double_loops():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(9, 3)) * 1.5 + 0.5
  y = rng.normal(size=(9, 3)) - 0.7
  mean, std = quality.kernel_inception_distance(x, y, num_subsets=1,
                                                subset_size=9)
  assert mean == pytest.approx(_brute_force_kid(x, y), rel=1e-10)
  assert std == 0.0


def test_kid_subsets_mean_and_std_follow_the_documented_draws():
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(15, 2)), rng.normal(size=(12, 2)) + 0.4
  mean, std = quality.kernel_inception_distance(a, b, num_subsets=4,
                                                subset_size=6, seed=7)
  draw = np.random.default_rng(7)
  per_subset = []
  for _ in range(4):
    x = a[draw.choice(15, 6, replace=False)]
    y = b[draw.choice(12, 6, replace=False)]
    per_subset.append(_brute_force_kid(x, y))
  assert mean == pytest.approx(np.mean(per_subset), rel=1e-10)
  assert std == pytest.approx(np.std(per_subset), rel=1e-8)
  assert std > 0
  # The subsets are capped at the smaller set: m = min(subset_size, N, M).
  capped = quality.kernel_inception_distance(a, b, num_subsets=1,
                                             subset_size=100, seed=3)
  draw = np.random.default_rng(3)
  x, y = a[draw.choice(15, 12, replace=False)], b[draw.choice(12, 12,
                                                              replace=False)]
  assert capped[0] == pytest.approx(_brute_force_kid(x, y), rel=1e-10)


def test_kid_same_sets_near_zero_and_shifted_sets_positive():
  rng = np.random.default_rng(2)
  a, b = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
  shifted = rng.normal(size=(400, 16)) + 0.5
  kwargs = dict(num_subsets=10, subset_size=200)
  same, _ = quality.kernel_inception_distance(a, a, **kwargs)
  twin, _ = quality.kernel_inception_distance(a, b, **kwargs)
  far, far_std = quality.kernel_inception_distance(a, shifted, **kwargs)
  assert far > 0.5 and far > 10 * far_std / np.sqrt(10)
  assert abs(same) < 0.05 * far
  assert abs(twin) < 0.05 * far


def test_kid_is_unbiased_where_the_diagonal_version_is_not():
  rng = np.random.default_rng(3)
  m, d, draws = 8, 4, 300
  unbiased, biased = [], []
  for _ in range(draws):
    x, y = rng.normal(size=(m, d)), rng.normal(size=(m, d))
    unbiased.append(quality.kernel_inception_distance(
        x, y, num_subsets=1, subset_size=m)[0])
    k_xx, k_yy, k_xy = ((u @ v.T / d + 1) ** 3
                        for u, v in ((x, x), (y, y), (x, y)))
    biased.append(k_xx.mean() + k_yy.mean() - 2 * k_xy.mean())
  # Standard error of the mean is about 0.05; the diagonal adds about 2.4.
  assert np.mean(biased) > 1.5
  assert abs(np.mean(unbiased)) < 0.3


def test_kid_rejects_bad_inputs():
  ok = np.zeros((5, 3))
  kid = quality.kernel_inception_distance
  with pytest.raises(ValueError, match="features_a_ND must be 2-D"):
    kid(np.zeros(5), ok)
  with pytest.raises(ValueError, match="features_b_MD must be 2-D"):
    kid(ok, np.zeros((5, 3, 1)))
  with pytest.raises(ValueError, match="different feature dimensions: 3 vs 4"):
    kid(ok, np.zeros((5, 4)))
  with pytest.raises(ValueError, match="features_b_MD needs at least 2"):
    kid(ok, np.zeros((1, 3)))
  with pytest.raises(ValueError, match="num_subsets must be >= 1"):
    kid(ok, ok, num_subsets=0)
  with pytest.raises(ValueError, match="subset_size must be >= 2"):
    kid(ok, ok, subset_size=1)


def test_precision_recall_identical_and_disjoint_sets():
  rng = np.random.default_rng(4)
  a = rng.normal(size=(100, 5))
  assert quality.precision_recall(a, a) == {"precision": 1.0, "recall": 1.0}
  assert quality.precision_recall(a, a + 100.0) == {"precision": 0.0,
                                                    "recall": 0.0}


def test_precision_recall_counted_by_hand():
  # k = 2. Real radii (2nd neighbour): 0:2 1:1 2:2 | 10:2 11:1 12:1 13:2, so
  # the real manifold is [-2, 4] u [8, 15]: fakes 1, 2, 3, 4 (4 on the edge
  # of 2's ball) are inside, 20..23 not: precision 4/8. Fake radii: 1:2 2:1
  # 3:1 4:2 | 20:2 21:1 22:1 23:2, so the fake manifold is [-1, 6] u [18, 25]:
  # reals 0 (on the edge of 1's ball), 1, 2 are inside, 10..13 not: 3/7.
  real = np.array([0, 1, 2, 10, 11, 12, 13], np.float64)[:, None]
  fake = np.array([1, 2, 3, 4, 20, 21, 22, 23], np.float64)[:, None]
  assert quality.precision_recall(real, fake, k=2) == {"precision": 4 / 8,
                                                       "recall": 3 / 7}
  # The same points on a 2-D diagonal (3-4-5 direction, exact distances).
  direction = np.array([[3.0, 4.0]])
  assert quality.precision_recall(real * direction, fake * direction,
                                  k=2) == {"precision": 4 / 8, "recall": 3 / 7}


def _brute_force_precision_recall(real, fake, k):
  """(precision, recall) from full distance matrices; index 0 is the self."""
  from scipy.spatial import distance  # pylint: disable=import-outside-toplevel

  def radii(x):
    return np.sort(distance.cdist(x, x), axis=1)[:, k]

  def inside(queries, centres):
    dist = distance.cdist(queries, centres)
    return np.mean(np.any(dist <= radii(centres)[None, :], axis=1))

  return inside(fake, real), inside(real, fake)


def test_precision_recall_blocked_equals_unblocked_and_brute_force():
  rng = np.random.default_rng(5)
  real, fake = rng.normal(size=(130, 6)), rng.normal(size=(110, 6)) + 0.4
  whole = quality.precision_recall(real, fake, k=3)
  want = _brute_force_precision_recall(real, fake, k=3)
  assert (whole["precision"], whole["recall"]) == pytest.approx(want,
                                                                abs=1e-12)
  assert 0.2 < whole["precision"] < 0.99 and 0.2 < whole["recall"] < 0.99
  for batch_size in (1, 7, 64, 110, 129):
    assert quality.precision_recall(real, fake, k=3,
                                    batch_size=batch_size) == whole


def test_precision_recall_one_mode_of_two():
  rng = np.random.default_rng(6)
  real = np.concatenate([rng.normal(size=(200, 2)) + [-10, 0],
                         rng.normal(size=(200, 2)) + [10, 0]])
  fake = rng.normal(size=(200, 2)) + [-10, 0]
  got = quality.precision_recall(real, fake, k=3)
  assert got["precision"] > 0.9
  assert 0.4 < got["recall"] <= 0.5


def test_precision_recall_rejects_bad_inputs():
  ok = np.zeros((5, 3))
  pr = quality.precision_recall
  with pytest.raises(ValueError, match="real_features_ND must be 2-D"):
    pr(np.zeros(5), ok)
  with pytest.raises(ValueError, match="different feature dimensions: 3 vs 2"):
    pr(ok, np.zeros((5, 2)))
  with pytest.raises(ValueError, match="real_features_ND needs at least 2"):
    pr(np.zeros((1, 3)), ok)
  with pytest.raises(ValueError, match="k must be in"):
    pr(ok, np.zeros((4, 3)), k=4)
  with pytest.raises(ValueError, match="k must be in"):
    pr(ok, ok, k=0)
  with pytest.raises(ValueError, match="batch_size must be >= 1"):
    pr(ok, ok, batch_size=0)


def test_metrics_of_a_generator_on_device_equal_those_of_host_images():
  """of_generator (images quantized on device, never on the host) gives the
  metrics of the same images made on the host, for both value ranges; 37
  samples in chunks of 16 (the last padded)."""
  network = _pixel_network(4, batch_size=16)
  metrics = quality.QualityMetrics(network, _cube([100, 120, 140, 60], 20, 3))
  mesh = network.mesh
  generate = jax.jit(lambda z: jnp.tanh(z).reshape(-1, 1, 1, 4),
                     in_shardings=parallel.data_sharding(mesh),
                     out_shardings=parallel.data_sharding(mesh))
  z = np.random.default_rng(0).normal(size=(37, 4)).astype(np.float32)
  images = images_lib.to_uint8(np.tanh(z).reshape(-1, 1, 1, 4))
  want = metrics(images)
  got = metrics.of_generator(generate, (z,), batch_size=16)
  assert got == pytest.approx(want, rel=1e-9)
  got01 = metrics.of_generator(lambda z: (generate(z) + 1) / 2, (z,),
                               batch_size=16, value_range=(0.0, 1.0))
  assert got01 == pytest.approx(want, rel=1e-9)
  assert want["fid"] > 100  # Far from the real set: a wrong path shows.
