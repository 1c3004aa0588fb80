"""Fast layers compute what the Flax layers they replace compute."""

import flax.linen as nn
import jax
from jax.extend.random import threefry_2x32
import jax.numpy as jnp
import numpy as np
import pytest

from genimg_jax import parallel
from genimg_jax.nets import layers


def _assert_same_as_flax(ours, flax_layer, x, bias=0.0):
  """Same parameter shapes, outputs and gradients (parameters and input)."""
  variables = flax_layer.init(jax.random.key(1), x)
  variables = jax.tree.map(lambda v: v + bias, variables)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == (
      jax.tree.map(jnp.shape, variables))
  np.testing.assert_allclose(ours.apply(variables, x),
                             flax_layer.apply(variables, x), atol=1e-5)

  def grads(layer):
    return jax.grad(lambda v, x: jnp.sum(jnp.sin(layer.apply(v, x))),
                    argnums=(0, 1))(variables, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4),
               grads(ours), grads(flax_layer))


@pytest.mark.parametrize("batch,size,cin,cout,kernel", [
    (2, 7, 16, 8, 4), (3, 5, 4, 3, 4), (2, 4, 3, 16, 2), (1, 6, 2, 1, 4),
    (2, 7, 8, 16, 3), (2, 5, 4, 8, 5)])
def test_conv_transpose_2x_matches_flax(batch, size, cin, cout, kernel):
  x = jax.random.normal(jax.random.key(0), (batch, size, size, cin))
  _assert_same_as_flax(
      layers.ConvTranspose2x(cout, kernel),
      nn.ConvTranspose(cout, (kernel, kernel), (2, 2), padding="SAME"), x)


def test_conv_transpose_2x_phase_path_itself():
  """The 4-convolution path (not the fallback) against lax.conv_transpose."""
  x = jax.random.normal(jax.random.key(0), (2, 5, 5, 3))
  for size in (2, 3, 4, 5):
    k = jax.random.normal(jax.random.key(size), (size, size, 3, 2))
    np.testing.assert_allclose(
        layers.conv_transpose_stride2(x, k),
        jax.lax.conv_transpose(x, k, (2, 2), "SAME",
                               dimension_numbers=("NHWC", "HWIO", "NHWC")),
        atol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_transpose_as_conv_grad_matches_lax(stride):
  """lax's values; both gradients lax's up to summation order, for odd and
  even kernels, kernels larger than the image and h != w."""
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 4))
  for size in (1, 2, 3, 4, 7):
    k = jax.random.normal(jax.random.key(size), (size, size, 4, 3))
    lax_fn = lambda x, k: jax.lax.conv_transpose(
        x, k, (stride, stride), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    ours = lambda x, k: layers.conv_transpose_as_conv_grad(x, k, stride)
    np.testing.assert_array_equal(ours(x, k), lax_fn(x, k))
    loss = lambda fn: lambda x, k: jnp.sum(jnp.sin(fn(x, k)))
    for a, b in zip(jax.grad(loss(ours), (0, 1))(x, k),
                    jax.grad(loss(lax_fn), (0, 1))(x, k)):
      np.testing.assert_allclose(a, b, atol=1e-4, err_msg=f"kernel {size}")


def test_max_pool_matches_flax_max_pool():
  x = jax.random.normal(jax.random.key(1), (2, 11, 13, 3))
  np.testing.assert_array_equal(
      layers.max_pool_2x2(x), nn.max_pool(x, (2, 2), (2, 2)))
  g_ours = jax.grad(lambda v: jnp.sum(layers.max_pool_2x2(v) ** 2))(x)
  g_flax = jax.grad(lambda v: jnp.sum(nn.max_pool(v, (2, 2), (2, 2)) ** 2))(x)
  np.testing.assert_allclose(g_ours, g_flax, rtol=1e-6)


@pytest.mark.parametrize("batch,size,cin,cout,kernel", [
    (2, 7, 16, 8, 4), (3, 5, 4, 3, 3), (2, 4, 3, 5, 2), (1, 2, 2, 3, 5),
    (2, 1, 3, 2, 4)])
def test_conv_transpose_1x_matches_flax(batch, size, cin, cout, kernel):
  """Row-trimmed stride-1 transposed conv: values and both gradients, also
  when the kernel is larger than the image (rows with no real input)."""
  x = jax.random.normal(jax.random.key(0), (batch, size, size, cin))
  _assert_same_as_flax(
      layers.ConvTranspose1x(cout, kernel),
      nn.ConvTranspose(cout, (kernel, kernel), padding="SAME"), x, bias=0.1)


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_conv_transpose_taps_matches_lax(stride):
  """One matmul and K*K shifted planes give lax's "SAME" transposed conv, for
  odd and even kernels, kernels larger than the image and h != w."""
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 4))
  for size in (1, 2, 3, 4, 5, 7):
    k = jax.random.normal(jax.random.key(size), (size, size, 4, 3))
    np.testing.assert_allclose(
        layers.conv_transpose_taps(x, k, stride),
        jax.lax.conv_transpose(x, k, (stride, stride), "SAME",
                               dimension_numbers=("NHWC", "HWIO", "NHWC")),
        atol=1e-5, err_msg=f"kernel {size}")


@pytest.mark.parametrize("batch,size,cin,cout,kernel", [
    (2, 7, 16, 1, 3), (3, 5, 4, 3, 4), (1, 2, 2, 3, 5)])
def test_conv_transpose_taps_layer_matches_flax(batch, size, cin, cout, kernel):
  """The taps forward pass with lax's gradient: values and both gradients."""
  x = jax.random.normal(jax.random.key(0), (batch, size, size, cin))
  _assert_same_as_flax(
      layers.ConvTransposeTaps(cout, kernel),
      nn.ConvTranspose(cout, (kernel, kernel), padding="SAME"), x, bias=0.1)


def test_forward_by_takes_values_from_one_and_gradient_from_the_other():
  fn = layers.forward_by(lambda x: 2.0 * x, lambda x: 3.0 * x)
  x = jnp.arange(3.0)
  np.testing.assert_array_equal(fn(x), 2.0 * x)
  np.testing.assert_array_equal(jax.grad(lambda v: jnp.sum(fn(v)))(x),
                                jnp.full(3, 3.0))


def _forward_ops(fn, *args) -> list[str]:
  """The primitives of fn's jaxpr; a dilated convolution as "dilated_conv"."""
  ops = []
  for eqn in jax.make_jaxpr(fn)(*args).jaxpr.eqns:
    name = str(eqn.primitive)
    if name == "conv_general_dilated" and eqn.params["lhs_dilation"] != (1, 1):
      name = "dilated_conv"
    ops.append(name)
  return ops


@pytest.mark.parametrize("cpu", [True, False])
def test_cpu_rewrites_only_on_cpu(monkeypatch, cpu):
  """On another backend the native ops run (a GPU or TPU must not pay for CPU
  tricks); on CPU the rewrites do. Same values either way."""
  monkeypatch.setattr(layers, "cpu_rewrites", lambda: cpu)
  x = jax.random.normal(jax.random.key(0), (2, 7, 7, 16))
  pool = _forward_ops(lambda v: layers.max_pool_2x2(v), x)
  assert ("reduce_window_max" in pool) != cpu, pool
  np.testing.assert_array_equal(layers.max_pool_2x2(x),
                                nn.max_pool(x, (2, 2), (2, 2)))
  for ours, strides, native_op in (
      (layers.ConvTranspose2x(8, 4), (2, 2), "dilated_conv"),
      (layers.ConvTranspose1x(8, 4), (1, 1), "conv_general_dilated"),
      (layers.ConvTransposeTaps(8, 3), (1, 1), "conv_general_dilated")):
    variables = ours.init(jax.random.key(1), x)
    ops = _forward_ops(lambda v: ours.apply(v, x), variables)
    custom = [op for op in ops if op.startswith("custom_vjp")]
    if cpu:  # The rewrites: a custom VJP (lax's forward pass inside it).
      assert custom or ops.count("conv_general_dilated") == 4, ops
      assert "dilated_conv" not in ops, ops
    else:  # One native transposed convolution.
      assert not custom and ops.count(native_op) == 1, ops
    flax_layer = nn.ConvTranspose(8, (ours.kernel_size,) * 2, strides,
                                  padding="SAME")
    np.testing.assert_allclose(ours.apply(variables, x),
                               flax_layer.apply(variables, x), atol=1e-5)
  x_even = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
  conv = layers.ConvStride2(8, 4)
  variables = conv.init(jax.random.key(1), x_even)
  ops = _forward_ops(lambda v: conv.apply(v, x_even), variables)
  assert any(op.startswith("custom_vjp") for op in ops) == cpu, ops


@pytest.mark.parametrize("batch,size,cin,cout,kernel", [
    (2, 28, 1, 8, 4), (2, 14, 8, 16, 4), (2, 8, 3, 4, 3), (2, 7, 4, 8, 4),
    (1, 6, 2, 3, 5)])
def test_conv_stride2_matches_flax(batch, size, cin, cout, kernel):
  """Values, kernel and input gradients of nn.Conv(..., (2, 2), "SAME");
  on CPU with an even size through the phase-form input gradient."""
  x = jax.random.normal(jax.random.key(0), (batch, size, size, cin))
  ours = layers.ConvStride2(cout, kernel)
  _assert_same_as_flax(
      ours, nn.Conv(cout, (kernel, kernel), (2, 2), padding="SAME"), x,
      bias=0.1)
  variables = ours.init(jax.random.key(1), x)
  custom = [op for op in _forward_ops(lambda v: ours.apply(v, x), variables)
            if op.startswith("custom_vjp")]
  assert bool(custom) == (size % 2 == 0), custom  # Odd sizes: lax's.


def test_conv_stride2_second_order_gradient_matches_lax():
  """A gradient penalty (WGAN-GP) differentiates the input gradient again:
  its kernel gradient is lax's."""
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  kernel = 0.3 * jax.random.normal(jax.random.key(1), (4, 4, 3, 5))
  lax_conv = lambda x, k: jax.lax.conv_general_dilated(
      x, k, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def penalty_grad(conv):
    def penalty(k):
      g_x = jax.grad(lambda x: jnp.sum(jnp.tanh(conv(x, k))))(x)
      return jnp.sum(g_x ** 2)
    return jax.grad(penalty)(kernel)
  np.testing.assert_allclose(penalty_grad(layers.conv_stride2_same),
                             penalty_grad(lax_conv), rtol=1e-4, atol=1e-4)


def test_dropout_keep_mask_rate_and_independent_quarters():
  """Bernoulli(q) with q within 2^-17 of keep_prob; the four 16-bit quarters
  of each hash are independent (two agree at q^2 + (1 - q)^2, not 1);
  another key, another mask."""
  shape = (64, 14, 14, 65)  # Last axis not a multiple of 4: 17 hashes.
  mask, q = layers.dropout_keep_mask(jax.random.key(0), 0.7, shape)
  assert mask.shape == shape and mask.dtype == jnp.bool_
  assert abs(q - 0.7) <= 2.0 ** -17
  n, sigma = mask.size, (q * (1 - q) / mask.size) ** 0.5
  assert abs(float(mask.mean()) - q) < 5 * sigma, (float(mask.mean()), q, n)
  independent = q * q + (1 - q) ** 2
  for quarter in (1, 2, 3):
    agree = float(jnp.mean(mask[..., :14] ==  # The last quarter has 14.
                           mask[..., 17 * quarter:17 * quarter + 14]))
    assert abs(agree - independent) < 0.01, (quarter, agree)
  other, _ = layers.dropout_keep_mask(jax.random.key(1), 0.7, shape)
  assert abs(float(jnp.mean(mask == other)) - independent) < 0.01


def test_dropout_keep_mask_is_threefry_of_the_flat_index():
  """Element [..., j + k * ceil(C / 4)] is the k-th 16-bit quarter (low half
  of word a, high half, low of b, high of b) of jax's own Threefry-2x32 of
  the counter pair (0, flat index of [..., j]) under the mask's key."""
  key = jax.random.key(3)
  shape = (3, 5, 10)  # 3 hashes per row of 10.
  keep = 0.5
  mask, _ = layers.dropout_keep_mask(key, keep, shape)
  data = jax.random.key_data(key)
  words = np.asarray(jax.vmap(lambda i: threefry_2x32(
      data, jnp.stack([jnp.uint32(0), i])))(jnp.arange(45, dtype=jnp.uint32)))
  quarters = np.stack([words[:, 0] & 0xFFFF, words[:, 0] >> 16,
                       words[:, 1] & 0xFFFF, words[:, 1] >> 16], -1)
  expected = quarters.reshape(3, 5, 3, 4).transpose(0, 1, 3, 2).reshape(
      3, 5, 12)[..., :10] < 32768
  np.testing.assert_array_equal(np.asarray(mask), expected)


def test_dropout_keep_mask_does_not_depend_on_sharding():
  """The same mask on 1 device and sharded over 8 along the batch (the
  counters are the global flat index, as in partitionable jax.random)."""
  shape = (16, 7, 7, 64)
  key = jax.random.key(4)
  single = layers.dropout_keep_mask(key, 0.7, shape)[0]
  mesh = parallel.make_mesh()
  sharded = jax.jit(lambda k: layers.dropout_keep_mask(k, 0.7, shape)[0],
                    out_shardings=parallel.data_sharding(mesh))(key)
  assert len(sharded.sharding.device_set) == len(jax.devices()) > 1
  np.testing.assert_array_equal(np.asarray(sharded), np.asarray(single))


def test_dropout_scales_kept_values_by_the_keep_probability():
  x = jax.random.normal(jax.random.key(0), (8, 7, 7, 16)) + 3.0
  dropout = layers.Dropout(0.3)
  assert dropout.apply({}, x, deterministic=True) is x
  y = dropout.apply({}, x, deterministic=False,
                    rngs={"dropout": jax.random.key(2)})
  kept = y != 0  # x is never 0 here.
  _, q = layers.dropout_keep_mask(jax.random.key(2), 0.7, x.shape)
  np.testing.assert_array_equal(y[kept], (x / q)[kept])
  assert 0.6 < float(jnp.mean(kept)) < 0.8
  assert float(jnp.abs(jnp.mean(y) / jnp.mean(x) - 1)) < 0.05  # Unbiased.
