"""GANs: models, losses, the gradient penalty, the step, resume, evaluation."""

import json
import os

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from genimg_jax import classifier, config as config_lib, gan
from genimg_jax import images as images_lib, parallel
from genimg_jax import quality, train
from conftest import assert_metrics_agree, assert_trees_near, steps_on_mesh
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
  variables = g.init(jax.random.key(0), jnp.zeros((1, 100)), train=False)
  shapes = {k: v.shape for k, v in flax.traverse_util.flatten_dict(
      variables["params"], sep="/").items()}
  assert shapes == {
      "Dense_0/kernel": (100, 7 * 7 * 256),          # No bias: BN follows.
      "BatchNorm_0/scale": (7 * 7 * 256,), "BatchNorm_0/bias": (7 * 7 * 256,),
      "ConvTranspose_0/kernel": (4, 4, 256, 128),    # Stride 1, no bias.
      "BatchNorm_1/scale": (128,), "BatchNorm_1/bias": (128,),
      "ConvTranspose2x_0/kernel": (4, 4, 128, 64),   # Stride 2, no bias.
      "BatchNorm_2/scale": (64,), "BatchNorm_2/bias": (64,),
      "ConvTranspose2x_1/kernel": (4, 4, 64, 1),     # To pixels, then tanh.
  }


# Logits away from every point where plausible wrong formulas agree (0, +-1,
# real = -fake, equal magnitudes): a D that is right on some examples and
# wrong on others, hinge margins active on some and not on others.
_REAL = np.array([1.7, -0.4, 0.3, 2.6])
_FAKE = np.array([-1.3, 0.9, 2.2, -0.6])


def _softplus(x):
  return np.log1p(np.exp(x))


def test_losses_known_values():
  """Every loss against its formula written out in numpy (Goodfellow et
  al.'s non-saturating loss, the hinge loss of Lim & Ye / Miyato et al.,
  least squares with targets a=0, b=c=1 of Mao et al., and WGAN's critic),
  per example; the tests below check that the inputs tell apart the
  formulas one slip away."""
  real, fake = jnp.asarray(_REAL), jnp.asarray(_FAKE)
  want_d = {
      # -log sigmoid(r) - log(1 - sigmoid(f)).
      "non_saturating": (-np.log(1 / (1 + np.exp(-_REAL)))
                         - np.log(1 - 1 / (1 + np.exp(-_FAKE)))),
      "hinge": np.maximum(0, 1 - _REAL) + np.maximum(0, 1 + _FAKE),
      "least_squares": 0.5 * (_REAL - 1) ** 2 + 0.5 * _FAKE ** 2,
      "wgan_gp": _FAKE - _REAL,
  }
  want_g = {
      "non_saturating": -np.log(1 / (1 + np.exp(-_FAKE))),  # -log D(G(z)).
      "hinge": -_FAKE,
      "least_squares": 0.5 * (_FAKE - 1) ** 2,
      "wgan_gp": -_FAKE,
  }
  assert set(want_d) == set(gan.LOSSES)
  for kind in gan.LOSSES:
    np.testing.assert_allclose(gan.discriminator_loss(kind, real, fake),
                               want_d[kind], rtol=1e-6, err_msg=kind)
    np.testing.assert_allclose(gan.generator_loss(kind, fake), want_g[kind],
                               rtol=1e-6, err_msg=kind)
  with pytest.raises(ValueError, match="Unknown GAN loss"):
    gan.generator_loss("minimax", fake)
  with pytest.raises(ValueError, match="Unknown GAN loss"):
    gan.discriminator_loss("minimax", real, fake)


def test_loss_inputs_tell_plausible_wrong_formulas_apart():
  """Each formula one slip away from a right one gives, at _REAL/_FAKE,
  values off by more than 1e-3 on some example, so the known-value test
  above fails for it."""
  r, f = _REAL, _FAKE
  pairs = {
      "ns_d": (_softplus(-r) + _softplus(f), [
          _softplus(r) + _softplus(-f),           # Labels swapped.
          _softplus(-r) + _softplus(-f),          # Fake labelled real.
          _softplus(-r) - _softplus(-f)]),        # Minimax's sign.
      "ns_g": (_softplus(-f), [
          -_softplus(f),                          # Saturating minimax.
          _softplus(f), np.log(2) - f / 2]),      # Wrong sign; linearised.
      "hinge_d": (np.maximum(0, 1 - r) + np.maximum(0, 1 + f), [
          np.maximum(0, 1 + r) + np.maximum(0, 1 - f),
          np.maximum(0, -r) + np.maximum(0, f),   # No margin.
          (1 - r) + (1 + f)]),                    # No ReLU.
      "hinge_g": (-f, [np.maximum(0, 1 - f), f]),
      "ls_d": (0.5 * (r - 1) ** 2 + 0.5 * f ** 2, [
          (r - 1) ** 2 + f ** 2,                  # No 1/2.
          0.5 * (r - 1) ** 2 + 0.5 * (f + 1) ** 2,  # Targets -1, 1.
          0.5 * r ** 2 + 0.5 * (f - 1) ** 2]),    # Targets swapped.
      "ls_g": (0.5 * (f - 1) ** 2, [
          0.5 * f ** 2,                           # Target 0 (c = 0).
          (f - 1) ** 2, 0.5 * (f + 1) ** 2]),
      "wgan_d": (f - r, [r - f, f + r]),
      "wgan_g": (-f, [f, r - f]),
  }
  for name, (right, wrongs) in pairs.items():
    for i, wrong in enumerate(wrongs):
      assert np.max(np.abs(right - wrong)) > 1e-3, (name, i)


def test_gradient_penalty_against_a_direct_computation():
  """A quadratic critic D(x) = 0.5 sum(w x^2): grad D(x) = w x depends on x,
  so the penalty is only right at the per-example interpolates. The
  gradient norms straddle 1 (1.14, then four in 0.70-0.89), so a one-sided
  penalty max(0, ||g|| - 1)^2, ||g||^2 - 1 or a missing -1 fail too."""
  w = jax.random.uniform(jax.random.key(0), (6, 6, 1), minval=0.5, maxval=2.)
  d_fn = lambda x: 0.5 * jnp.sum(w * x ** 2, axis=(1, 2, 3))
  real = 0.1 * jax.random.normal(jax.random.key(1), (5, 6, 6, 1))
  fake = 0.1 * (1.0 + jax.random.normal(jax.random.key(2), (5, 6, 6, 1)))
  key = jax.random.key(3)
  gp = gan.gradient_penalty(d_fn, real, fake, key)
  eps = np.asarray(jax.random.uniform(key, (5, 1, 1, 1)))  # The draw used.
  assert len(np.unique(eps)) == 5                           # Per example.
  x_hat = eps * np.asarray(real) + (1 - eps) * np.asarray(fake)
  norms = np.sqrt(np.sum((np.asarray(w) * x_hat) ** 2, axis=(1, 2, 3)))
  assert np.sum(norms > 1) == 1 and np.all(norms > 0.6)
  want = np.mean((norms - 1.0) ** 2)
  np.testing.assert_allclose(gp, want, rtol=1e-5)
  for wrong in (np.mean(np.maximum(0, norms - 1) ** 2),
                np.mean(norms ** 2 - 1), np.mean(norms ** 2),
                (np.sqrt(np.sum(norms ** 2)) - 1) ** 2):  # Batch-wide norm.
    assert abs(wrong - want) > 1e-3 * want


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


def _steps_on_one_batch(config, num_devices, num_steps=3, seed=0):
  """`steps_on_mesh` of `num_steps` GAN steps on one fixed batch."""
  images = np.random.default_rng(seed).integers(
      0, 256, (config.batch_size, 28, 28, 1), dtype=np.uint8)
  batch = {"image": images,
           "label": np.arange(config.batch_size, dtype=np.int32) % 10}
  return steps_on_mesh(config, num_devices, [batch] * num_steps,
                       num_train_steps=10)


def _float_leaves_but_optimizer(state) -> dict:
  """{path: leaf} of the state's floating-point leaves outside opt_state
  (Adam's moments of near-zero gradients are rounding noise)."""
  return {jax.tree_util.keystr(path): x for path, x in
          jax.tree_util.tree_flatten_with_path(state)[0]
          if "opt_state" not in jax.tree_util.keystr(path) and
          np.issubdtype(np.asarray(x).dtype, np.floating)}


@pytest.mark.parametrize("overrides", [
    {"data.random_flip": True},  # The same rows flip on 1 and 8 devices.
    # SGD: Adam with b1 = 0 moves every weight by +-lr whatever the size of
    # its gradient, so near-zero gradients' rounding signs (BatchNorm biases
    # over 8 examples) would decide whole updates.
    {"gan.loss": "wgan_gp", "gan.n_critic": 2, "model.dropout_rate": 0.0,
     "optimizer.generator.name": "sgd", "optimizer.discriminator.name": "sgd",
     "optimizer.generator.learning_rate": 1e-3,
     "optimizer.discriminator.learning_rate": 1e-3},
])
def test_gan_one_and_eight_devices_agree(idx_dir, overrides):
  """Same global batch on 1 and 8 devices: the same losses at every step and
  the same state, up to float summation order.

  Measured here: metrics within 4e-4 relative (WGAN-GP's losses are
  differences of nearly equal terms), parameter leaves within 3e-3 relative
  (Adam turns the rounding noise of near-zero bias gradients into whole
  updates). Emulated sharding bugs, a discriminator loss over one device's
  shard or every device drawing the same noise, move the metrics by 1e-2 to
  1 relative and the bias leaves by about 100%.
  """
  config = _tiny_gan(idx_dir, **overrides)
  (_, s1, m1), (_, s8, m8) = (_steps_on_one_batch(config, n) for n in (1, 8))
  assert_metrics_agree(m1, m8, rtol=1e-2, atol=1e-6, names=(
      "d_loss", "g_loss", "d_real", "d_fake", "gp", "d_grad_norm",
      "g_grad_norm"))
  assert_trees_near(_float_leaves_but_optimizer(s1),
                    _float_leaves_but_optimizer(s8), rtol=1e-2, atol=1e-5)


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
                                 "eval_every": 1, "gan.conditional": True,
                                 "feature_network": path})
  workdir = str(tmp_path / "run")
  state, metrics = train.train_and_evaluate(config, workdir)
  assert metrics["fid"] > 0 and 1.0 <= metrics["score"] <= 10.0
  # The checkpoint of the lower FID is kept besides the latest, and
  # `eval --checkpoint best` evaluates it.
  fids = {r["step"]: r["fid"] for r in map(json.loads, open(os.path.join(
      workdir, "metrics.jsonl"))) if r["split"] == "eval"}
  best_step = min(fids, key=fids.get)
  assert os.listdir(os.path.join(workdir, "checkpoints_best")) == [
      str(best_step)]
  best = train.evaluate_workdir(workdir, which="best")
  assert best["step"] == best_step
  assert best["fid"] == pytest.approx(fids[best_step], rel=1e-4)
  names = sorted(os.listdir(os.path.join(workdir, "samples")))
  assert names == ["classes_000001.png", "classes_000002.png",
                   "interp_000001.png", "interp_000002.png",
                   "step_000001.png", "step_000002.png"]
  # The grid is the EMA generator's, with its own standing statistics.
  state, mesh = jax.device_get(state), parallel.make_mesh()
  stats = gan.make_ema_batch_stats(config, mesh)(state, parallel.replicate(
      jax.random.fold_in(jax.random.key(config.seed + 4), 2), mesh))
  z = np.asarray(jax.random.normal(jax.random.key(config.seed + 1),
                                   (64, 100)))
  sampler = gan.make_sampler(config, mesh)
  want = gan.sample_uint8(sampler, state, z,
                          np.arange(64, dtype=np.int32) % 10, mesh, stats)
  png = np.asarray(Image.open(os.path.join(workdir, "samples",
                                           "step_000002.png")))
  np.testing.assert_array_equal(png[::2, ::2],  # Saved upscaled 2x.
                                images_lib.grid(want, 8)[..., 0])


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


def _fixed_batch(config, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.integers(0, 256, (config.batch_size, 28, 28, 1),
                                dtype=np.uint8),
          "label": np.arange(config.batch_size, dtype=np.int32) % 10}


@pytest.mark.parametrize("dropout_rate", [0.0, 0.3])
def test_real_and_fake_passes_draw_their_own_dropout_masks(idx_dir,
                                                           dropout_rate):
  """A generator that outputs the real batch itself: the discriminator's real
  and fake logits differ only through their dropout masks."""
  config = _tiny_gan(idx_dir, **{"model.dropout_rate": dropout_rate})
  state = gan.create_train_state(config, jax.random.key(0), 10)
  batch = _fixed_batch(config)
  real = classifier.to_float(batch["image"]) * 2.0 - 1.0

  def copy_the_batch(variables, z, labels, train, mutable):
    del z, labels, train, mutable
    return real, {"batch_stats": variables["batch_stats"]}

  state = state.replace(g=state.g.replace(apply_fn=copy_the_batch))
  step = jax.jit(gan.bind_train_step(config))
  _, metrics = step(state, batch, jax.random.key(1))
  gap = abs(float(metrics["d_real"]) - float(metrics["d_fake"]))
  if dropout_rate:  # Different masks: here 7e-4 (logits are small at init).
    assert gap > 1e-5
  else:  # Rounding only (here 1.5e-8): both passes see the same images.
    assert gap < 1e-5


@pytest.mark.parametrize("ema_warmup", [True, False])
def test_ema_follows_its_formula(idx_dir, ema_warmup):
  """ema_t = d_t ema_{t-1} + (1 - d_t) params_t from ema_0 = the initial
  parameters, d_t = min(0.999, (1 + t) / (10 + t)) with gan.ema_warmup,
  else 0.999; the step logs d_t as ema_decay."""
  config = _tiny_gan(idx_dir, **{"gan.ema_warmup": ema_warmup})
  mesh = parallel.make_mesh(1)
  state = train.init_state(config, mesh, jax.random.key(0), 10)
  step = train.compile_train_step(config, mesh)
  expected = jax.device_get(state.g.params)
  batch = _fixed_batch(config)
  for t in range(3):
    state, metrics = step(state, batch, jax.random.key(1))
    params = jax.device_get(state.g.params)
    decay = min(0.999, (1 + t) / (10 + t)) if ema_warmup else 0.999
    assert float(metrics["ema_decay"]) == pytest.approx(decay, rel=1e-6)
    expected = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p,
                            expected, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                         atol=1e-7),
                 jax.device_get(state.ema_params), expected)
  assert not np.allclose(jax.tree.leaves(expected)[0],
                         jax.tree.leaves(params)[0])


def test_standing_statistics_belong_to_the_ema_generator(idx_dir):
  """With one batch, inference with the standing statistics reproduces the
  EMA generator's training-mode output on that batch; the raw generator's
  running statistics do not."""
  config = _tiny_gan(idx_dir)
  mesh = parallel.make_mesh()
  state = train.init_state(config, mesh, jax.random.key(0), 10)
  step = train.compile_train_step(config, mesh)
  for _ in range(3):
    state, _ = step(state, _fixed_batch(config), jax.random.key(1))
  rng = jax.random.key(7)
  stats = gan.make_ema_batch_stats(config, mesh, num_batches=1,
                                   batch_size=16)(state, rng)
  z = jax.random.normal(jax.random.split(rng)[0], (1, 16, 100))[0]
  generator, _ = gan.make_models(config)
  want, _ = generator.apply({"params": state.ema_params,
                             "batch_stats": state.g.batch_stats}, z, None,
                            train=True, mutable=["batch_stats"])
  got = gan.generate(state.g, state.ema_params, z, None, stats)
  np.testing.assert_allclose(got, want, atol=2e-5)
  raw_stats = gan.generate(state.g, state.ema_params, z, None)
  assert np.max(np.abs(raw_stats - want)) > 1e-2


def test_cosine_schedule_runs_over_the_whole_run(idx_dir):
  """GAN optimizers get the run length: with a cosine schedule over 20
  steps the parameters still move at steps 8-10 (with the schedule built
  for 0 steps the rate was 0 right after the warm-up)."""
  config = _tiny_gan(idx_dir, **{
      "optimizer.generator.schedule": "cosine",
      "optimizer.discriminator.schedule": "cosine",
      "optimizer.generator.warmup_steps": 2,
      "optimizer.discriminator.warmup_steps": 2})
  mesh = parallel.make_mesh(1)
  state = train.init_state(config, mesh, jax.random.key(0), 20)
  step = train.compile_train_step(config, mesh)
  snapshots = []
  for t in range(10):
    state, _ = step(state, _fixed_batch(config), jax.random.key(1))
    if t >= 7:
      snapshots.append(jax.device_get((state.g.params, state.d.params)))
  for before, after in zip(snapshots, snapshots[1:]):
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
      assert not np.array_equal(a, b)


def _spectral_norm_layers(d_vars):
  """{layer/param: (sigma, u)} of a spectrally normalised discriminator."""
  flat = flax.traverse_util.flatten_dict(d_vars["batch_stats"], sep="/")
  return {k[:-len("/sigma")].split("/", 1)[1]: (
      flat[k], flat[k[:-len("sigma")] + "u"]) for k in flat
          if k.endswith("/sigma")}


def test_spectral_norm_sigma_is_the_largest_singular_value():
  d = gan.Discriminator(num_classes=10, dropout_rate=0.0, spectral_norm=True)
  x = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))
  labels = jnp.arange(4)
  variables = d.init(jax.random.key(1), x, labels, train=False)
  for _ in range(60):  # One power iteration per call.
    _, updated = d.apply(variables, x, labels, train=True,
                         mutable=["batch_stats"])
    variables = {**variables, **updated}
  layers = _spectral_norm_layers(variables)
  assert sorted(layers) == ["Conv_0/kernel", "Conv_1/kernel",
                            "Dense_0/kernel", "Embed_0/embedding"]
  params = flax.traverse_util.flatten_dict(variables["params"], sep="/")
  for name, (sigma, _) in layers.items():
    w = np.asarray(params[name])
    top = np.linalg.svd(w.reshape(-1, w.shape[-1]), compute_uv=False)[0]
    # Power iteration converges slowly where the top two singular values
    # are close (the embedding: 0.2% off after 60 calls); a wrong norm (the
    # Frobenius norm, a stale u) is off by far more.
    assert float(sigma) == pytest.approx(top, rel=1e-2), name


def _np_spectral_normalised(w, u_1O):
  """W / sigma as flax's SpectralNorm computes it at every call, in float64
  numpy: W as a matrix [-1, O], one power iteration from the stored u
  (v = unit(u W^T), u' = unit(v W)), sigma = v W u'^T."""
  m = np.asarray(w, np.float64).reshape(-1, w.shape[-1])
  unit = lambda a: a / np.sqrt(np.sum(a * a) + 1e-12)
  v = unit(np.asarray(u_1O, np.float64) @ m.T)
  u = unit(v @ m)
  return np.asarray(w, np.float64) / (v @ m @ u.T)[0, 0]


def test_spectral_norm_divides_every_layer_by_its_sigma():
  """A spectrally normalised projection D at inference equals the plain D
  whose every kernel and class embedding is divided by its sigma from one
  power iteration on the stored u (W / sigma, not W / sigma^2 or W, in
  every layer)."""
  kwargs = dict(num_classes=10, dropout_rate=0.0)
  d_sn = gan.Discriminator(spectral_norm=True, **kwargs)
  x = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))
  labels = jnp.array([3, 7, 0, 3])
  variables = d_sn.init(jax.random.key(1), x, labels, train=False)
  # Initial sigmas sit near 1 (LeCun init: the Dense(1) kernel's norm is
  # about 1), where dividing by sigma changes little: scale each weight.
  params = flax.traverse_util.flatten_dict(variables["params"], sep="/")
  for name, factor in (("Conv_0/kernel", 3.0), ("Conv_1/kernel", 0.4),
                       ("Dense_0/kernel", 2.5), ("Embed_0/embedding", 0.3)):
    params[name] = params[name] * factor
  variables = {"params": flax.traverse_util.unflatten_dict(params, sep="/"),
               "batch_stats": variables["batch_stats"]}
  for _ in range(3):
    _, updated = d_sn.apply(variables, x, labels, train=True,
                            mutable=["batch_stats"])
    variables = {**variables, **updated}
  got = d_sn.apply(variables, x, labels, train=False)
  stats = _spectral_norm_layers(variables)
  assert sorted(stats) == ["Conv_0/kernel", "Conv_1/kernel",
                           "Dense_0/kernel", "Embed_0/embedding"]
  normalised = dict(params)
  for name, (_, u) in stats.items():
    normalised[name] = _np_spectral_normalised(params[name], u)
    sigma = np.max(np.abs(params[name])) / np.max(np.abs(normalised[name]))
    assert abs(sigma - 1) > 0.3, name
  plain = gan.Discriminator(**kwargs)
  want = plain.apply(
      {"params": flax.traverse_util.unflatten_dict(normalised, sep="/")}, x,
      labels, train=False)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  raw = plain.apply({"params": variables["params"]}, x, labels, train=False)
  assert np.max(np.abs(raw - want)) > 0.1 * np.max(np.abs(want))


def test_spectral_norm_state_moves_only_in_discriminator_updates(idx_dir):
  """One step (n_critic = 1) advances each u by the two power iterations of
  the discriminator update (real and fake passes), none for the generator
  update; inference leaves it alone."""
  config = _tiny_gan(idx_dir, **{"gan.loss": "hinge",
                                 "model.spectral_norm": True,
                                 "model.dropout_rate": 0.0,
                                 "gan.conditional": True})
  state = gan.create_train_state(config, jax.random.key(0), 10)
  batch = _fixed_batch(config)
  new, _ = jax.jit(gan.bind_train_step(config))(state, batch,
                                                jax.random.key(1))
  _, d = gan.make_models(config)
  variables = {"params": state.d.params, "batch_stats": state.d.batch_stats}
  x = jnp.zeros((2, 28, 28, 1))
  labels = jnp.zeros((2,), jnp.int32)
  for _ in range(2):  # u's update depends on the weights, not the input.
    _, updated = d.apply(variables, x, labels, train=True,
                         mutable=["batch_stats"])
    variables = {**variables, **updated}
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-7),
               jax.device_get(new.d.batch_stats), variables["batch_stats"])
  _, unchanged = d.apply(variables, x, labels, train=False,
                         mutable=["batch_stats"])
  jax.tree.map(np.testing.assert_array_equal, unchanged["batch_stats"],
               variables["batch_stats"])


def test_critic_batches_stay_spread_over_all_devices():
  mesh = parallel.make_mesh()
  x = parallel.shard_host_array(np.arange(32), mesh)
  parts = jax.jit(lambda a: gan.critic_batches(a, 2))(x)
  np.testing.assert_array_equal(parts, np.arange(32).reshape(16, 2).T)
  for shard in parts.addressable_shards:  # Every device holds both parts.
    assert shard.data.shape == (2, 2)


def test_a_config_saved_before_the_flip_and_ema_warmup_fields_still_loads():
  """`genimg eval` and `sample` read a workdir's config.json, which runs of
  earlier versions wrote without gan.ema_warmup and data.random_flip."""
  saved = json.loads(config_lib.load_config_file("dcgan").to_json())
  del saved["gan"]["ema_warmup"], saved["data"]["random_flip"]
  settings = gan.settings_from_config(ml_collections.ConfigDict(saved))
  assert settings.ema_warmup and not settings.random_flip
