"""Layers shared by the model families, written for fast steps on CPU.

Each computes exactly what the Flax layer it replaces computes (same
parameters, same outputs up to float summation order); the tests check this.
The rewrites are CPU tricks (XLA:CPU's convolutions of these shapes, and its
reduce-window gradient, are slow): on any other backend (`jax.default_backend()`
when the layer is traced) the native `lax` ops are used. `Dropout` is the
exception on both counts: on every backend it uses 16 random bits per value
where `nn.Dropout` uses 32, four values per Threefry hash, so its masks
differ from Flax's (same keep rate to within 2^-17).
"""

from __future__ import annotations

from typing import Any

import math

import flax.linen as nn
import jax
from jax.extend.random import threefry2x32_p
import jax.numpy as jnp


def cpu_rewrites() -> bool:
  """Whether the CPU rewrites below are used: the default backend is CPU."""
  return jax.default_backend() == "cpu"


def max_pool_2x2(x_BHWC: jax.Array) -> jax.Array:
  """2x2 max pooling, stride 2, floor on odd sizes ("VALID").

  Same values as `nn.max_pool(x, (2, 2), (2, 2))`. On CPU written as
  reshape-and-max: XLA's CPU gradient of reduce_window is several times slower.
  """
  if not cpu_rewrites():
    return nn.max_pool(x_BHWC, (2, 2), (2, 2))
  b, h, w, c = x_BHWC.shape
  x = x_BHWC[:, :h // 2 * 2, :w // 2 * 2]
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _phase_taps(kernel_size: int, pad_lo: int, phase: int):
  """First kernel tap and input offsets that output phase `phase` of a
  stride-2 transposed convolution uses: y[2m + phase] = sum_t x[m + offset_t]
  k[t] over every other tap t = first, first + 2, ..."""
  first = (pad_lo - phase) % 2
  taps = range(first, kernel_size, 2)
  return first, [(phase + t - pad_lo) // 2 for t in taps]


def conv_transpose_stride2(x_BHWC: jax.Array, kernel_KKIO: jax.Array,
                           precision=None) -> jax.Array:
  """`lax.conv_transpose(x, k, (2, 2), "SAME")` as 4 stride-1 convolutions.

  Output pixel (2m + p, 2n + q) only sees the kernel taps of phase (p, q), so
  the transposed convolution splits into 4 ordinary convolutions with a
  K/2 x K/2 kernel each, interleaved (depth-to-space). Same FLOPs and result,
  but no zero-dilated input: XLA's CPU weight gradient of the dilated form is
  about 20x slower than its forward pass.

  x: [B, H, W, I]; kernel: [K, K, I, O] (Flax ConvTranspose layout), K >= 2.
  Returns
  [B, 2H, 2W, O].
  """
  b, h, w, _ = x_BHWC.shape
  k = kernel_KKIO.shape[0]
  pad_lo = k - 1 if k < 3 else -(-k // 2)  # lax's "SAME" for conv_transpose.
  # With an odd kernel the phases have different numbers of taps; fine.
  rows = []
  for p in range(2):
    row_first, row_offsets = _phase_taps(k, pad_lo, p)
    cols = []
    for q in range(2):
      col_first, col_offsets = _phase_taps(k, pad_lo, q)
      sub_kernel = kernel_KKIO[row_first::2, col_first::2]
      padding = ((-row_offsets[0], row_offsets[-1]),
                 (-col_offsets[0], col_offsets[-1]))
      cols.append(jax.lax.conv_general_dilated(
          x_BHWC, sub_kernel, (1, 1), padding,
          dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision))
    rows.append(jnp.stack(cols, axis=3))  # [B, H, W, 2(q), O]
  y = jnp.stack(rows, axis=2)  # [B, H, 2(p), W, 2(q), O]
  return y.reshape(b, 2 * h, 2 * w, y.shape[-1])


def conv_transpose_stride1(x_BHWC: jax.Array, kernel_KKIO: jax.Array,
                           precision=None) -> jax.Array:
  """`lax.conv_transpose(x, k, (1, 1), "SAME")` without the padded rows.

  With stride 1 this is a convolution whose input is zero-padded by
  (ceil((K-1)/2), floor((K-1)/2)) on each side. On a small input most of those
  products are zeros (a 4x4 kernel on 7x7: 4 of 28 row taps), so kernel row t
  is applied, as a 1 x K convolution, only to the output rows where it meets
  real input rows, and the K partial outputs are summed. Same result up to
  float summation order. On one CPU core, 256 -> 128 channels on 7x7 at batch
  64: forward 32 ms instead of 42 ms, input and kernel gradient 68 ms instead
  of 82 ms (the DCGAN generator's first convolution).

  x: [B, H, W, I]; kernel: [K, K, I, O] (Flax ConvTranspose layout).
  Returns [B, H, W, O].
  """
  _, h, _, _ = x_BHWC.shape
  k = kernel_KKIO.shape[0]
  pad_lo = -(-(k - 1) // 2)  # lax's "SAME" padding for stride 1.
  y = None
  for t in range(k):
    lo, hi = max(0, pad_lo - t), min(h, h + pad_lo - t)  # Output rows.
    if lo >= hi:
      continue
    # Negative padding crops input rows lo + t - pad_lo .. hi + t - pad_lo
    # inside the convolution (a slice would be a copy).
    part = jax.lax.conv_general_dilated(
        x_BHWC, kernel_KKIO[t:t + 1], (1, 1),
        ((pad_lo - t - lo, hi + t - pad_lo - h), (pad_lo, k - 1 - pad_lo)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)
    part = jnp.pad(part, ((0, 0), (lo, h - hi), (0, 0), (0, 0)))
    y = part if y is None else y + part
  return y


def _same_pad_lo(kernel_size: int, stride: int) -> int:
  """Low-side padding of lax.conv_transpose's "SAME" (its dilated-input
  convolution)."""
  if stride > kernel_size - 1:
    return kernel_size - 1
  return -(-(kernel_size + stride - 2) // 2)


def conv_transpose_taps(x_BHWC: jax.Array, kernel_KKIO: jax.Array,
                        stride: int, precision=None) -> jax.Array:
  """`lax.conv_transpose(x, k, (s, s), "SAME")` as one matmul and a sum.

  One matmul gives every input pixel's contribution to each kernel tap and
  output channel ([B, H, W, K*K*O]); each tap's plane is then placed on the
  output grid with `lax.pad` (interior padding s - 1 spreads it by the stride,
  negative edge padding crops) and the K*K planes are summed. The same result
  up to summation order, and the FLOPs of the convolution plus the taps that
  land outside the output; on CPU it runs at matmul speed (several times
  faster than XLA's convolution for few output channels).

  x: [B, H, W, I]; kernel: [K, K, I, O] (Flax layout). Returns [B, sH, sW, O].
  """
  b, h, w, i = x_BHWC.shape
  k, o = kernel_KKIO.shape[0], kernel_KKIO.shape[-1]
  crop = k - 1 - _same_pad_lo(k, stride)
  # lax.conv_transpose does not flip the kernel: tap t lands t rows earlier.
  flipped_IKKO = jnp.transpose(kernel_KKIO[::-1, ::-1], (2, 0, 1, 3))
  taps = jnp.einsum("bhwi,ij->bhwj", x_BHWC, flipped_IKKO.reshape(i, -1),
                    precision=precision).reshape(b, h, w, k, k, o)
  zero = jnp.zeros((), taps.dtype)
  y = None
  for p in range(k):
    for q in range(k):
      pads = [(0, 0, 0)]
      for offset, size in ((p - crop, h), (q - crop, w)):
        spread = (size - 1) * stride + 1
        pads.append((offset, size * stride - offset - spread, stride - 1))
      part = jax.lax.pad(taps[:, :, :, p, q], zero, pads + [(0, 0, 0)])
      y = part if y is None else y + part
  return y


def conv_stride2_same(x_BHWC: jax.Array, kernel_KKIO: jax.Array) -> jax.Array:
  """`lax.conv_general_dilated(x, k, (2, 2), "SAME")` (NHWC, HWIO), whose
  input gradient on CPU, for even H and W, is `conv_transpose_stride2` of the
  output gradient with the flipped kernel (its I and O swapped): the same sum,
  but 4 stride-1 convolutions instead of XLA's generic base-dilated one (1.34x
  faster alone for the DCGAN discriminator's 64 -> 128 channels on 14x14).
  The kernel gradient is lax's.

  x: [B, H, W, I]; kernel: [K, K, I, O]. Returns [B, ceil(H/2), ceil(W/2), O].
  """
  def reference(x, kernel):
    return jax.lax.conv_general_dilated(
        x, kernel, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

  _, h, w, _ = x_BHWC.shape
  if not cpu_rewrites() or h % 2 or w % 2:
    return reference(x_BHWC, kernel_KKIO)

  @jax.custom_vjp
  def conv(x, kernel):
    return reference(x, kernel)

  def fwd(x, kernel):
    return reference(x, kernel), (x, kernel)

  def bwd(residuals, g_BhwO):
    x, kernel = residuals
    _, kernel_vjp = jax.vjp(lambda k: reference(x, k), kernel)
    flipped_KKOI = jnp.swapaxes(kernel[::-1, ::-1], 2, 3)
    return conv_transpose_stride2(g_BhwO, flipped_KKOI), kernel_vjp(g_BhwO)[0]

  conv.defvjp(fwd, bwd)
  return conv(x_BHWC, kernel_KKIO)


def dropout_keep_mask(rng: jax.Array, keep_prob: float,
                      shape: tuple[int, ...]) -> tuple[jax.Array, float]:
  """A Bernoulli(q) keep mask (bool, `shape`) from 16 random bits per
  element, and q: `keep_prob` rounded to a multiple of 2^-16 (0.7 ->
  0.69999695).

  Threefry's hashes are most of a CPU dropout's time, so each hash gives
  four elements: both 32-bit words of Threefry-2x32 of the counter pair
  (0, i), i the flat index into `shape[:-1] + (ceil(C / 4),)` (the hash
  `jax.random.bits` computes, without XOR-ing the two words together), each
  word split into two 16-bit halves; the last axis (C) is the four quarters
  side by side. Like `jax.random.bits` the mask depends only on the key and
  the shape, not on how it is sharded. A quarter of the hashes of
  `jax.random.bernoulli` (one per element when partitionable).

  rng: the mask's key (a fresh one per call). shape: at least 1-D, fewer
  than 2^32 hashes.
  """
  threshold = round(keep_prob * 65536)
  counts_shape = (*shape[:-1], -(-shape[-1] // 4))
  if math.prod(counts_shape) >= 2 ** 32:
    raise ValueError(f"Dropout mask of shape {shape} needs 2^32 or more "
                     "hashes; split the input.")
  index = jnp.zeros(counts_shape, jnp.uint32)
  for axis, stride in enumerate(_strides(counts_shape)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, counts_shape,
                                             axis) * jnp.uint32(stride)
  key = jax.random.key_data(rng)
  word_a, word_b = threefry2x32_p.bind(key[0], key[1], jnp.zeros_like(index),
                                       index)
  # Compared before the concatenation: the step keeps a bool per value for
  # the backward pass, not the 32-bit quarters.
  below = lambda quarter: quarter < jnp.uint32(threshold)
  mask = jnp.concatenate([below(word_a & 0xFFFF), below(word_a >> 16),
                          below(word_b & 0xFFFF), below(word_b >> 16)], axis=-1)
  return mask[..., :shape[-1]], threshold / 65536


def _strides(shape: tuple[int, ...]) -> list[int]:
  """Row-major element strides of `shape`."""
  strides, step = [], 1
  for size in reversed(shape):
    strides.append(step)
    step *= size
  return strides[::-1]


class Dropout(nn.Module):
  """`nn.Dropout(rate)` with its keep mask from `dropout_keep_mask`: kept
  values are scaled by 1/q (q the rounded keep probability), so the
  output's expectation is the input. The rng collection is "dropout"."""
  rate: float
  deterministic: bool | None = None

  @nn.compact
  def __call__(self, x, deterministic: bool | None = None):
    deterministic = nn.merge_param("deterministic", self.deterministic,
                                   deterministic)
    if deterministic or self.rate == 0.0:
      return x
    if self.rate == 1.0:
      return jnp.zeros_like(x)
    mask, keep = dropout_keep_mask(self.make_rng("dropout"), 1.0 - self.rate,
                                   x.shape)
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


def forward_by(fast_fn, reference_fn):
  """fast_fn's values with reference_fn's gradient (a custom VJP).

  For two functions that compute the same thing, one faster forward and one
  faster backward: the gradient is `jax.vjp(reference_fn, ...)`, whose unused
  forward values XLA removes.
  """
  @jax.custom_vjp
  def fn(*args):
    return fast_fn(*args)

  def fwd(*args):
    return fast_fn(*args), args

  def bwd(args, g):
    return jax.vjp(reference_fn, *args)[1](g)

  fn.defvjp(fwd, bwd)
  return fn


def _lax_conv_transpose(stride: int):
  return lambda x, k: jax.lax.conv_transpose(
      x, k, (stride, stride), "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv_transpose_as_conv_grad(x_BHWC: jax.Array, kernel_KKIO: jax.Array,
                                stride: int) -> jax.Array:
  """`lax.conv_transpose(x, k, (s, s), "SAME")`, with the gradient that
  TensorFlow's Conv2DTranspose gets (Conv2DBackpropInput / Filter).

  The transposed convolution is the input gradient of A(z) = conv(z, k', s,
  "SAME"), k' = k flipped with I and O swapped. Its input gradient is A of
  the output gradient (a strided convolution), its kernel gradient the
  kernel gradient of A at the output gradient with x as cotangent (a
  window-dilated convolution), both forms XLA:CPU runs as its own (Eigen)
  convolutions. JAX's transpose of the dilated form is a convolution dilated
  on both operands with a reversed window, which XLA:CPU emits as a loop
  (the DCGAN's 64 -> 1 kernel gradient). Values are lax's; gradients equal
  lax's up to float summation order.

  x: [B, H, W, I]; kernel: [K, K, I, O] (Flax ConvTranspose layout).
  Returns [B, s H, s W, O].
  """
  reference = _lax_conv_transpose(stride)

  def conv(z, k):
    return jax.lax.conv_general_dilated(
        z, k, (stride, stride), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def flip(k):  # [K, K, I, O] <-> [K, K, O, I], spatially reversed.
    return jnp.swapaxes(k[::-1, ::-1], 2, 3)

  @jax.custom_vjp
  def transposed(x, kernel):
    return reference(x, kernel)

  def fwd(x, kernel):
    return reference(x, kernel), (x, kernel)

  def bwd(residuals, g_BhwO):
    x, kernel = residuals
    flipped = flip(kernel)
    _, kernel_vjp = jax.vjp(lambda k: conv(g_BhwO, k), flipped)
    return (conv(g_BhwO, flipped),
            flip(kernel_vjp(x.astype(g_BhwO.dtype))[0]).astype(kernel.dtype))

  transposed.defvjp(fwd, bwd)
  return transposed(x_BHWC, kernel_KKIO)


class _SameConv(nn.Module):
  """Parameters, dtype and bias of a "SAME" convolution or transposed
  convolution (kernel [k, k, I, O]); the subclass's `convolve(x, kernel)`
  computes it."""
  features: int
  kernel_size: int = 4
  use_bias: bool = True
  dtype: Any = None
  kernel_init: Any = nn.initializers.lecun_normal()

  def convolve(self, x_BHWC, kernel_KKIO):
    raise NotImplementedError

  @nn.compact
  def __call__(self, x_BHWC):
    kernel = self.param("kernel", self.kernel_init,
                        (self.kernel_size, self.kernel_size, x_BHWC.shape[-1],
                         self.features))
    dtype = self.dtype or x_BHWC.dtype
    y = self.convolve(x_BHWC.astype(dtype), kernel.astype(dtype))
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,)
                         ).astype(dtype)
    return y


class ConvTranspose1x(_SameConv):
  """`nn.ConvTranspose(features, (k, k), padding="SAME")` (stride 1).

  The same parameters ("kernel" [k, k, I, O], "bias" [O]) and outputs; on
  CPU `conv_transpose_as_conv_grad` (lax's forward pass, TensorFlow's form
  of the gradient).
  """

  def convolve(self, x_BHWC, kernel_KKIO):
    if not cpu_rewrites():
      return _lax_conv_transpose(1)(x_BHWC, kernel_KKIO)
    return conv_transpose_as_conv_grad(x_BHWC, kernel_KKIO, 1)


class ConvTransposeTaps(ConvTranspose1x):
  """The conv VAE decoder's last layer (few output channels): the same as
  `ConvTranspose1x`, kept as its own class for its name in the parameter
  tree. (`conv_transpose_taps` as its forward pass, with lax's gradient, was
  slower in the VAE's step: docs/performance.md.)"""


class ConvTranspose2x(_SameConv):
  """`nn.ConvTranspose(features, (k, k), strides=(2, 2), padding="SAME")`.

  The same parameters ("kernel" [k, k, I, O], "bias" [O]) and outputs; on
  CPU `conv_transpose_as_conv_grad`: lax's dilated forward pass, a strided
  input gradient and a window-dilated kernel gradient, as TensorFlow lowers
  Conv2DTranspose. On other backends lax's own form.
  """

  def convolve(self, x_BHWC, kernel_KKIO):
    if cpu_rewrites():
      return conv_transpose_as_conv_grad(x_BHWC, kernel_KKIO, 2)
    return _lax_conv_transpose(2)(x_BHWC, kernel_KKIO)


class ConvStride2(_SameConv):
  """`nn.Conv(features, (k, k), (2, 2), padding="SAME")`: the same
  parameters ("kernel" [k, k, I, O], "bias" [O]), initializers and outputs,
  by `conv_stride2_same` (a faster input gradient on CPU)."""

  def convolve(self, x_BHWC, kernel_KKIO):
    return conv_stride2_same(x_BHWC, kernel_KKIO)


# config.model.remat: what the networks that support it recompute in the
# backward pass instead of keeping from the forward.
REMAT_MODES = ("none", "blocks", "full")
# "blocks" keeps only each block's inputs and recomputes its inside, dots
# included (`nothing_saveable`): a block's activations live only while its
# gradient is computed. `dots_with_no_batch_dims_saveable` would keep the
# same here: every matmul and convolution of these networks has the batch
# as a dimension.
REMAT_POLICY = jax.checkpoint_policies.nothing_saveable


def check_remat(remat: str) -> None:
  if remat not in REMAT_MODES:
    raise ValueError(f"remat {remat!r}: choose from {REMAT_MODES}.")


def forward_maybe_remat(network, x, time_B, labels_B, train: bool):
  """`network.forward(x, time_B, labels_B, train)`, under one `nn.remat`
  (`REMAT_POLICY`) when `network.remat` is "full": the diffusion networks'
  `__call__` (UNet, DiT)."""
  check_remat(network.remat)
  if network.remat == "full":
    return nn.remat(type(network).forward, policy=REMAT_POLICY,
                    static_argnums=(4,))(network, x, time_B, labels_B, train)
  return network.forward(x, time_B, labels_B, train)


def remat_if(module_class, enabled: bool, static_argnums=()):
  """`module_class`, or `nn.remat` of it with `REMAT_POLICY` when `enabled`.

  static_argnums: of `__call__`, counting self as 0 (Python bools such as
  `train`). `nn.remat` renames the class (CheckpointX), so instances must be
  given explicit names to keep the parameter tree of the plain class.
  """
  if not enabled:
    return module_class
  return nn.remat(module_class, policy=REMAT_POLICY,
                  static_argnums=static_argnums)

