"""Classifier models: parameter counts, pooling, features, augmentation."""

import jax
import jax.numpy as jnp
import numpy as np

from genimg_jax import classifier


def _num_params(params):
  return sum(x.size for x in jax.tree.leaves(params))


def test_seed_cnn_parameter_count():
  variables = classifier.CNN(10).init(jax.random.key(0),
                                      jnp.zeros((1, 28, 28, 1)))
  assert _num_params(variables["params"]) == 688_138


def test_cnn_output_shapes():
  model = classifier.CNN(10)
  x = jnp.zeros((3, 28, 28, 1))
  variables = model.init(jax.random.key(0), x)
  assert model.apply(variables, x).shape == (3, 10)
  assert model.apply(variables, x, features=True).shape == (3, 512)


def test_resnet_shapes_and_batch_stats():
  model = classifier.ResNet(10, width=8, blocks_per_stage=(1, 1, 1))
  x = jnp.ones((4, 28, 28, 1))
  variables = model.init(jax.random.key(0), x)
  assert "batch_stats" in variables
  logits, updates = model.apply(variables, x, train=True,
                                mutable=["batch_stats"])
  assert logits.shape == (4, 10)
  assert model.apply(variables, x, features=True).shape == (4, 32)
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)),
                         variables["batch_stats"], updates["batch_stats"])
  assert any(jax.tree.leaves(changed))


def test_augment_is_a_flip_and_shift_of_each_image():
  images = jax.random.uniform(jax.random.key(0), (16, 8, 8, 1))
  out = classifier.augment(images, jax.random.key(1), pad=2)
  assert out.shape == images.shape
  np.testing.assert_array_equal(out, classifier.augment(images,
                                                        jax.random.key(1)))
  padded = np.pad(np.asarray(images), ((0, 0), (2, 2), (2, 2), (0, 0)))
  for i in range(16):
    candidates = [padded[i, dy:dy + 8, dx:dx + 8] for dy in range(5)
                  for dx in range(5)]
    candidates += [c for c in [np.pad(np.asarray(images[i])[:, ::-1],
                                      ((2, 2), (2, 2), (0, 0)))[dy:dy + 8,
                                                                dx:dx + 8]
                               for dy in range(5) for dx in range(5)]]
    assert any(np.array_equal(out[i], c) for c in candidates)
