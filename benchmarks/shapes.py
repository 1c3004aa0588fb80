"""The peer benchmark's models, layer by layer (stdlib only).

The same layers and shapes as genimg-jax's seed networks on 28 x 28 x 1
(genimg_jax/nets/cnn.py, dcgan.py, conv_vae.py): peer_torch.py and
peer_keras.py build them, tests/test_benchmarks.py checks the parameter
shapes against the Flax modules, and run.py checks each peer's parameter
count against `param_count`.

A layer is (kind, in, out, kernel, stride, padding, bias, output shape):
kinds conv, convT (transposed conv), dense, bn (BatchNorm: scale and bias),
pool (2 x 2 max-pool); output shapes are HWC or (features,), batch left out.
"""

import collections
import math

Layer = collections.namedtuple(
    "Layer", "kind cin cout kernel stride padding bias out",
    defaults=(0, 0, 0, 1, "same", True, ()))


def conv(cin, cout, k, s, padding, out, bias=True):
  return Layer("conv", cin, cout, k, s, padding, bias, out)


def conv_t(cin, cout, k, s, out, bias=True):
  return Layer("convT", cin, cout, k, s, "same", bias, out)


def dense(cin, cout, bias=True):
  return Layer("dense", cin, cout, bias=bias, out=(cout,))


def bn(n, out):
  return Layer("bn", n, n, out=out)


def pool(out):
  return Layer("pool", out=out)


MODELS = {
    # Seed CNN: softmax cross-entropy, Adam 1e-3.
    "cnn": {"cnn": [
        conv(1, 32, 3, 1, "valid", (26, 26, 32)), pool((13, 13, 32)),
        conv(32, 64, 3, 1, "valid", (11, 11, 64)), pool((5, 5, 64)),
        conv(64, 128, 3, 1, "valid", (3, 3, 128)),
        dense(3 * 3 * 128, 512), dense(512, 10)]},
    # DCGAN, z = 100: one D update (real + fake), one G update with fresh
    # noise; LeakyReLU 0.3 in G, 0.2 and dropout 0.3 in D; Adam(2e-4, 0.5).
    "dcgan": {
        "G": [dense(100, 7 * 7 * 256, bias=False), bn(7 * 7 * 256, (12544,)),
              conv_t(256, 128, 4, 1, (7, 7, 128), bias=False),
              bn(128, (7, 7, 128)),
              conv_t(128, 64, 4, 2, (14, 14, 64), bias=False),
              bn(64, (14, 14, 64)),
              conv_t(64, 1, 4, 2, (28, 28, 1), bias=False)],
        "D": [conv(1, 64, 4, 2, "same", (14, 14, 64)),
              conv(64, 128, 4, 2, "same", (7, 7, 128)),
              dense(7 * 7 * 128, 1)]},
    # Conv VAE, latent 32: Bernoulli likelihood + KL, Adam 1e-3.
    "vae": {
        "encoder": [conv(1, 32, 3, 2, "same", (14, 14, 32)),
                    conv(32, 64, 3, 2, "same", (7, 7, 64)),
                    dense(7 * 7 * 64, 256), dense(256, 64)],
        "decoder": [dense(32, 7 * 7 * 64),
                    conv_t(64, 64, 3, 2, (14, 14, 64)),
                    conv_t(64, 32, 3, 2, (28, 28, 32)),
                    conv_t(32, 1, 3, 1, (28, 28, 1))]},
}
INPUT_SHAPES = {"cnn": {"cnn": (28, 28, 1)},
                "dcgan": {"G": (100,), "D": (28, 28, 1)},
                "vae": {"encoder": (28, 28, 1), "decoder": (32,)}}


def param_shapes(layer: Layer) -> list[tuple[int, ...]]:
  """The layer's parameter shapes in Flax's layout: kernels (k, k, in, out)
  or (in, out), then the bias (out,); BatchNorm (n,) scale and bias."""
  if layer.kind in ("conv", "convT"):
    shapes = [(layer.kernel, layer.kernel, layer.cin, layer.cout)]
  elif layer.kind == "dense":
    shapes = [(layer.cin, layer.cout)]
  elif layer.kind == "bn":
    return [(layer.cout,), (layer.cout,)]
  else:
    return []
  return shapes + ([(layer.cout,)] if layer.bias else [])


def param_count(model: str) -> int:
  """Trainable parameters of a model, all its networks."""
  return sum(math.prod(shape) for layers in MODELS[model].values()
             for layer in layers for shape in param_shapes(layer))


def output_shape(layer: Layer, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The layer's output shape for an input `shape` (HWC or (features,));
  a dense layer flattens its input, a conv reshapes a flat one to a square
  of its input channels."""
  if layer.kind == "dense":
    return (layer.cout,)
  if layer.kind == "bn":
    return shape
  if len(shape) == 1:  # A dense output reshaped to a square image.
    side = math.isqrt(shape[0] // layer.cin)
    shape = (side, side, layer.cin)
  h, w, _ = shape
  if layer.kind == "pool":
    return (h // 2, w // 2, shape[2])
  if layer.kind == "convT":
    return (h * layer.stride, w * layer.stride, layer.cout)
  if layer.padding == "valid":
    return ((h - layer.kernel) // layer.stride + 1,
            (w - layer.kernel) // layer.stride + 1, layer.cout)
  return (-(-h // layer.stride), -(-w // layer.stride), layer.cout)
