"""GANs: models, losses, the gradient penalty, the step, resume, evaluation."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genimg_jax import classifier, gan, parallel, quality, train
from conftest import tiny_config

DCGAN = "dcgan.py"


def test_generator_and_discriminator_shapes():
  for shape in ((28, 28, 1), (32, 32, 3), (64, 64, 3)):
    g = gan.Generator(shape)
    z = jnp.zeros((3, 100))
    variables = g.init(jax.random.key(0), z, train=False)
    images = g.apply(variables, z, train=False)
    assert images.shape == (3, *shape)
    d = gan.Discriminator()
    d_vars = d.init(jax.random.key(1), images, train=False)
    assert d.apply(d_vars, images, train=False).shape == (3,)


def test_generator_parameter_shapes_match_the_dcgan():
  g = gan.Generator((28, 28, 1))
  params = g.init(jax.random.key(0), jnp.zeros((1, 100)), train=False)["params"]
  shapes = [x.shape for x in jax.tree.leaves(params)]
  assert (100, 7 * 7 * 256) in shapes            # Dense, no bias.
  assert (4, 4, 256, 128) in shapes              # ConvT 128, stride 1.
  assert (4, 4, 128, 64) in shapes               # ConvT 64, stride 2.
  assert (4, 4, 64, 1) in shapes                 # ConvT 1, stride 2.
  assert (7 * 7 * 256,) not in [s for s in shapes if len(s) == 1 and
                                 "bias" in str(s)]


def test_losses_known_values():
  zero = jnp.zeros(4)
  np.testing.assert_allclose(gan.discriminator_loss("non_saturating", zero,
                                                    zero), 2 * np.log(2),
                             rtol=1e-6)
  np.testing.assert_allclose(gan.generator_loss("non_saturating", zero),
                             np.log(2), rtol=1e-6)
  real, fake = jnp.array([2.0, 0.5]), jnp.array([-2.0, 0.5])
  np.testing.assert_allclose(gan.discriminator_loss("hinge", real, fake),
                             [0.0, 0.5 + 1.5])
  np.testing.assert_allclose(gan.discriminator_loss("least_squares", real,
                                                    fake), [0.5 + 2.0,
                                                            0.125 + 0.125])
  np.testing.assert_allclose(gan.discriminator_loss("wgan_gp", real, fake),
                             [-4.0, 0.0])
  np.testing.assert_allclose(gan.generator_loss("hinge", fake), [2.0, -0.5])
  with pytest.raises(ValueError, match="Unknown GAN loss"):
    gan.generator_loss("minimax", fake)


def test_gradient_penalty_of_a_linear_critic():
  w = jax.random.normal(jax.random.key(0), (5, 6, 6, 1))
  d_fn = lambda x: jnp.sum(x * w[:1], axis=(1, 2, 3))
  real = jax.random.normal(jax.random.key(1), (5, 6, 6, 1))
  fake = jax.random.normal(jax.random.key(2), (5, 6, 6, 1))
  gp = gan.gradient_penalty(d_fn, real, fake, jax.random.key(3))
  np.testing.assert_allclose(gp, (jnp.linalg.norm(w[0]) - 1.0) ** 2,
                             rtol=1e-5)


def _tiny_gan(idx_dir, **overrides):
  return tiny_config(idx_dir, DCGAN, **overrides)


@pytest.mark.parametrize("overrides", [
    {},
    {"gan.loss": "wgan_gp", "gan.n_critic": 2, "model.dropout_rate": 0.0},
    {"gan.loss": "hinge", "model.spectral_norm": True},
    {"gan.loss": "least_squares", "gan.conditional": True},
])
def test_gan_step_updates_everything(idx_dir, overrides):
  config = _tiny_gan(idx_dir, **overrides)
  mesh = parallel.make_mesh()
  state = train.init_state(config, mesh, jax.random.key(0), 4)
  before = jax.device_get(state)
  step = train.compile_train_step(config, mesh)
  rng = jax.device_put(jax.random.key(1), parallel.replicated(mesh))
  batch = {"image": np.random.default_rng(0).integers(
      0, 256, (16, 28, 28, 1), dtype=np.uint8),
           "label": np.arange(16, dtype=np.int32) % 10}
  for _ in range(2):
    state, metrics = step(state, batch, rng)
  after = jax.device_get(state)
  assert int(after.step) == 2
  for name in ("g", "d"):
    old, new = getattr(before, name).params, getattr(after, name).params
    assert all(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(old),
                                                     jax.tree.leaves(new))
               if a.size > 1), name
  assert not np.allclose(jax.tree.leaves(after.ema_params)[0],
                         jax.tree.leaves(after.g.params)[0])
  assert int(after.d.step) == config.gan.n_critic * 2
  if config.model.spectral_norm:
    assert jax.tree.leaves(after.d.batch_stats)
    assert not np.allclose(jax.tree.leaves(before.d.batch_stats)[0],
                           jax.tree.leaves(after.d.batch_stats)[0])
  if config.gan.loss == "wgan_gp":
    assert float(metrics["gp"]) > 0
  assert all(np.isfinite(float(v)) for v in metrics.values())


def test_gan_one_and_eight_devices_agree(tmp_path, idx_dir):
  states = {}
  for n in (1, 8):
    config = _tiny_gan(idx_dir, **{"mesh.num_devices": n, "num_steps": 4})
    states[n], _ = train.train_and_evaluate(config, str(tmp_path / str(n)))
  for a, b in zip(jax.tree.leaves(jax.device_get(states[1])),
                  jax.tree.leaves(jax.device_get(states[8]))):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def test_gan_stopped_and_resumed_equals_uninterrupted(tmp_path, idx_dir):
  config = _tiny_gan(idx_dir, **{"checkpoint_every": 100})
  full, _ = train.train_and_evaluate(config, str(tmp_path / "full"))
  workdir = str(tmp_path / "stopped")
  train.train_and_evaluate(config, workdir, stop_at_step=3)
  resumed, _ = train.train_and_evaluate(config, workdir)
  full, resumed = jax.device_get(full), jax.device_get(resumed)
  assert int(resumed.step) == 6
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)


def test_skip_nonfinite_keeps_the_state(idx_dir):
  config = _tiny_gan(idx_dir, **{"gan.skip_nonfinite": True})
  mesh = parallel.make_mesh()
  state = train.init_state(config, mesh, jax.random.key(0), 4)
  step = train.compile_train_step(config, mesh)
  batch = {"image": np.zeros((16, 28, 28, 1), np.uint8),
           "label": np.zeros(16, np.int32)}
  poisoned = state.replace(g=state.g.replace(params=jax.tree.map(
      lambda p: p * jnp.nan, state.g.params)))
  before = jax.device_get(poisoned.d.params)
  new, metrics = step(poisoned, batch, jax.random.key(1))
  assert float(metrics["skipped"]) == 1.0
  assert int(new.step) == 1
  jax.tree.map(np.testing.assert_array_equal, before,
               jax.device_get(new.d.params))


def _tiny_feature_network(path, idx_dir):
  config = tiny_config(idx_dir, "resnet.py", **{
      "model.width": 4, "model.blocks_per_stage": "(1,)"})
  state = classifier.create_train_state(config, jax.random.key(0), 1)
  return quality.save_feature_network(state, config.model, path)


def test_gan_evaluation_writes_grids_and_fid(tmp_path, idx_dir):
  path = str(tmp_path / "net.msgpack")
  _tiny_feature_network(path, idx_dir)
  config = _tiny_gan(idx_dir, **{"eval_samples": 64, "num_steps": 2,
                                 "gan.conditional": True,
                                 "feature_network": path})
  workdir = str(tmp_path / "run")
  _, metrics = train.train_and_evaluate(config, workdir)
  assert metrics["fid"] > 0 and 1.0 <= metrics["score"] <= 10.0
  names = sorted(os.listdir(os.path.join(workdir, "samples")))
  assert names == ["classes_000002.png", "interp_000002.png",
                   "step_000002.png"]


def test_generator_runs_data_parallel(idx_dir):
  """z is sharded like the batch: 8 devices do the 1-device work, not 8x."""
  from genimg_jax import bench  # pylint: disable=g-import-not-at-top
  config = _tiny_gan(idx_dir)
  flops = {}
  for n in (1, 8):
    mesh = parallel.make_mesh(n)
    state = train.init_state(config, mesh, jax.random.key(0), 4)
    step = train.compile_train_step(config, mesh)
    batch = bench.synthetic_batch(config, mesh)
    rng = parallel.replicate(jax.random.key(1), mesh)
    flops[n] = bench.flops_of(step.lower(state, batch, rng).compile()) * n
  assert flops[8] < 1.5 * flops[1]
