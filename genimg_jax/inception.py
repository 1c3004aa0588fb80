"""The FID Inception-v3 in Flax: the network behind published FID/IS numbers.

This is the Inception-v3 of TensorFlow's original FID code (the 2015-12-05
graph) as `pytorch-fid` ports it (`pytorch_fid/inception.py`): torchvision's
Inception-v3 with its FID-specific blocks (average pools that do not count
padding in `FIDInceptionA/C/E_1`, a max pool in the last block's pool branch
`FIDInceptionE_2`) and 1008 classes. It returns the 2,048 pooled features
(FID, KID, precision/recall) and the 1,008 logits in one pass; the Inception
Score uses the logits without the fc bias (`features_and_unbiased_logits`).

Preprocessing, as `pytorch_fid.inception.InceptionV3.forward` with its
defaults: uint8 -> x / 255, grayscale repeated to 3 channels (PIL's
convert("RGB")), bilinear resize to 299 x 299 with half-pixel centres and no
antialiasing (`F.interpolate(mode="bilinear", align_corners=False)`), then
2x - 1. clean-fid differs: it resizes the uint8 image with PIL's antialiased
bicubic filter ("clean" resize) and runs the TF graph as TorchScript, so its
numbers differ from pytorch-fid's (and ours) by a little on 299-sized images
and more on small ones.

Weights: pytorch-fid's release file `pt_inception-2015-12-05-6726825d.pth`
(SHA-256 starting 6726825d). `genimg convert-inception --pth FILE --output
OUT.msgpack` maps it (needs torch) to this module's variables; the output
gets a .json with its own SHA-256, checked at load. Nothing downloads.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from genimg_jax import quality

PTH_NAME = "pt_inception-2015-12-05-6726825d.pth"
PTH_SHA256_PREFIX = "6726825d"  # torch hub's convention: the file name's hash.
NUM_FEATURES, NUM_LOGITS, SIZE = 2048, 1008, 299


def _pad(padding) -> tuple[tuple[int, int], tuple[int, int]]:
  ph, pw = (padding, padding) if isinstance(padding, int) else padding
  return ((ph, ph), (pw, pw))


class BasicConv(nn.Module):
  """torchvision's BasicConv2d: conv (no bias), BatchNorm (eps 1e-3), ReLU."""
  features: int
  kernel: tuple[int, int] = (1, 1)
  stride: int = 1
  padding: int | tuple[int, int] = 0

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.features, self.kernel, self.stride,
                padding=_pad(self.padding), use_bias=False, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3(x):
  """F.avg_pool2d(kernel 3, stride 1, padding 1, count_include_pad=False)."""
  return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool_3x3_stride2(x):
  return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class InceptionA(nn.Module):
  """FIDInceptionA (Mixed_5b-d)."""
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, name="branch1x1")(x)
    b5 = BasicConv(48, name="branch5x5_1")(x)
    b5 = BasicConv(64, (5, 5), padding=2, name="branch5x5_2")(b5)
    b3 = BasicConv(64, name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, (3, 3), padding=1, name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, (3, 3), padding=1, name="branch3x3dbl_3")(b3)
    bp = BasicConv(self.pool_features, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """torchvision's InceptionB (Mixed_6a): grid reduction 35 -> 17."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, (3, 3), stride=2, name="branch3x3")(x)
    bd = BasicConv(64, name="branch3x3dbl_1")(x)
    bd = BasicConv(96, (3, 3), padding=1, name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionC(nn.Module):
  """FIDInceptionC (Mixed_6b-e): factorized 7x7 convolutions."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = BasicConv(192, name="branch1x1")(x)
    b7 = BasicConv(c7, name="branch7x7_1")(x)
    b7 = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv(c7, name="branch7x7dbl_1")(x)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv(192, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """torchvision's InceptionD (Mixed_7a): grid reduction 17 -> 8."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, name="branch3x3_1")(x)
    b3 = BasicConv(320, (3, 3), stride=2, name="branch3x3_2")(b3)
    b7 = BasicConv(192, name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionE(nn.Module):
  """FIDInceptionE_1 (Mixed_7b, average pool) or FIDInceptionE_2 (Mixed_7c,
  max pool in the pool branch)."""
  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(320, name="branch1x1")(x)
    b3 = BasicConv(384, name="branch3x3_1")(x)
    b3 = jnp.concatenate([
        BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
        BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], -1)
    bd = BasicConv(448, name="branch3x3dbl_1")(x)
    bd = BasicConv(384, (3, 3), padding=1, name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([
        BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
        BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)],
                         -1)
    if self.max_pool:
      pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3(x)
    bp = BasicConv(192, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def preprocess(images_BHWC: jax.Array, size: int = SIZE) -> jax.Array:
  """uint8 [B, H, W, 1 or 3] (or float in [0, 1]) -> float32 [B, size, size,
  3] in [-1, 1], as pytorch-fid: x / 255, channels repeated, bilinear resize
  (half-pixel centres, no antialiasing), 2x - 1."""
  x = images_BHWC
  if x.dtype == jnp.uint8:
    x = x.astype(jnp.float32) / 255.0
  x = x.astype(jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  if x.shape[-1] != 3:
    raise ValueError(f"Inception takes 1 or 3 channels, not {x.shape[-1]}.")
  b, h, w, c = x.shape
  if (h, w) != (size, size):
    scale = jnp.array([size / h, size / w], jnp.float32)
    x = jax.image.scale_and_translate(
        x, (b, size, size, c), (1, 2), scale, jnp.zeros(2, jnp.float32),
        method="linear", antialias=False)
  return 2.0 * x - 1.0


class FIDInceptionV3(nn.Module):
  """images [B, H, W, C] uint8 (or float in [0, 1]) -> (pool features
  [B, 2048], logits [B, 1008]), float32. Inference only (BatchNorm uses its
  running statistics; no dropout)."""

  @nn.compact
  def __call__(self, images_BHWC):
    x = preprocess(images_BHWC)
    x = BasicConv(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = BasicConv(64, (3, 3), padding=1, name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_stride2(x)
    x = BasicConv(80, name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3_stride2(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    for name, c7 in (("6b", 128), ("6c", 160), ("6d", 160), ("6e", 192)):
      x = InceptionC(c7, name=f"Mixed_{name}")(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(max_pool=False, name="Mixed_7b")(x)
    x = InceptionE(max_pool=True, name="Mixed_7c")(x)
    pool = jnp.mean(x, axis=(1, 2))
    return pool, nn.Dense(NUM_LOGITS, name="fc")(pool)


def features_and_unbiased_logits(variables, images_BHWC):
  """(pool features [B, 2048], unbiased logits [B, 1008]), float32: the
  Inception Score's logits, pool @ fc kernel without the fc bias, as
  openai/improved-gan computes them (pool_3 times the weight input of
  softmax/logits/MatMul) and torch-fidelity ("logits_unbiased")."""
  pool, _ = FIDInceptionV3().apply(variables, images_BHWC)
  return pool, jnp.matmul(pool, variables["params"]["fc"]["kernel"],
                          precision=jax.lax.Precision.HIGHEST)


def variables_from_torch(state_dict: Mapping[str, np.ndarray]) -> dict:
  """pytorch-fid's `fid_inception_v3()` state dict (numpy arrays) -> this
  module's variables. Conv weights [O, I, kh, kw] -> kernels [kh, kw, I, O];
  BatchNorm weight/bias/running_mean/running_var -> scale/bias/mean/var;
  fc weight [1008, 2048] -> kernel [2048, 1008]. Every module of the
  template must be filled exactly once; AuxLogits and counters are ignored.
  """
  template = jax.eval_shape(lambda: FIDInceptionV3().init(
      jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3), jnp.uint8)))
  flat = flax.traverse_util.flatten_dict(
      flax.core.unfreeze(template), sep=".")
  variables, used = {}, set()
  for key, spec in flat.items():
    collection, path = key.split(".", 1)
    module, leaf = path.rsplit(".", 1)
    if module == "fc":
      source = f"fc.{'weight' if leaf == 'kernel' else 'bias'}"
    else:
      source = module + "." + {
          ("params", "kernel"): "weight", ("params", "scale"): "weight",
          ("params", "bias"): "bias", ("batch_stats", "mean"): "running_mean",
          ("batch_stats", "var"): "running_var"}[(collection, leaf)]
    if source not in state_dict:
      raise KeyError(f"{source!r} is missing from the Inception weights: not "
                     f"pytorch-fid's {PTH_NAME}?")
    value = np.asarray(state_dict[source], np.float32)
    if leaf == "kernel":
      value = value.T if module == "fc" else value.transpose(2, 3, 1, 0)
    if value.shape != spec.shape:
      raise ValueError(f"{source}: shape {value.shape} != expected "
                       f"{spec.shape}.")
    variables[key] = value
    used.add(source)
  unused = [k for k in state_dict if k not in used
            and not k.startswith("AuxLogits")
            and not k.endswith("num_batches_tracked")]
  if unused:
    raise ValueError(f"Inception weights have entries this network does not "
                     f"use: {unused[:5]}...")
  return flax.traverse_util.unflatten_dict(variables, sep=".")


def convert_pth(pth_path: str, output_path: str,
                check_hash: bool = True) -> dict:
  """pytorch-fid's .pth -> OUTPUT (msgpack variables) + OUTPUT.json (the
  source file's and the output's SHA-256). Needs torch (to read the pickle).
  check_hash: the .pth's SHA-256 must start with 6726825d (its release)."""
  if not os.path.isfile(pth_path):
    raise FileNotFoundError(
        f"No file {pth_path!r}. pytorch-fid's weights are its release asset "
        f"{PTH_NAME} (pytorch-fid caches it in ~/.cache/torch/hub/"
        "checkpoints/ after its first run).")
  source_sha = quality.file_sha256(pth_path)
  if check_hash and not source_sha.startswith(PTH_SHA256_PREFIX):
    raise ValueError(
        f"{pth_path!r} has SHA-256 {source_sha[:16]}..., not pytorch-fid's "
        f"{PTH_NAME} ({PTH_SHA256_PREFIX}...). Pass --any-weights to convert "
        "it anyway (its numbers will not compare with published ones).")
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("Converting a .pth needs torch: pip install torch "
                      "(CPU is enough); the converted file does not.") from e
  state_dict = torch.load(pth_path, map_location="cpu", weights_only=True)
  variables = variables_from_torch(
      {k: v.numpy() for k, v in state_dict.items()})
  os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
  with open(output_path, "wb") as f:
    f.write(flax.serialization.msgpack_serialize(variables))
  meta = {"network": "fid_inception_v3", "source": os.path.basename(pth_path),
          "source_sha256": source_sha,
          "sha256": quality.file_sha256(output_path)}
  with open(output_path + ".json", "w") as f:
    json.dump(meta, f, indent=2)
  return meta


def load_variables(path: str) -> dict:
  """Variables written by `convert_pth`, checked against their SHA-256."""
  if not os.path.isfile(path) or not os.path.isfile(path + ".json"):
    raise FileNotFoundError(
        f"Inception weights {path!r} (and its .json) are missing. Convert "
        f"pytorch-fid's {PTH_NAME} with `genimg convert-inception --pth "
        f"{PTH_NAME} --output {path}`.")
  with open(path + ".json") as f:
    meta = json.load(f)
  if quality.file_sha256(path) != meta["sha256"]:
    raise ValueError(f"{path!r} does not match its SHA-256 {meta['sha256']}: "
                     "the file is corrupt or was changed; convert it again.")
  with open(path, "rb") as f:
    return flax.serialization.msgpack_restore(f.read())

