"""The autoencoder family's optional PatchGAN discriminator (LDM's
`LPIPSWithDiscriminator` without LPIPS): the network against taming's
`NLayerDiscriminator`, the adaptive weight and both gradients against a
direct computation, disc_start, the default (off) step unchanged, 1 vs 8
devices, stopped-and-resumed training and the export."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genimg_jax import autoencoder, autoencoder_family as af, classifier
from genimg_jax import train
from genimg_jax.nets.patch_discriminator import NLayerDiscriminator
from conftest import (assert_metrics_agree, assert_trees_near, steps_on_mesh,
                      tiny_config)

# test_autoencoder_family.py's MINI_AE; DISC: on, a small discriminator of
# 2 layers, 8, 16 and 32 channels (28 -> 14 -> 7 -> 6 -> 5: 5 x 5 logits).
MINI = {"autoencoder.block_out_channels": "(8, 16)",
        "autoencoder.norm_num_groups": 4, "autoencoder.latent_channels": 2}
DISC = {"autoencoder.disc_weight": 0.5, "autoencoder.disc_channels": 8,
        "autoencoder.disc_layers": 2}
# SGD at learning rate 1: the update is minus the gradient.
SGD = {"optimizer.name": "sgd", "optimizer.learning_rate": 1.0,
       "optimizer.schedule": "constant", "optimizer.warmup_steps": 0}


def _config(idx_dir, **overrides):
  return tiny_config(idx_dir, "autoencoder_kl.py", **{**MINI, **overrides})


def _batch(seed=0, n=16):
  return {"image": np.random.default_rng(seed).integers(
      0, 256, (n, 28, 28, 1), dtype=np.uint8),
          "label": np.zeros((n,), np.int32)}


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _init_shapes(model, shape):
  return jax.eval_shape(lambda: model.init(jax.random.key(0),
                                           jnp.zeros(shape)))


def test_taming_default_parameter_count_and_patch_shapes():
  """taming's NLayerDiscriminator(input_nc=3, ndf=64, n_layers=3) with
  BatchNorm, counted by hand (kernels 4 x 4; BatchNorm: scale and offset,
  its running averages are buffers, not parameters):
    conv_0 3 * 64 * 16 + 64 bias     =     3,136
    conv_1 64 * 128 * 16 + BN 2 * 128 =   131,328
    conv_2 128 * 256 * 16 + BN 2 * 256 =  524,800
    conv_3 256 * 512 * 16 + BN 2 * 512 = 2,098,176
    conv_4 512 * 1 * 16 + 1 bias       =     8,193
    total                               2,765,633."""
  variables = _init_shapes(NLayerDiscriminator(), (2, 256, 256, 3))
  params = variables["params"]
  assert _count(params) == 2_765_633
  assert params["conv_0"]["kernel"].shape == (4, 4, 3, 64)
  assert params["conv_3"]["kernel"].shape == (4, 4, 256, 512)
  assert params["conv_4"]["kernel"].shape == (4, 4, 512, 1)
  assert "bias" not in params["conv_1"] and "bias" not in params["conv_3"]
  assert _count(variables["batch_stats"]) == 2 * (128 + 256 + 512)

  def logits_shape(hw, c, **kw):
    model = NLayerDiscriminator(**kw)
    variables = model.init(jax.random.key(0), jnp.zeros((1, hw, hw, c)))
    return jax.eval_shape(lambda x: model.apply(
        variables, x, mutable=["batch_stats"])[0],
                          jnp.zeros((2, hw, hw, c))).shape
  # Each 4 x 4 conv with padding 1: s -> floor((s - 2) / 2) + 1 at stride 2,
  # s - 1 at stride 1.
  assert logits_shape(256, 3) == (2, 30, 30, 1)  # taming's 30 x 30 patches.
  assert logits_shape(28, 1) == (2, 1, 1, 1)  # 28 -> 14 -> 7 -> 3 -> 2 -> 1.
  assert logits_shape(28, 1, num_layers=2) == (2, 5, 5, 1)


def test_initialisation_is_tamings():
  """Conv kernels N(0, 0.02), BatchNorm scales N(1, 0.02), offsets and
  biases 0."""
  params = NLayerDiscriminator().init(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
  kernel = np.asarray(params["conv_3"]["kernel"])
  assert abs(kernel.mean()) < 1e-3 and kernel.std() == pytest.approx(
      0.02, rel=0.02)
  scale = np.asarray(params["norm_3"]["scale"])
  assert abs(scale.mean() - 1) < 5e-3 and scale.std() == pytest.approx(
      0.02, rel=0.2)
  assert not np.any(params["norm_3"]["bias"])
  assert not np.any(params["conv_0"]["bias"])


def test_adaptive_weight_is_clipped_and_disc_factor_starts_at_disc_start():
  """lambda = w * clip(||a|| / (||b|| + 1e-4), 0, 1e4): a vanishing
  generator gradient gives w * 1e4; disc_factor is 0 before disc_start."""
  a, b = jnp.full((3, 3, 2, 1), 2.0), jnp.full((3, 3, 2, 1), 0.5)
  assert float(af.adaptive_weight(a, b, 0.5)) == pytest.approx(
      0.5 * np.sqrt(18 * 4.0) / (np.sqrt(18 * 0.25) + 1e-4), rel=1e-6)
  assert float(af.adaptive_weight(a, 0 * b, 0.5)) == pytest.approx(5e3)
  assert float(af.adaptive_weight(a, 1e-9 * b, 2.0)) == pytest.approx(2e4)
  assert [float(af.disc_factor(jnp.int32(s), 3)) for s in range(5)] == [
      0, 0, 0, 1, 1]


def _one_step(config, batch, rng=jax.random.key(1)):
  """(state before, state after, metrics) of one jitted step from the
  config's initial state (key 0), on the host."""
  state = af.create_train_state(config, jax.random.key(0), 10)
  step = jax.jit(af.bind_train_step(config))
  new, metrics = step(state, batch, rng)
  return state, jax.device_get(new), jax.device_get(metrics)


def _with_kernel(params, kernel):
  decoder = {**params["decoder"], "conv_out": {
      **params["decoder"]["conv_out"], "kernel": kernel}}
  return {**params, "decoder": decoder}


def test_adaptive_weight_and_gradients_equal_a_direct_computation(idx_dir):
  """At step 0 with disc_start 0 (SGD at rate 1: an update is minus the
  gradient): lambda = 0.5 * clip(||d rec / dW|| / (||d g / dW|| + 1e-4),
  0, 1e4) with W the decoder's conv_out kernel and rec the reconstruction
  term without the KL; the autoencoder's gradient is that of
  rec + kl_weight * KL + lambda * g with lambda constant; the
  discriminator's that of 0.5 * (mean relu(1 - D(x)) + mean relu(1 +
  D(x_rec))), x_rec held fixed, and its BatchNorm statistics those of the
  real, then the fake pass."""
  config = _config(idx_dir, **DISC, **SGD)
  batch = _batch()
  state, new, metrics = _one_step(config, batch)
  x = af.to_model_range(jnp.asarray(batch["image"]))
  z_rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(1), 0), 0)
  d = state.disc

  def d_train(params, stats, images):
    logits, new_vars = d.apply_fn({"params": params, "batch_stats": stats},
                                  images, train=True, mutable=["batch_stats"])
    return logits, new_vars["batch_stats"]

  def terms(params):
    x_rec, mean, logvar = state.apply_fn({"params": params}, x, z_rng)
    rec = jnp.mean(af.reconstruction_error("l1", x, x_rec))
    kl = jnp.mean(af.kl_to_standard_normal(mean, logvar))
    g = -jnp.mean(d_train(d.params, d.batch_stats, x_rec)[0])
    return rec, kl, g, x_rec

  kernel = state.params["decoder"]["conv_out"]["kernel"]
  grad_w = lambda i: jax.grad(lambda w: terms(_with_kernel(
      state.params, w))[i])(kernel)
  ratio = jnp.linalg.norm(grad_w(0)) / (jnp.linalg.norm(grad_w(2)) + 1e-4)
  lam = 0.5 * float(jnp.clip(ratio, 0.0, 1e4))
  assert 0 < lam < 0.5e4  # Unclipped here.
  assert float(metrics["disc_weight"]) == pytest.approx(lam, rel=1e-4)
  assert metrics["disc_factor"] == 1.0

  def total(params):
    rec, kl, g, _ = terms(params)
    return rec + 1e-6 * kl + lam * g
  want = jax.grad(total)(state.params)
  got = jax.tree.map(lambda a, b: a - b, state.params, new.params)
  assert_trees_near(want, got, rtol=1e-4, atol=1e-6)
  rec, kl, g, x_rec = terms(state.params)
  assert float(metrics["loss"]) == pytest.approx(
      float(rec + 1e-6 * kl + lam * g), rel=1e-5)
  assert float(metrics["g_loss"]) == pytest.approx(float(g), rel=1e-5)

  def d_loss(params):
    real, stats = d_train(params, d.batch_stats, x)
    fake, stats = d_train(params, stats, x_rec)
    loss = 0.5 * (jnp.mean(jax.nn.relu(1 - real)) +
                  jnp.mean(jax.nn.relu(1 + fake)))
    return loss, (stats, real, fake)
  (loss, (stats, real, fake)), want_d = jax.value_and_grad(
      d_loss, has_aux=True)(d.params)
  assert float(metrics["disc_loss"]) == pytest.approx(float(loss), rel=1e-5)
  assert float(metrics["logits_real"]) == pytest.approx(
      float(jnp.mean(real)), rel=1e-4, abs=1e-6)
  assert float(metrics["logits_fake"]) == pytest.approx(
      float(jnp.mean(fake)), rel=1e-4, abs=1e-6)
  got_d = jax.tree.map(lambda a, b: a - b, d.params, new.disc.params)
  assert_trees_near(want_d, got_d, rtol=1e-4, atol=1e-7)
  assert_trees_near(stats, new.disc.batch_stats, rtol=1e-5)


def test_before_disc_start_the_autoencoder_steps_as_without(idx_dir):
  """Before disc_start the autoencoder's parameters and optimizer state
  follow the step without a discriminator (to float rounding: XLA fuses
  the larger program's reconstruction gradient differently, measured 1
  ulp in one element; the adversarial term at step 2 moves them by ~1e-3
  relative); the discriminator's parameters stay (its loss is weighted 0)
  while its BatchNorm statistics move; from disc_start on the updates
  differ."""
  batches = [_batch(0), _batch(1), _batch(2)]
  plain = _config(idx_dir)
  late = _config(idx_dir, **DISC, **{"autoencoder.disc_start": 2})
  _, s0, m0 = steps_on_mesh(plain, 1, batches, 10)
  i1, s1, m1 = steps_on_mesh(late, 1, batches, 10)
  _, s1_two, _ = steps_on_mesh(late, 1, batches[:2], 10)
  _, s0_two, _ = steps_on_mesh(plain, 1, batches[:2], 10)
  for a, b in ((s0_two.params, s1_two.params),
               (s0_two.opt_state, s1_two.opt_state)):
    assert_trees_near(a, b, rtol=1e-6)
  np.testing.assert_array_equal(m1["disc_factor"], [0, 0, 1])
  for name in ("rec", "kl", "loss", "grad_norm"):
    np.testing.assert_allclose(m1[name][:2], m0[name][:2], rtol=1e-6,
                               err_msg=name)
  with pytest.raises(AssertionError):  # The adversarial term at step 2.
    assert_trees_near(s0.params, s1.params, rtol=1e-5)
  jax.tree.map(np.testing.assert_array_equal, i1.disc.params,
               s1_two.disc.params)
  assert not np.array_equal(
      jax.tree.leaves(i1.disc.batch_stats)[0],
      jax.tree.leaves(s1_two.disc.batch_stats)[0])
  assert m1["disc_loss"][2] > 0 and m1["disc_weight"][2] > 0
  assert not np.array_equal(jax.tree.leaves(s1.disc.params)[0],
                            jax.tree.leaves(i1.disc.params)[0])


def test_disc_weight_zero_is_the_plain_step(idx_dir):
  """The default: a plain TrainState (no discriminator, the recorded
  parameter paths) and the step of the loss by hand, bit for bit."""
  config = _config(idx_dir)
  assert config.autoencoder.disc_weight == 0.0
  batch = _batch()
  state, new, metrics = _one_step(config, batch)
  assert type(state) is classifier.TrainState  # pylint: disable=unidiomatic-typecheck
  assert not hasattr(state, "disc")
  assert set(metrics) == {"loss", "rec", "kl", "l1", "mse", "grad_norm",
                          "param_norm"}

  def reference(state, batch, rng):
    """The step as it was before the discriminator existed."""
    rng = jax.random.fold_in(rng, state.step)
    x = af.to_model_range(batch["image"])
    z_rng = jax.random.fold_in(rng, 0)

    def loss_fn(params):
      x_rec, mean, logvar = state.apply_fn({"params": params}, x, z_rng)
      rec = af.reconstruction_error("l1", x, x_rec)
      kl = af.kl_to_standard_normal(mean, logvar)
      return jnp.mean(rec + 1e-6 * kl), (x_rec, rec, kl)
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    return state.apply_gradients(grads=grads), loss
  want, loss = jax.device_get(jax.jit(reference)(state, batch,
                                                 jax.random.key(1)))
  jax.tree.map(np.testing.assert_array_equal, want.params, new.params)
  jax.tree.map(np.testing.assert_array_equal, want.opt_state, new.opt_state)
  assert metrics["loss"] == loss


def _float_leaves_but_optimizer(state) -> dict:
  """{path: leaf} of the state's floating-point leaves outside opt_state,
  but the attention key biases: their gradient is 0 in exact arithmetic
  (softmax ignores a shift shared by every key), so Adam turns its
  rounding noise into whole steps of either sign."""
  return {jax.tree_util.keystr(path): x for path, x in
          jax.tree_util.tree_flatten_with_path(state)[0]
          if "opt_state" not in jax.tree_util.keystr(path) and
          "['to_k']['bias']" not in jax.tree_util.keystr(path) and
          np.issubdtype(np.asarray(x).dtype, np.floating)}


def test_one_and_eight_devices_agree(idx_dir):
  """The same global batches on 1 and 8 devices, the discriminator on from
  step 1: the same losses and states up to float summation order, within
  the VAE family's tolerances (2e-5 relative per metric, 1e-3 per leaf).
  Measured here: metrics within 1.5e-6, leaves within 3.3e-5 (the
  discriminator's BatchNorm offsets)."""
  config = _config(idx_dir, **DISC, **{"autoencoder.disc_start": 1})
  batches = [_batch(0), _batch(1), _batch(2)]
  (_, s1, m1), (_, s8, m8) = (steps_on_mesh(config, n, batches, 10)
                              for n in (1, 8))
  np.testing.assert_array_equal(m8["disc_factor"], [0, 1, 1])
  assert_metrics_agree(m1, m8, rtol=2e-5, atol=1e-7, names=(
      "loss", "rec", "kl", "g_loss", "disc_weight", "disc_loss",
      "logits_real", "logits_fake", "grad_norm", "disc_grad_norm"))
  assert_trees_near(_float_leaves_but_optimizer(s1),
                    _float_leaves_but_optimizer(s8), rtol=1e-3)


def test_stopped_and_resumed_equals_uninterrupted_and_exports(tmp_path,
                                                              idx_dir):
  """With the discriminator on (from step 2 of 4), a run stopped at step 2
  and resumed ends in the same state (discriminator included) and
  evaluation as an uninterrupted one; the export holds the autoencoder
  only."""
  config = _config(idx_dir, **DISC, **{
      "autoencoder.disc_start": 2, "num_steps": 4, "checkpoint_every": 100,
      "mesh.num_devices": 2})
  full, full_metrics = train.train_and_evaluate(config, str(tmp_path / "full"))
  workdir = str(tmp_path / "stopped")
  train.train_and_evaluate(config, workdir, stop_at_step=2)
  resumed, resumed_metrics = train.train_and_evaluate(config, workdir)
  full, resumed = jax.device_get(full), jax.device_get(resumed)
  assert isinstance(resumed, af.AutoencoderState)
  assert jax.tree.leaves(resumed.disc.batch_stats)
  paths = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(full)[0]]
  assert any(p.startswith(".disc.opt_state") for p in paths)
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  assert full_metrics == resumed_metrics
  _, variables = autoencoder.load(
      train.export_autoencoder(workdir, str(tmp_path / "ae.msgpack"))[
          "output"])
  jax.tree.map(np.testing.assert_array_equal, resumed.params,
               variables["params"])
