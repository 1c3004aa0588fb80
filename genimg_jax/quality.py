"""Sample-quality metrics: FID, Inception Score or score, KID, precision/recall.

FID: the Frechet distance between Gaussians fitted to a feature network's
features of generated and of real images (the reference set:
`config.eval_reference_split`, or precomputed statistics). KID and
precision/recall: see their functions. The feature network is the project's
own ResNet (pooled activations, 64 numbers; shipped in `genimg_jax/assets/`
with its SHA-256, retrained by `experiments/resnet.py`, made for other data
sets by `genimg export-features`) or the FID Inception-v3 (`inception.py`,
2,048 features, numbers comparable with papers). With the Inception network
the class-probability metric is the published Inception Score
(`inception_score`: unbiased logits, 10 splits, mean and std); with the own
ResNet it is an analogue of it, the "score" (`classifier_score`: the
classifier's softmax, one split), not comparable with Inception Scores.
Generated images are quantized to uint8 first, exactly as a PNG of them
would be, so real and generated images go through the same preprocessing;
`QualityMetrics.of_generator` does that on device, so samples never travel
to the host.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Callable

from etils import epath
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from genimg_jax import classifier, images as images_lib, parallel

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


def log_softmax64(logits_NK: np.ndarray) -> np.ndarray:
  """log softmax over the last axis, [N, K] float64."""
  logits = np.asarray(logits_NK, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.sum(np.exp(shifted), -1, keepdims=True))


def classifier_score(probs_NK: np.ndarray, eps: float = 1e-12) -> float:
  """The own-network score, an Inception-Score analogue: exp(mean_x
  KL(p(y|x) || p(y))) over all of `probs` [N, K] (one split), float64."""
  probs = np.asarray(probs_NK, np.float64)
  marginal = probs.mean(0, keepdims=True)
  kl = np.sum(probs * (np.log(probs + eps) - np.log(marginal + eps)), axis=1)
  return float(np.exp(kl.mean()))


INCEPTION_SCORE_SPLITS = 10


def inception_score(logits_NK: np.ndarray,
                    splits: int = INCEPTION_SCORE_SPLITS
                    ) -> tuple[float, float]:
  """The Inception Score (Salimans et al. 2016): (mean, std) over splits.

  logits_NK [N, K]: the Inception's unbiased logits (pool features @ fc
  kernel, no bias: `inception.features_and_unbiased_logits`), in sample
  order. As openai/improved-gan's `inception_score/model.py` and
  torch-fidelity's `isc_features_to_metric`: split s holds rows
  [s N // splits, (s + 1) N // splits) (N not divisible by `splits`: sizes
  differ by one, no row is dropped); its score is exp(mean_x KL(p(y|x) ||
  p_s(y))), p_s the split's mean of p(y|x); returns the mean and the
  population std (np.std) of the `splits` scores. float64, p and log p from
  the logits (torch-fidelity's log_softmax), the KL summed per split as
  mean_x sum_y p log p - sum_y p_s log p_s (the same number). torch-fidelity
  shuffles the rows first by default (`samples_shuffle`); improved-gan and
  this function do not, which for i.i.d. samples changes nothing expected.
  """
  log_p = log_softmax64(logits_NK)
  n = log_p.shape[0]
  if log_p.ndim != 2 or n < splits or splits < 1:
    raise ValueError(f"The Inception Score needs [N, K] logits with N >= "
                     f"splits = {splits}, got shape {log_p.shape}.")
  p = np.exp(log_p)
  neg_entropy_N = np.sum(p * log_p, axis=1)
  scores = []
  for s in range(splits):
    rows = slice(s * n // splits, (s + 1) * n // splits)
    marginal = p[rows].mean(0)
    cross = np.sum(marginal * np.log(np.where(marginal > 0, marginal, 1.0)))
    scores.append(np.exp(neg_entropy_N[rows].mean() - cross))
  return float(np.mean(scores)), float(np.std(scores))


def _check_feature_pair(a, b, names: tuple[str, str]):
  """Both as float64 [N, D] / [M, D]; ValueError naming what is wrong."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  for x, name in ((a, names[0]), (b, names[1])):
    if x.ndim != 2:
      raise ValueError(f"{name} must be 2-D [num_samples, feature_dim], got "
                       f"shape {x.shape}")
    if x.shape[0] < 2:
      raise ValueError(f"{name} needs at least 2 samples, got {x.shape[0]}")
  if a.shape[1] != b.shape[1]:
    raise ValueError(f"{names[0]} and {names[1]} have different feature "
                     f"dimensions: {a.shape[1]} vs {b.shape[1]}")
  return a, b


def _cubic_kernel(x_MD: np.ndarray, y_MD: np.ndarray) -> np.ndarray:
  """(x.y / D + 1)^3 for every pair, [M, M] (k * k * k: faster than **)."""
  k = x_MD @ y_MD.T / x_MD.shape[1] + 1
  return k * k * k


def kernel_inception_distance(features_a_ND: np.ndarray,
                              features_b_MD: np.ndarray,
                              num_subsets: int = 100,
                              subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
  """KID (Binkowski et al. 2018, "Demystifying MMD GANs"): (mean, std).

  features_a_ND [N, D] and features_b_MD [M, D]; float64 inside. With the
  polynomial kernel k(x, y) = (x.y / D + 1)^3, each of `num_subsets` subsets
  takes m = min(subset_size, N, M) rows of each set without replacement and
  computes the unbiased MMD^2
    sum_{i!=j} k(x_i, x_j) / (m(m-1)) + sum_{i!=j} k(y_i, y_j) / (m(m-1))
    - 2 sum_{i,j} k(x_i, y_j) / m^2,
  the estimator of torch-fidelity and clean-fid's `kernel_distance`. Returns
  the mean and the (population) std of the per-subset values. The subsets
  come from `np.random.default_rng(seed)`: per subset,
  `rng.choice(N, m, replace=False)` for a, then the same with M for b.
  """
  a, b = _check_feature_pair(features_a_ND, features_b_MD,
                             ("features_a_ND", "features_b_MD"))
  if num_subsets < 1:
    raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
  if subset_size < 2:
    raise ValueError(f"subset_size must be >= 2, got {subset_size}")
  (n, d), m_rows = a.shape, b.shape[0]
  m = min(subset_size, n, m_rows)
  rng = np.random.default_rng(seed)
  mmds = np.empty(num_subsets)
  for s in range(num_subsets):
    x = a[rng.choice(n, m, replace=False)]
    y = b[rng.choice(m_rows, m, replace=False)]
    k_xx, k_yy, k_xy = (_cubic_kernel(x, x), _cubic_kernel(y, y),
                        _cubic_kernel(x, y))
    off_diag = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy))
    mmds[s] = off_diag / (m * (m - 1)) - 2 * k_xy.mean()
  return float(mmds.mean()), float(mmds.std())


def _sq_distances(rows_BD: np.ndarray, points_ND: np.ndarray,
                  points_sq_N: np.ndarray) -> np.ndarray:
  """[B, N] squared Euclidean distances, clipped at 0."""
  d2 = (np.sum(rows_BD ** 2, axis=1)[:, None] + points_sq_N[None, :]
        - 2 * rows_BD @ points_ND.T)
  return np.maximum(d2, 0)


def knn_radii_sq(points_ND: np.ndarray, k: int,
                 batch_size: int = 2000) -> np.ndarray:
  """[N] squared distance of each point to its k-th nearest other point
  (float64 inside), in blocks of `batch_size` rows."""
  points_ND = np.asarray(points_ND, np.float64)
  n = points_ND.shape[0]
  points_sq = np.sum(points_ND ** 2, axis=1)
  radii_sq = np.empty(n)
  for start in range(0, n, batch_size):
    stop = min(start + batch_size, n)
    d2 = _sq_distances(points_ND[start:stop], points_ND, points_sq)
    d2[np.arange(stop - start), np.arange(start, stop)] = 0  # Exact self.
    # Index 0 of the sorted row is the point itself, index k its k-th NN.
    radii_sq[start:stop] = np.partition(d2, k, axis=1)[:, k]
  return radii_sq


def _fraction_inside(queries_QD: np.ndarray, centres_ND: np.ndarray,
                     radii_sq_N: np.ndarray, batch_size: int) -> float:
  """Fraction of queries within distance <= radius of some centre."""
  centres_sq = np.sum(centres_ND ** 2, axis=1)
  inside = 0
  for start in range(0, queries_QD.shape[0], batch_size):
    d2 = _sq_distances(queries_QD[start:start + batch_size], centres_ND,
                       centres_sq)
    inside += int(np.sum(np.any(d2 <= radii_sq_N[None, :], axis=1)))
  return inside / queries_QD.shape[0]


def precision_recall(real_features_ND: np.ndarray,
                     fake_features_MD: np.ndarray, k: int = 3,
                     batch_size: int = 2000,
                     real_radii_sq_N: np.ndarray | None = None
                     ) -> dict[str, float]:
  """Improved precision and recall (Kynkaanniemi et al. 2019).

  real_features_ND [N, D], fake_features_MD [M, D]; float64 inside. A set's
  manifold is the union of the balls around its points whose radius is the
  distance to the point's k-th nearest neighbour in the same set (the point
  itself not counted). precision = fraction of fake points inside the real
  manifold, recall = fraction of real points inside the fake manifold; a
  point is inside when its distance to some centre is <= that centre's
  radius, as in the paper's code. Squared distances are computed in blocks
  of `batch_size` rows ([batch_size, N or M] float64 at a time).
  real_radii_sq_N: the real set's squared radii for this k
  (`knn_radii_sq(real, k)`), if already computed: QualityMetrics keeps them
  across evaluations (1.5 s of k-NN for 10,000 x 128 features).
  Returns {"precision": float, "recall": float}.
  """
  real, fake = _check_feature_pair(real_features_ND, fake_features_MD,
                                   ("real_features_ND", "fake_features_MD"))
  if k < 1 or k >= min(real.shape[0], fake.shape[0]):
    raise ValueError(f"k must be in [1, number of points in each set), got "
                     f"k={k} with {real.shape[0]} real and {fake.shape[0]} "
                     f"fake points")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if real_radii_sq_N is None:
    real_radii_sq_N = knn_radii_sq(real, k, batch_size)
  elif np.shape(real_radii_sq_N) != (real.shape[0],):
    raise ValueError(f"real_radii_sq_N must have shape ({real.shape[0]},), "
                     f"got {np.shape(real_radii_sq_N)}")
  fake_radii_sq = knn_radii_sq(fake, k, batch_size)
  return {
      "precision": _fraction_inside(fake, real, real_radii_sq_N, batch_size),
      "recall": _fraction_inside(real, fake, fake_radii_sq, batch_size),
  }


def file_sha256(path: str) -> str:
  """Hex SHA-256 of a file, read in 1 MiB chunks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


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
  """A feature network jitted over a mesh: uint8 images [B, H, W, C] ->
  (features [B, D], logits [B, K]), float32, from one pass.

  features_and_logits(variables, images_uint8) -> (features, logits): the
  shipped ResNet (`resnet_features_and_logits`) or the FID Inception with
  the Inception Score's unbiased logits
  (`inception.features_and_unbiased_logits`). score: which class-probability
  metric its logits give, "classifier" (`classifier_score`, key "score") or
  "inception" (`inception_score`, keys "inception_score" and
  "inception_score_std").

  A measuring instrument: it compiles with XLA's default options whatever
  the run's `parallel.compiler_options`, so the same images get the same
  features (and FID) under every experiment config.
  """
  features_and_logits: Callable
  variables: dict
  mesh: jax.sharding.Mesh
  batch_size: int = 512
  name: str = "resnet"
  score: str = "classifier"

  def __post_init__(self):
    if self.score not in ("classifier", "inception"):
      raise ValueError(f"score must be 'classifier' or 'inception', not "
                       f"{self.score!r}.")
    repl = parallel.replicated(self.mesh)
    data = parallel.data_sharding(self.mesh)
    self._apply = jax.jit(self.features_and_logits, in_shardings=(repl, data),
                          out_shardings=(data, data))
    self.variables = parallel.replicate(self.variables, self.mesh)

  def __call__(self, images_uint8: np.ndarray):
    """uint8 images [N, H, W, C] -> (features [N, D], logits [N, K]) numpy."""
    return parallel.map_batches(self.on_device, (images_uint8,), self.mesh,
                                self.batch_size)

  def on_device(self, images_uint8: jax.Array):
    """(features, logits) of a batch sharded on "data", left on device."""
    return self._apply(self.variables, images_uint8)

  def feature_dim(self, image_shape) -> int:
    """D for images of `image_shape` (H, W, C), traced, not run."""
    features, _ = jax.eval_shape(
        self.features_and_logits, self.variables,
        jax.ShapeDtypeStruct((1, *image_shape), jnp.uint8))
    return features.shape[-1]

  def scores(self, logits_NK: np.ndarray) -> dict[str, float]:
    """{"score"} (classifier) or {"inception_score", "inception_score_std"}
    of the logits [N, K] of N samples, computed in float64."""
    if self.score == "inception":
      mean, std = inception_score(logits_NK)
      return {"inception_score": mean, "inception_score_std": std}
    return {"score": classifier_score(np.exp(log_softmax64(logits_NK)))}


def resnet_features_and_logits(model: classifier.ResNet):
  """(variables, uint8 images) -> (pooled features, logits), one pass."""
  return lambda variables, images_uint8: model.apply(
      variables, classifier.to_float(images_uint8), features=True,
      with_logits=True)


def read_feature_network_meta(path: str) -> dict:
  """The settings `save_feature_network` wrote to `path + ".json"`: width,
  blocks_per_stage, num_classes (10 if absent), sha256, and image_shape as
  a tuple ((28, 28, 1) if absent). Raises OSError (no file) or ValueError
  (not JSON)."""
  with open(path + ".json") as f:
    meta = json.load(f)
  meta["image_shape"] = tuple(meta.get("image_shape", (28, 28, 1)))
  meta.setdefault("num_classes", 10)
  return meta


def load_feature_network(mesh, path: str = FEATURE_NETWORK,
                         image_shape=None) -> FeatureNetwork:
  """A saved ResNet feature network, checked against its SHA-256 and, if
  given, the image shape it must accept."""
  if not os.path.isfile(path) or not os.path.isfile(path + ".json"):
    raise FileNotFoundError(
        f"Feature network {path!r} (and its .json) is missing. Train a ResNet "
        "on the data set (experiments/resnet.py:DATASET) and write one with "
        "`genimg export-features --workdir DIR --output FILE`, or use "
        "inception:FILE (see `genimg convert-inception`).")
  meta = read_feature_network_meta(path)
  if file_sha256(path) != meta["sha256"]:
    raise ValueError(f"Feature network {path!r} does not match its SHA-256 "
                     f"{meta['sha256']}: the file is corrupt or was changed.")
  net_shape = meta["image_shape"]
  if image_shape is not None and tuple(image_shape) != net_shape:
    raise ValueError(
        f"Feature network {path!r} takes images of shape {net_shape}, not "
        f"{tuple(image_shape)}. Export one trained on this data set with "
        "`genimg export-features`, use inception:FILE, or set "
        "--config.eval_samples=0.")
  model = classifier.ResNet(meta["num_classes"], meta["width"],
                            tuple(meta["blocks_per_stage"]))
  template = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, *net_shape))))
  with open(path, "rb") as f:
    variables = flax.serialization.from_bytes(
        jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template), f.read())
  return FeatureNetwork(resnet_features_and_logits(model), variables, mesh,
                        name=os.path.basename(path))


def feature_network_path(name_or_path: str) -> str:
  """A shipped network's name ("fashion_mnist_resnet") or a file path."""
  shipped = os.path.join(ASSETS, name_or_path + ".msgpack")
  return shipped if os.path.isfile(shipped) else name_or_path


def feature_network_for_config(config, mesh) -> FeatureNetwork:
  """config.feature_network: a shipped ResNet's name, a file from `genimg
  export-features`, or "inception:FILE" (from `genimg convert-inception`)."""
  name = config.get("feature_network", "fashion_mnist_resnet")
  if not name:
    raise ValueError(
        "config.eval_samples > 0 needs config.feature_network: a shipped "
        "network's name, a file from `genimg export-features` or "
        "inception:FILE. Or set --config.eval_samples=0 to skip FID and "
        "score.")
  if name.startswith("inception:"):
    from genimg_jax import inception  # pylint: disable=g-import-not-at-top
    variables = inception.load_variables(name[len("inception:"):])
    return FeatureNetwork(inception.features_and_unbiased_logits, variables,
                          mesh, batch_size=128, name="inception",
                          score="inception")
  return load_feature_network(mesh, feature_network_path(name),
                              config.data.image_shape)


def feature_network_misfit(config) -> str | None:
  """Why config.feature_network cannot measure config's images (a ResNet
  feature network saved for another image shape), or None when it can, or
  when no FID is asked for. A missing file is not a misfit: loading it
  raises."""
  name = config.get("feature_network", "")
  if not config.get("eval_samples") or not name or name.startswith(
      "inception:"):
    return None
  path = feature_network_path(name)
  try:
    net_shape = read_feature_network_meta(path)["image_shape"]
  except (OSError, ValueError):
    return None
  shape = tuple(config.data.image_shape)
  if net_shape == shape:
    return None
  return (f"feature network {name!r} takes {net_shape} images, not {shape}; "
          "for FID on these images pass --config.feature_network="
          "inception:FILE (`genimg convert-inception`)")


REFERENCE_SPLITS = ("train", "test", "eval")


def reference_split(config) -> str:
  """The real split FID, KID and precision/recall compare with:
  config.eval_reference_split, "train", "test" or "eval" (the split named by
  config.data.eval_split); configs without the field use "eval"."""
  choice = config.get("eval_reference_split", "eval")
  if choice not in REFERENCE_SPLITS:
    raise ValueError(f"config.eval_reference_split must be one of "
                     f"{list(REFERENCE_SPLITS)}, not {choice!r}.")
  return config.data.eval_split if choice == "eval" else choice


def reference_identity(split: str, images_uint8: np.ndarray) -> dict:
  """What a reference set is: {"split", "num_images", "images_sha256"} (the
  SHA-256 of the uint8 images' bytes, C order, and their shape)."""
  images = np.ascontiguousarray(images_uint8, np.uint8)
  digest = hashlib.sha256(repr(images.shape).encode())
  digest.update(images.tobytes())
  return {"split": split, "num_images": int(images.shape[0]),
          "images_sha256": digest.hexdigest()}


def metrics_for_config(config, mesh, eval_source):
  """QualityMetrics for `config` (feature_network, fid_stats,
  eval_reference_split, eval_samples), or None when config.eval_samples is 0
  (then nothing is read).

  The reference set is every image of the split `reference_split(config)`:
  `eval_source` (the config.data.eval_split source) when it is that split,
  else loaded here. With config.fid_stats, FID uses those statistics, and
  KID and precision/recall use the reference set's features only when the
  file records that it was made from exactly these images (`genimg
  fid-stats` writes their SHA-256); otherwise they are off (not computed,
  absent from the metrics) and a line on stdout says so.
  """
  if not config.eval_samples:
    return None
  from genimg_jax import data  # pylint: disable=g-import-not-at-top
  network = feature_network_for_config(config, mesh)
  split = reference_split(config)
  source = (eval_source if split == config.data.eval_split
            else data.load_split(config.data, split))
  if not config.get("fid_stats"):
    return QualityMetrics(
        network, source.take(np.arange(len(source)))["image"])
  stats = load_fid_stats(config.fid_stats, network.name)
  _check_stats_fit(stats[0], network.feature_dim(config.data.image_shape))
  saved = fid_stats_reference(config.fid_stats)
  real_images, why_off = None, None
  if saved is None:
    why_off = "records no reference set (not written by `genimg fid-stats`)"
  elif (saved.get("split"), saved.get("num_images")) != (split, len(source)):
    why_off = (f"comes from {saved.get('num_images')} images of the "
               f"{saved.get('split')!r} split")
  else:
    real_images = source.take(np.arange(len(source)))["image"]
    if reference_identity(split, real_images) != saved:
      real_images, why_off = None, "comes from other images"
  if why_off and jax.process_index() == 0:
    print(f"KID and precision/recall are off: the FID statistics "
          f"{config.fid_stats!r} {why_off}, not from the {len(source)} "
          f"images of this run's reference split {split!r} "
          "(config.eval_reference_split), so those metrics would compare "
          "other sets. Write the statistics with `genimg fid-stats` for this "
          "config to have them.", flush=True)
  return QualityMetrics(network, real_images, stats)


def save_fid_stats(path: str, mu_D: np.ndarray, sigma_DD: np.ndarray,
                   network_name: str, reference: dict | None = None) -> None:
  """pytorch-fid's .npz layout (mu [D], sigma [D, D], float64) plus the
  feature network's name and, if given, the reference set's
  `reference_identity` (as JSON)."""
  extra = {} if reference is None else {
      "reference": np.asarray(json.dumps(reference, sort_keys=True))}
  with epath.Path(path).open("wb") as f:
    np.savez(f, mu=np.asarray(mu_D, np.float64),
             sigma=np.asarray(sigma_DD, np.float64),
             feature_network=np.asarray(network_name), **extra)


def fid_stats_reference(path: str) -> dict | None:
  """The `reference_identity` a statistics file records, or None (pytorch-
  fid's files and older ones of ours)."""
  with epath.Path(path).open("rb") as f:
    stats = np.load(f)
    if "reference" not in stats.files:
      return None
    return json.loads(str(stats["reference"]))


def _check_stats_fit(mu_D: np.ndarray, feature_dim: int) -> None:
  if np.shape(mu_D) != (feature_dim,):
    raise ValueError(
        f"FID statistics of {np.shape(mu_D)[0]} features do not fit the "
        f"feature network's {feature_dim}.")


def load_fid_stats(path: str, network_name: str | None = None):
  """(mu [D], sigma [D, D]) from a .npz with `mu` and `sigma` (pytorch-fid's
  `--save-stats` or `genimg fid-stats`); one of ours names its network,
  which must then be `network_name` (if given)."""
  if not epath.Path(path).exists():
    raise FileNotFoundError(f"No FID statistics file {path!r}; write one "
                            "with `genimg fid-stats --config C --output F`.")
  with epath.Path(path).open("rb") as f:
    stats = dict(np.load(f))
  if "mu" not in stats or "sigma" not in stats:
    raise ValueError(f"{path!r} has {sorted(stats)}, not pytorch-fid's "
                     "'mu' and 'sigma'.")
  mu, sigma = stats["mu"].astype(np.float64), stats["sigma"].astype(np.float64)
  if sigma.shape != (len(mu), len(mu)):
    raise ValueError(f"{path!r}: sigma {sigma.shape} does not fit mu "
                     f"{mu.shape}.")
  saved_name = str(stats.get("feature_network", ""))
  if network_name and saved_name and saved_name != network_name:
    raise ValueError(f"{path!r} holds statistics of {saved_name!r} features, "
                     f"but this run uses {network_name!r}.")
  return mu, sigma


_to_uint8_on_device = jax.jit(images_lib.to_uint8,
                              static_argnames=("low", "high"))


class QualityMetrics:
  """FID, the score (`FeatureNetwork.scores`), KID and precision/recall of
  generated images against one reference set of real images (FID against
  `reference` = (mu, sigma) instead, if given).

  real_images_uint8 [N, H, W, C], or None with `reference` given: then KID
  and precision/recall, which need the reference features, are off.
  """
  PRECISION_RECALL_K = 3  # k-NN radius of Kynkaanniemi et al. (2019).

  def __init__(self, network: FeatureNetwork,
               real_images_uint8: np.ndarray | None,
               reference: tuple[np.ndarray, np.ndarray] | None = None):
    if real_images_uint8 is None and reference is None:
      raise ValueError("QualityMetrics needs real images or (mu, sigma).")
    self.network = network
    self.real_features = None
    if real_images_uint8 is not None:
      self.real_features, _ = network(real_images_uint8)
    self.real_stats = reference or gaussian_stats(self.real_features)
    self._real_radii_sq = None  # precision_recall's, computed once.
    if self.real_features is not None:
      _check_stats_fit(self.real_stats[0], self.real_features.shape[1])

  def __call__(self, fake_images_uint8: np.ndarray) -> dict[str, float]:
    """fid; score, or inception_score and inception_score_std; kid (mean
    over subsets of 1,000), kid_std, precision and recall (k =
    PRECISION_RECALL_K = 3), these four when there are reference features
    and both sets have over 3 samples."""
    return self._metrics(*self.network(fake_images_uint8))

  def of_generator(self, generate_fn, inputs, batch_size: int = 512,
                   value_range: tuple[float, float] = (-1.0, 1.0)):
    """The metrics of images made on device chunk by chunk, as
    `self(to_uint8(images))` but without copying images to the host and
    back: only features and logits leave the devices.

    generate_fn(*chunks) -> float images in `value_range` [b, H, W, C]
    sharded on "data" (a jitted sampler); inputs: host arrays [N, ...] (e.g.
    noise and labels), cut into chunks of `batch_size` as
    `parallel.map_batches` does.
    """
    low, high = value_range
    features, logits = parallel.map_batches(
        lambda *chunks: self.network.on_device(_to_uint8_on_device(
            generate_fn(*chunks), low=low, high=high)),
        inputs, self.network.mesh, batch_size)
    return self._metrics(features, logits)

  def _metrics(self, features, logits) -> dict[str, float]:
    _check_stats_fit(self.real_stats[0], features.shape[1])
    metrics = {"fid": frechet_distance(*gaussian_stats(features),
                                       *self.real_stats),
               **self.network.scores(logits)}
    real = self.real_features
    if real is not None and min(len(features), len(real)) > 3:
      metrics["kid"], metrics["kid_std"] = kernel_inception_distance(
          features, real)
      if self._real_radii_sq is None:
        self._real_radii_sq = knn_radii_sq(real, self.PRECISION_RECALL_K)
      metrics.update(precision_recall(real, features,
                                      k=self.PRECISION_RECALL_K,
                                      real_radii_sq_N=self._real_radii_sq))
    return metrics


def write_fid_stats(config, mesh, output: str) -> dict:
  """`genimg fid-stats`: (mu, sigma) of config.feature_network's features of
  every image of the reference split (`reference_split(config)`), written to
  `output` (.npz, with the set's `reference_identity`) by process 0 (every
  process computes them)."""
  from genimg_jax import data  # pylint: disable=g-import-not-at-top
  network = feature_network_for_config(config, mesh)
  split = reference_split(config)
  source = data.load_split(config.data, split)
  images = source.take(np.arange(len(source)))["image"]
  mu, sigma = gaussian_stats(network(images)[0])
  if jax.process_index() == 0:
    save_fid_stats(output, mu, sigma, network.name,
                   reference_identity(split, images))
  return {"output": output, "split": split, "num_images": len(source),
          "feature_network": network.name, "feature_dim": len(mu)}


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
