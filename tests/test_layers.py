"""Fast layers compute what the Flax layers they replace compute."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genimg_jax import layers


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
