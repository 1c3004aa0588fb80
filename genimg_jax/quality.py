"""Sample-quality metrics with the project's own classifiers as features.

FID: the Frechet distance between Gaussians fitted to the classifier's
penultimate features (the ResNet's pooled activations, 64 numbers) of
generated and of real images. Score: the Inception-Score analogue
exp(E_x KL(p(y|x) || p(y))) over the classifier's class probabilities, in one
split. Generated images in [-1, 1] are quantized to uint8 first, exactly as a
PNG of them would be, so real and generated images go through the same
preprocessing (x / 255). The network ships in `genimg_jax/assets/` with its
SHA-256; `experiments/resnet.py` retrains it, and `genimg export-features`
makes a feature network for any other data set from a trained ResNet.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from genimg_jax import classifier, parallel

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
FEATURE_NETWORK = os.path.join(ASSETS, "fashion_mnist_resnet.msgpack")


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
  """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2), in float64.

  tr((S1 S2)^1/2) is the sum of the square roots of the eigenvalues of the
  symmetric PSD matrix S1^1/2 S2 S1^1/2, computed with `eigh` (stable where
  a general matrix square root of S1 S2 is not).
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2,
                                                              np.float64)
  w, v = np.linalg.eigh(sigma1)
  sqrt1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  eig = np.linalg.eigvalsh(sqrt1 @ sigma2 @ sqrt1)
  trace_sqrt = np.sum(np.sqrt(np.clip(eig, 0, None)))
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2)
               - 2 * trace_sqrt)


def gaussian_stats(features_ND: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mean [D], covariance [D, D]) in float64."""
  features = np.asarray(features_ND, np.float64)
  return features.mean(0), np.cov(features, rowvar=False)


def classifier_score(probs_NK: np.ndarray, eps: float = 1e-12) -> float:
  """exp(mean_x KL(p(y|x) || p(y))) over all of `probs` (one split)."""
  probs = np.asarray(probs_NK, np.float64)
  marginal = probs.mean(0, keepdims=True)
  kl = np.sum(probs * (np.log(probs + eps) - np.log(marginal + eps)), axis=1)
  return float(np.exp(kl.mean()))


def file_sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def save_feature_network(state, model_config, path: str = FEATURE_NETWORK,
                         image_shape=(28, 28, 1), num_classes: int = 10):
  """Writes a trained ResNet classifier's variables and settings.

  `path` gets the variables (msgpack); `path + ".json"` the ResNet's width and
  blocks, the image shape and classes it was trained on, and the SHA-256.
  """
  if model_config.name != "resnet":
    raise ValueError(f"A feature network must be a ResNet classifier "
                     f"(model.name 'resnet'), not {model_config.name!r}.")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  variables = jax.device_get({"params": state.params,
                              "batch_stats": state.batch_stats})
  with open(path, "wb") as f:
    f.write(flax.serialization.to_bytes(variables))
  meta = {"width": model_config.width,
          "blocks_per_stage": list(model_config.blocks_per_stage),
          "image_shape": list(image_shape), "num_classes": num_classes,
          "sha256": file_sha256(path)}
  with open(path + ".json", "w") as f:
    json.dump(meta, f, indent=2)
  return meta


@dataclasses.dataclass
class FeatureNetwork:
  """The classifier used as the feature network, jitted over a mesh."""
  model: classifier.ResNet
  variables: dict
  mesh: jax.sharding.Mesh
  batch_size: int = 512

  def __post_init__(self):
    def features_and_probs(variables, images_uint8):
      x = classifier.to_float(images_uint8)
      features = self.model.apply(variables, x, features=True)
      logits = self.model.apply(variables, x)
      return features, jax.nn.softmax(logits)
    repl = parallel.replicated(self.mesh)
    data = parallel.data_sharding(self.mesh)
    self._apply = jax.jit(features_and_probs, in_shardings=(repl, data),
                          out_shardings=(data, data))
    self.variables = parallel.replicate(self.variables, self.mesh)

  def __call__(self, images_uint8: np.ndarray):
    """uint8 images [N, H, W, C] -> (features [N, D], probs [N, K]) numpy."""
    return parallel.map_batches(
        functools.partial(self._apply, self.variables), (images_uint8,),
        self.mesh, self.batch_size)


def load_feature_network(mesh, path: str = FEATURE_NETWORK,
                         image_shape=None) -> FeatureNetwork:
  """A saved ResNet feature network, checked against its SHA-256 and, if
  given, the image shape it must accept."""
  if not os.path.isfile(path) or not os.path.isfile(path + ".json"):
    raise FileNotFoundError(
        f"Feature network {path!r} (and its .json) is missing. Train a ResNet "
        "on the data set (experiments/resnet.py:DATASET) and write one with "
        "`genimg export-features --workdir DIR --output FILE`.")
  with open(path + ".json") as f:
    meta = json.load(f)
  if file_sha256(path) != meta["sha256"]:
    raise ValueError(f"Feature network {path!r} does not match its SHA-256 "
                     f"{meta['sha256']}: the file is corrupt or was changed.")
  net_shape = tuple(meta.get("image_shape", (28, 28, 1)))
  if image_shape is not None and tuple(image_shape) != net_shape:
    raise ValueError(
        f"Feature network {path!r} takes images of shape {net_shape}, not "
        f"{tuple(image_shape)}. Export one trained on this data set with "
        "`genimg export-features`, or set --config.eval_samples=0.")
  model = classifier.ResNet(meta.get("num_classes", 10), meta["width"],
                            tuple(meta["blocks_per_stage"]))
  template = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, *net_shape))))
  with open(path, "rb") as f:
    variables = flax.serialization.from_bytes(
        jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template), f.read())
  return FeatureNetwork(model, variables, mesh)


def feature_network_path(name_or_path: str) -> str:
  """A shipped network's name ("fashion_mnist_resnet") or a file path."""
  shipped = os.path.join(ASSETS, name_or_path + ".msgpack")
  return shipped if os.path.isfile(shipped) else name_or_path


def metrics_for_config(config, mesh, real_source):
  """QualityMetrics for `config` (its feature_network and eval_samples)
  against every image of `real_source`, or None when config.eval_samples is
  0 (then `real_source` is not read)."""
  if not config.eval_samples:
    return None
  name = config.get("feature_network", "fashion_mnist_resnet")
  if not name:
    raise ValueError(
        "config.eval_samples > 0 needs config.feature_network: a shipped "
        "network's name or a file from `genimg export-features`. Or set "
        "--config.eval_samples=0 to skip FID and score.")
  network = load_feature_network(mesh, feature_network_path(name),
                                 config.data.image_shape)
  return QualityMetrics(
      network, real_source.take(np.arange(len(real_source)))["image"])


class QualityMetrics:
  """FID and score of generated images against one real split."""

  def __init__(self, network: FeatureNetwork, real_images_uint8: np.ndarray):
    self.network = network
    features, _ = network(real_images_uint8)
    self.real_stats = gaussian_stats(features)

  def __call__(self, fake_images_uint8: np.ndarray) -> dict[str, float]:
    features, probs = self.network(fake_images_uint8)
    return {"fid": frechet_distance(*gaussian_stats(features),
                                    *self.real_stats),
            "score": classifier_score(probs)}


def real_data_reference(idx_dir: str, mesh) -> dict[str, float]:
  """The floor no generator can beat: FID of the real test split against
  the real train split, and the score of the real test split."""
  from genimg_jax import data  # pylint: disable=g-import-not-at-top
  train_images = data.load_idx_split(idx_dir, "train").images
  test_images = data.load_idx_split(idx_dir, "test").images
  metrics = QualityMetrics(load_feature_network(mesh), train_images)(
      test_images)
  return {"fid_test_vs_train": metrics["fid"], "score_test": metrics["score"]}


if __name__ == "__main__":
  import sys  # pylint: disable=g-import-not-at-top
  from genimg_jax import data as _data  # pylint: disable=g-import-not-at-top
  print(json.dumps(real_data_reference(
      sys.argv[1] if len(sys.argv) > 1 else _data.DEBIAN_FASHION_MNIST,
      parallel.make_mesh())))
