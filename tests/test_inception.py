"""The Flax FID Inception equals pytorch-fid's, given the same weights.

pytorch-fid (the `parity` extra) builds its network with random weights and
random BatchNorm statistics (its download is patched out); the state dict goes
through a .pth file and `genimg convert-inception`'s converter, and both
networks see the same uint8 images: pool features and logits must agree. This
proves the architecture, the weight mapping and the preprocessing (channel
repeat, bilinear resize without antialiasing, 2x - 1) together.
CI sets GENIMG_REQUIRE_PARITY=1, so a missing torch fails instead of skipping.
"""

import os

import jax
import numpy as np
import pytest

from genimg_jax import inception, quality

if os.environ.get("GENIMG_REQUIRE_PARITY"):
  import torch  # pylint: disable=g-import-not-at-top
  import pytorch_fid.fid_score  # pylint: disable=g-import-not-at-top
  import pytorch_fid.inception as pytorch_fid_inception  # pylint: disable=g-import-not-at-top
else:
  torch = pytest.importorskip("torch")
  pytorch_fid_inception = pytest.importorskip("pytorch_fid.inception")


@pytest.fixture(scope="module")
def torch_network(tmp_path_factory):
  """(pytorch-fid InceptionV3 for 2048-d pools, its fc, path of a .pth of
  the same weights)."""
  import torchvision  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  mp = pytest.MonkeyPatch()
  mp.setattr(pytorch_fid_inception, "load_state_dict_from_url",
             lambda *a, **k: None)
  mp.setattr(torchvision.models.Inception3, "load_state_dict",
             lambda self, *a, **k: None, raising=False)
  net = pytorch_fid_inception.fid_inception_v3()
  mp.undo()
  with torch.no_grad():
    for module in net.modules():
      if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
        fan_in = module.weight[0].numel()
        module.weight.normal_(0, (2.0 / fan_in) ** 0.5)
        if module.bias is not None:
          module.bias.normal_(0, 0.1)
      elif isinstance(module, torch.nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0, 0.1)
        module.running_mean.normal_(0, 0.1)
        module.running_var.uniform_(0.5, 1.5)
  mp.setattr(pytorch_fid_inception, "fid_inception_v3", lambda: net)
  wrapper = pytorch_fid_inception.InceptionV3([3]).eval()
  mp.undo()
  path = tmp_path_factory.mktemp("inception") / "random.pth"
  torch.save(net.state_dict(), path)
  return wrapper, net.fc.eval(), str(path)


@pytest.fixture(scope="module")
def converted(torch_network, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("inception") / "random.msgpack")
  meta = inception.convert_pth(torch_network[2], out, check_hash=False)
  return out, meta


def torch_outputs(torch_network, images_uint8):
  wrapper, fc, _ = torch_network
  x = torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float() / 255.0
  if x.shape[1] == 1:
    x = x.repeat(1, 3, 1, 1)  # PIL's convert("RGB"), as pytorch-fid loads.
  with torch.no_grad():
    pool = wrapper(x)[0].flatten(1)
    return pool.numpy(), fc(pool).numpy()


@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3), (45, 37, 3),
                                   (331, 310, 3)])
def test_features_and_logits_equal_pytorch_fid(torch_network, converted,
                                               shape):
  images = np.random.default_rng(sum(shape)).integers(
      0, 256, (2, *shape), dtype=np.uint8)
  variables = inception.load_variables(converted[0])
  pool, logits = jax.jit(inception.FIDInceptionV3().apply)(variables, images)
  torch_pool, torch_logits = torch_outputs(torch_network, images)
  assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
  for ours, theirs in ((pool, torch_pool), (logits, torch_logits)):
    scale = np.abs(theirs).max()
    assert scale > 0.1  # Not a dead network.
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=0,
                               atol=2e-4 * scale)
  # Different images give different features (the test can tell them apart).
  assert np.abs(torch_pool[0] - torch_pool[1]).max() > 100 * 2e-4 * np.abs(
      torch_pool).max()


def test_inception_score_path_uses_the_unbiased_logits(torch_network,
                                                      converted):
  """`feature_network=inception:FILE` measures with pool @ fc weight, no fc
  bias (improved-gan's and torch-fidelity's "logits_unbiased"), and scores
  them as the Inception Score (keys inception_score and its std)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from genimg_jax import parallel  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict({
      "feature_network": "inception:" + converted[0],
      "data": {"image_shape": (28, 28, 1)}})
  network = quality.feature_network_for_config(config, parallel.make_mesh())
  assert network.score == "inception" and network.name == "inception"
  images = np.random.default_rng(7).integers(0, 256, (2, 28, 28, 1),
                                             dtype=np.uint8)
  pool, logits = network(images)
  torch_pool, torch_logits = torch_outputs(torch_network, images)
  unbiased = torch_pool @ torch_network[1].weight.detach().numpy().T
  tolerance = 2e-4 * np.abs(unbiased).max()
  np.testing.assert_allclose(pool, torch_pool, rtol=0,
                             atol=2e-4 * np.abs(torch_pool).max())
  np.testing.assert_allclose(logits, unbiased, rtol=0, atol=tolerance)
  # The fc bias is large enough here for the test to see it.
  assert np.abs(torch_logits - unbiased).max() > 10 * tolerance
  assert network.feature_dim((28, 28, 1)) == 2048
  assert set(network.scores(np.tile(logits, (5, 1)))) == {
      "inception_score", "inception_score_std"}


def test_converter_records_checksums_and_rejects_corruption(torch_network,
                                                            converted,
                                                            tmp_path):
  path, meta = converted
  assert meta["sha256"] == quality.file_sha256(path)
  assert meta["source_sha256"] == quality.file_sha256(torch_network[2])
  with pytest.raises(ValueError, match="6726825d"):
    inception.convert_pth(torch_network[2], str(tmp_path / "x.msgpack"))
  corrupt = tmp_path / "corrupt.msgpack"
  corrupt.write_bytes(open(path, "rb").read()[:-1] + b"\0")
  (tmp_path / "corrupt.msgpack.json").write_text(open(path + ".json").read())
  with pytest.raises(ValueError, match="corrupt"):
    inception.load_variables(str(corrupt))
  with pytest.raises(FileNotFoundError, match="convert-inception"):
    inception.load_variables(str(tmp_path / "missing.msgpack"))


def test_converter_rejects_a_state_dict_that_does_not_fit():
  state_dict = {k: np.zeros(1) for k in ("Conv2d_1a_3x3.conv.weight",)}
  with pytest.raises(KeyError, match="missing"):
    inception.variables_from_torch(state_dict)


def test_fid_stats_files_and_distance_agree_with_pytorch_fid(tmp_path):
  """pytorch-fid reads `genimg fid-stats` files (and we read its), and its
  Frechet distance (scipy's sqrtm) equals ours on the same statistics."""
  fid_score = pytest.importorskip("pytorch_fid.fid_score")  # Imported above
  # when GENIMG_REQUIRE_PARITY is set.
  rng = np.random.default_rng(0)
  stats = []
  for i in range(2):
    features = rng.normal(size=(500, 16)) @ rng.normal(size=(16, 16)) + i
    path = str(tmp_path / f"s{i}.npz")
    quality.save_fid_stats(path, *quality.gaussian_stats(features), "x")
    stats.append(fid_score.compute_statistics_of_path(path, None, 1, 16,
                                                      "cpu"))
    np.testing.assert_array_equal(quality.load_fid_stats(path)[1],
                                  stats[-1][1])
  theirs = fid_score.calculate_frechet_distance(*stats[0], *stats[1])
  assert quality.frechet_distance(*stats[0], *stats[1]) == pytest.approx(
      theirs, rel=1e-6)
