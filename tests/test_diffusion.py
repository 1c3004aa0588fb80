"""Diffusion and flow matching: schedules, targets and samplers against
closed forms and exact (Gaussian-data) models, the UNet's size, classifier-
free guidance, the train step, 1 vs 8 devices and resume."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genimg_jax import config as config_lib, diffusion, parallel, samplers
from genimg_jax import train
from genimg_jax.nets import unet
from conftest import REPO, assert_runs_agree, tiny_config, train_runs

# A UNet that compiles fast (about 40 s on 2 cores), for tests of the step
# and the trainer: one level, no attention. The multi-host test and
# test_sample run the full structure (down, up, attention).
MINI_UNET = {"model.channels": 8, "model.multipliers": "(1,)",
             "model.num_res_blocks": 1, "model.attention_resolutions": "()",
             "diffusion.sample_steps": 2}


def _num_params(tree):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


# --- Schedules ---------------------------------------------------------------

def test_linear_schedule_closed_form():
  ab = diffusion.linear_alpha_bars(1000)
  assert ab.shape == (1000,)
  beta = lambda t: 1e-4 + (0.02 - 1e-4) * t / 999
  # ab_t = prod_{s <= t} (1 - beta_s), as a sum of logs.
  for t in (0, 1, 499, 999):
    expected = math.exp(sum(math.log1p(-beta(s)) for s in range(t + 1)))
    assert ab[t] == pytest.approx(expected, rel=1e-12)
  assert ab[0] == pytest.approx(1 - 1e-4, rel=1e-12)
  assert ab[-1] == pytest.approx(4.0358e-5, rel=1e-3)  # DDPM's value.


def test_cosine_schedule_closed_form():
  ab = diffusion.cosine_alpha_bars(1000)
  f = lambda u: math.cos((u / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
  for t in (0, 1, 250, 499, 900):  # Betas unclipped here.
    assert ab[t] == pytest.approx(f(t + 1) / f(0), rel=1e-9)
  betas = 1 - ab / np.concatenate([[1.0], ab[:-1]])
  assert betas.max() == pytest.approx(0.999)  # The clip at the end.
  assert np.all(np.diff(ab) < 0)


def test_noised_input_has_the_moments_of_q():
  """q(x_t | x_0) = N(sqrt(ab) x0, (1 - ab) I), by sampling."""
  x0 = jnp.array([-0.9, 0.0, 0.7])
  ab = 0.3
  noise = jax.random.normal(jax.random.key(0), (200_000, 3))
  x_t = diffusion.noised_input(jnp.broadcast_to(x0, noise.shape), noise,
                               jnp.full((200_000,), math.sqrt(ab)),
                               jnp.full((200_000,), math.sqrt(1 - ab)))
  np.testing.assert_allclose(np.mean(x_t, 0), math.sqrt(ab) * x0, atol=6e-3)
  np.testing.assert_allclose(np.var(x_t, 0), 1 - ab, rtol=1.5e-2)


def test_targets_by_hand():
  x0, eps = jnp.array([[0.6]]), jnp.array([[-0.8]])
  a, s = jnp.array([0.6]), jnp.array([0.8])  # ab = 0.36.
  assert float(diffusion.target("eps", x0, eps, a, s)[0, 0]) == (
      pytest.approx(-0.8))
  # v = 0.6 * -0.8 - 0.8 * 0.6
  assert float(diffusion.target("v", x0, eps, a, s)[0, 0]) == pytest.approx(
      -0.96)
  assert float(diffusion.target("flow", x0, eps)[0, 0]) == pytest.approx(1.4)
  x_t = diffusion.noised_input(x0, eps, a, s)
  assert float(x_t[0, 0]) == pytest.approx(0.36 - 0.64)
  for objective in ("eps", "v"):
    out = diffusion.target(objective, x0, eps, a, s)
    x0_hat, eps_hat = diffusion.x0_and_eps(objective, out, x_t, 0.6, 0.8)
    assert float(x0_hat[0, 0]) == pytest.approx(0.6, abs=1e-6)
    assert float(eps_hat[0, 0]) == pytest.approx(-0.8, abs=1e-6)


@pytest.mark.parametrize("objective", diffusion.OBJECTIVES)
def test_training_example_is_consistent(objective):
  """x_t, the network's time and the target of a training example obey the
  objective's definitions (recovering x0 from them)."""
  settings = diffusion.Settings(objective=objective)
  x0 = jax.random.uniform(jax.random.key(1), (64, 4, 4, 1), minval=-1,
                          maxval=1)
  x_t, time, target = diffusion.training_example(settings, x0,
                                                 jax.random.key(2))
  if objective == "flow":
    t = diffusion.bcast(time / 1000.0, x0)
    assert 0 <= float(time.min()) and float(time.max()) <= 1000
    recovered = x_t + (1 - t) * target  # x_t + (1 - t)(x0 - eps) = x0
  else:
    assert np.all(np.asarray(time) == np.round(np.asarray(time)))
    a, s = (diffusion.bcast(table[time.astype(int)], x0)
            for table in settings.sqrt_tables())
    recovered, _ = diffusion.x0_and_eps(objective, target, x_t, a, s)
  np.testing.assert_allclose(recovered, x0, atol=2e-3)
  assert len(np.unique(np.asarray(time))) > 40  # A time per example.


# --- Samplers with the exact model of Gaussian data ---------------------------
# Data x ~ N(MU, S^2) per pixel. With a = sqrt(ab), s = sqrt(1 - ab), x_t =
# a x + s eps has variance a^2 S^2 + s^2 and E[eps | x_t] = s (x_t - a MU) /
# (a^2 S^2 + s^2): the network a perfectly trained model would be.
MU, S = 0.3, 0.5


def _gaussian_denoise_fn(alpha_bars):
  alpha_bars = jnp.asarray(alpha_bars, jnp.float32)

  def denoise_fn(x, t):
    ab = alpha_bars[t]
    a, s = jnp.sqrt(ab), jnp.sqrt(1 - ab)
    eps = s * (x - a * MU) / (ab * S**2 + 1 - ab)
    return (x - s * eps) / a, eps
  return denoise_fn


def _gaussian_velocity_fn(x, t):
  """E[x1 - x0 | x_t] for x_t = t x1 + (1 - t) x0, x1 ~ N(MU, S^2)."""
  var = t**2 * S**2 + (1 - t) ** 2
  x1 = MU + t * S**2 * (x - t * MU) / var
  x0 = (1 - t) * (x - t * MU) / var
  return x1 - x0


@pytest.mark.parametrize("sampler", ["ddpm", "ddim_eta0", "ddim_eta1",
                                     "euler", "heun"])
def test_samplers_reach_the_data_distribution(sampler):
  """From N(0, 1) noise, every sampler with the exact model gives samples
  with the data's mean and standard deviation."""
  noise = jax.random.normal(jax.random.key(0), (20_000, 1, 1, 1))
  ab = diffusion.linear_alpha_bars(1000)
  rng = jax.random.key(1)
  run = {
      "ddpm": lambda: samplers.ddpm_sample(_gaussian_denoise_fn(ab), ab, noise,
                                           rng),
      "ddim_eta0": lambda: samplers.ddim_sample(  # 100 steps: std 0.489.
          _gaussian_denoise_fn(ab), ab, noise,
          samplers.ddim_timesteps(1000, 500)),
      "ddim_eta1": lambda: samplers.ddim_sample(
          _gaussian_denoise_fn(ab), ab, noise,
          samplers.ddim_timesteps(1000, 1000), 1.0, rng),
      "euler": lambda: samplers.euler_sample(_gaussian_velocity_fn, noise,
                                             100),
      "heun": lambda: samplers.heun_sample(_gaussian_velocity_fn, noise, 20),
  }[sampler]
  x = np.asarray(jax.jit(run)())
  assert np.mean(x) == pytest.approx(MU, abs=0.015)
  assert np.std(x) == pytest.approx(S, rel=0.02)


def test_ddim_is_deterministic_and_inverts():
  """eta = 0 ignores the rng; encoding with increasing steps from -1 (the
  clean image) and decoding with the same steps in reverse recovers the
  input, with an error of first order in the step (0.005 with all 1,000
  steps, 0.046 with every 10th)."""
  ab = diffusion.linear_alpha_bars(1000)
  denoise_fn = _gaussian_denoise_fn(ab)
  x0 = MU + S * jax.random.normal(jax.random.key(3), (256, 1, 1, 1))
  run = lambda x, ts, key: jax.jit(lambda x, key: samplers.ddim_sample(
      denoise_fn, ab, x, ts, 0.0, key))(x, key)
  errors = {}
  for stride in (1, 10):
    steps = np.append(-1, np.arange(0, 1000, stride)).astype(np.int32)
    latent = run(x0, steps, jax.random.key(0))
    np.testing.assert_array_equal(latent, run(x0, steps, jax.random.key(9)))
    assert float(jnp.std(latent)) == pytest.approx(1.0, abs=0.1)  # Noise.
    recovered = run(latent, steps[::-1].copy(), jax.random.key(0))
    errors[stride] = float(jnp.max(jnp.abs(recovered - x0)))
  assert errors[1] < 0.02
  assert 5 < errors[10] / errors[1] < 15


def _posterior(ab, t, x0, x_t):
  """Mean and variance of q(x_{t-1} | x_t, x0) (DDPM eq. 6, 7)."""
  ab_t, ab_prev = ab[t], ab[t - 1]
  beta = 1 - ab_t / ab_prev
  mean = (math.sqrt(ab_prev) * beta / (1 - ab_t) * x0 +
          math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab_t) * x_t)
  return mean, beta * (1 - ab_prev) / (1 - ab_t)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim_eta1"])
def test_one_stochastic_step_samples_the_posterior(sampler):
  """With x0_hat fixed to c, the step t = 1 -> 0 of DDPM, and of DDIM with
  eta = 1, draws from q(x_0 | x_1, c): its mean and variance beta~_1."""
  ab = diffusion.linear_alpha_bars(1000)[:2]
  c, x_t = 0.5, -0.3

  a, s = (jnp.asarray(v, jnp.float32) for v in (np.sqrt(ab), np.sqrt(1 - ab)))

  def denoise_fn(x, t):  # At t = 1: x0_hat = c; at t = 0 (DDPM): identity.
    x0 = jnp.where(t == 1, c, x)
    return x0, (x - a[t] * x0) / s[t]

  x = jnp.full((50_000, 1, 1, 1), x_t)
  if sampler == "ddpm":
    out = samplers.ddpm_sample(denoise_fn, ab, x, jax.random.key(0))
  else:
    # The step 0 -> -1 returns x0_hat = x (sigma 0, alpha-bar 1).
    out = samplers.ddim_sample(denoise_fn, ab, x, np.array([1, 0, -1]), 1.0,
                               jax.random.key(0))
  mean, var = _posterior(ab, 1, c, x_t)
  assert float(jnp.mean(out)) == pytest.approx(mean, abs=3 * math.sqrt(
      var / 50_000))
  assert float(jnp.var(out)) == pytest.approx(var, rel=0.03)


def test_clipped_denoiser_stays_consistent():
  """x0_hat clipped to [-1, 1], and eps_hat recomputed so that x_t =
  sqrt(ab) x0_hat + sqrt(1 - ab) eps_hat still holds."""
  settings = diffusion.Settings(objective="eps")
  network = lambda x, time: -30.0 * jnp.ones_like(x)  # x0_hat above 1.
  x = jnp.full((2, 1, 1, 1), 0.5)
  for t in (10, 500):
    ab = float(settings.alpha_bars()[t])
    x0, eps = diffusion.make_denoise_fn(network, settings, clip=True)(x, t)
    np.testing.assert_allclose(x0, 1.0)
    np.testing.assert_allclose(math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps,
                               x, atol=1e-5)
    x0, eps = diffusion.make_denoise_fn(network, settings, clip=False)(x, t)
    np.testing.assert_allclose(eps, -30.0)
    assert float(x0[0, 0, 0, 0]) > 1


def test_ddim_timesteps_trailing():
  np.testing.assert_array_equal(samplers.ddim_timesteps(1000, 10),
                                [999, 899, 799, 699, 599, 499, 399, 299, 199,
                                 99, -1])
  assert len(samplers.ddim_timesteps(1000, 1000)) == 1001
  with pytest.raises(ValueError, match="1..1000"):
    samplers.ddim_timesteps(1000, 0)


@pytest.mark.parametrize("num_steps", [1, 3, 10])
def test_euler_is_exact_on_straight_paths(num_steps):
  """The velocity of a point mass at MU, (MU - x) / (1 - t), moves every
  point along a straight line at constant speed: Euler lands on MU exactly."""
  x = jax.random.normal(jax.random.key(0), (16, 2, 2, 1))
  out = samplers.euler_sample(lambda x, t: (MU - x) / (1 - t), x, num_steps)
  np.testing.assert_allclose(out, MU, atol=1e-5)


def test_euler_and_heun_have_orders_one_and_two():
  """On dx/dt = x (solution x e^t), halving the step halves Euler's error
  and quarters Heun's."""
  x = jnp.ones((1, 1, 1, 1))
  error = lambda solver, n: abs(float(solver(lambda x, t: x, x, n)[0, 0, 0, 0])
                                - math.e)
  euler = error(samplers.euler_sample, 20) / error(samplers.euler_sample, 40)
  heun = error(samplers.heun_sample, 20) / error(samplers.heun_sample, 40)
  assert euler == pytest.approx(2.0, abs=0.1)
  assert heun == pytest.approx(4.0, abs=0.2)


def test_heun_ends_with_an_euler_step_and_never_evaluates_t_1():
  """EDM's Heun: on dx/dt = x with 2 steps, a Heun step (1 + h + h^2 / 2)
  then an Euler step (1 + h): 1.625 x 1.5. A velocity that is NaN at t = 1
  (a flow model's unpredictable end) leaves the samples finite."""
  x = jnp.ones((1, 1, 1, 1))
  out = samplers.heun_sample(lambda x, t: x, x, 2)
  assert float(out[0, 0, 0, 0]) == pytest.approx(1.625 * 1.5, rel=1e-6)
  nan_at_1 = lambda x, t: jnp.where(t >= 1.0, jnp.nan, -x)
  assert np.isfinite(jax.jit(lambda x: samplers.heun_sample(
      nan_at_1, x, 5))(x)).all()


# --- The network and guidance ---------------------------------------------------

def test_cifar10_full_config_is_ddpms_network():
  config = config_lib.load_config_file(
      os.path.join(REPO, "experiments", "ddpm.py:cifar10,full"))
  model = diffusion.make_model(config, 0)
  assert (model.channels, tuple(model.multipliers), model.num_res_blocks,
          tuple(model.attention_resolutions), model.dropout_rate) == (
              128, (1, 2, 2, 2), 2, (16,), 0.1)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,))))
  assert _num_params(shapes) == 35_746_307  # DDPM's 35.7M.


def test_unet_shapes_and_zero_output_at_init():
  model = unet.UNet(8, (1, 2), 1, (14,), 0.0, num_classes=10)
  x = jax.random.normal(jax.random.key(0), (2, 28, 28, 1))
  variables = jax.jit(model.init)(jax.random.key(1), x, jnp.zeros((2,)),
                                  jnp.zeros((2,), jnp.int32))
  out = jax.jit(model.apply)(variables, x, jnp.array([3.0, 500.0]),
                             jnp.array([1, 10]))
  assert out.shape == (2, 28, 28, 1) and out.dtype == jnp.float32
  np.testing.assert_array_equal(out, 0.0)  # Zero-initialised output conv.
  assert variables["params"]["Embed_0"]["embedding"].shape == (11, 32)


def _group_norm_np(x_BHWC, groups, scale, bias, eps=1e-6):
  b, h, w, c = x_BHWC.shape
  g = x_BHWC.reshape(b, h * w, groups, c // groups)
  mean = g.mean(axis=(1, 3), keepdims=True)
  var = ((g - mean) ** 2).mean(axis=(1, 3), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(x_BHWC.shape) * scale + (
      bias)


def test_attention_block_against_numpy():
  """The UNet's attention block with random weights (its zero-initialised
  output layer included) equals x + out(softmax(q k^T / sqrt(C)) v) in
  float64 numpy, with q, k, v = Dense(GroupNorm(x)) over the H * W
  positions and GroupNorm's min(32, C // 4) groups. Scores are large enough
  (|q.k| / sqrt(C) up to about 10) that a missing or doubled scale, or
  softmax over the queries, changes the result."""
  b, h, w, c = 2, 3, 4, 8
  block = unet.AttentionBlock()
  x = jax.random.normal(jax.random.key(0), (b, h, w, c))
  variables = block.init(jax.random.key(1), x)
  leaves, treedef = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  variables = jax.tree.unflatten(treedef, [
      0.5 * jax.random.normal(k, leaf.shape) + (0.8 if leaf.ndim == 1
                                                 else 0.0)
      for k, leaf in zip(keys, leaves)])
  got = jax.jit(block.apply)(variables, x)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  xn = np.asarray(x, np.float64)
  gn = p["GroupNorm_0"]
  y = _group_norm_np(xn, 2, gn["scale"], gn["bias"]).reshape(b, h * w, c)
  q, k, v = (y @ p[n]["kernel"] + p[n]["bias"]
             for n in ("query", "key", "value"))
  logits = q @ k.transpose(0, 2, 1) / np.sqrt(c)
  assert 4 < np.abs(logits).max() < 30
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  out = (weights @ v) @ p["out"]["kernel"] + p["out"]["bias"]
  want = xn + out.reshape(b, h, w, c)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert np.abs(out).max() > 1.0  # The attention path is not negligible.


def test_timestep_embedding():
  emb = unet.timestep_embedding(jnp.array([0.0, 10.0]), 8)
  np.testing.assert_allclose(emb[0], [0, 0, 0, 0, 1, 1, 1, 1], atol=1e-7)
  freqs = 10000.0 ** (-np.arange(4) / 3)
  np.testing.assert_allclose(emb[1], np.concatenate(
      [np.sin(10 * freqs), np.cos(10 * freqs)]), rtol=1e-5, atol=1e-6)


def _perturbed(params, key):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(tree, [
      p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def test_guidance_scale_zero_is_unconditional_and_one_conditional():
  model = unet.UNet(8, (1, 2), 1, (), 0.0, num_classes=10)
  x = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))
  time, labels = jnp.array([5.0, 50.0, 500.0, 900.0]), jnp.array([0, 3, 7, 9])
  params = _perturbed(model.init(jax.random.key(1), x, time, labels)[
      "params"], jax.random.key(2))  # Non-zero outputs.
  apply = lambda labels: jax.jit(model.apply)({"params": params}, x, time,
                                              labels)
  unlabelled, labelled = apply(jnp.full((4,), 10)), apply(labels)
  assert float(jnp.max(jnp.abs(labelled - unlabelled))) > 1e-2
  guided = lambda s: jax.jit(diffusion.guided_network(
      model.apply, params, labels, 10, s))(x, time)
  np.testing.assert_allclose(guided(0.0), unlabelled, atol=1e-5)
  np.testing.assert_allclose(guided(1.0), labelled, atol=1e-5)
  np.testing.assert_allclose(guided(3.0), unlabelled + 3 * (
      labelled - unlabelled), atol=1e-4)


def test_label_dropout_rate():
  labels = jnp.arange(100_000) % 10
  dropped = diffusion.drop_labels(labels, 10, 0.1, jax.random.key(0))
  assert float(jnp.mean(dropped == 10)) == pytest.approx(0.1, abs=0.005)
  kept = dropped != 10
  np.testing.assert_array_equal(dropped[kept], labels[kept])


# --- Training -------------------------------------------------------------------

@pytest.mark.parametrize("experiment", ["ddpm.py", "flow_cond.py"])
def test_tiny_model_loss_falls_and_ema_follows(idx_dir, experiment):
  config = tiny_config(idx_dir, experiment, **MINI_UNET,
                       **{"optimizer.learning_rate": 3e-3,
                          "diffusion.ema_decay": 0.9})
  mesh = parallel.make_mesh(1)
  state = train.init_state(config, mesh, jax.random.key(0), 200)
  step = train.compile_train_step(config, mesh)
  rng = np.random.default_rng(0)
  # A fixed batch of smooth images (a brightness ramp per example).
  ramp = np.linspace(0, 1, 28)[None, :, None, None] * rng.uniform(
      0.2, 1, (16, 1, 1, 1)) * np.ones((16, 28, 28, 1))
  batch = {"image": parallel.shard_host_array((255 * ramp).astype(np.uint8),
                                              mesh),
           "label": parallel.shard_host_array(
               (np.arange(16) % 10).astype(np.int32), mesh)}
  key = parallel.replicate(jax.random.key(1), mesh)
  losses = []
  for i in range(40):
    if i == 39:  # A host copy: the step donates its input state.
      ema_before = jax.device_get(state.ema_params)
    state, metrics = step(state, batch, key)
    losses.append(float(metrics["loss"]))
  assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5]), losses
  # The EMA update of the last step (index 39): decay min(0.9, 40 / 49).
  decay = 40 / 49
  assert float(metrics["ema_decay"]) == pytest.approx(decay, rel=1e-6)
  expected = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p,
                          ema_before, state.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-7),
               expected, state.ema_params)


@pytest.mark.parametrize("experiment", ["ddpm_cond.py", "flow_cond.py"])
def test_one_and_eight_devices_agree(tmp_path, idx_dir, experiment):
  """The same 4 steps on 1 and 8 devices: same losses, gradient norms and
  parameters (a norm per leaf), same evaluation. Labels dropped half the
  time and random flips on, so that per-device label dropout or flips would
  show too."""
  configs = {n: tiny_config(idx_dir, experiment, **MINI_UNET,
                            **{"mesh.num_devices": n, "num_steps": 4,
                               "log_every": 1, "diffusion.label_dropout": 0.5,
                               "data.random_flip": True}) for n in (1, 8)}
  runs = train_runs(tmp_path, configs)
  # Parameters relative, with a floor for leaves at rounding level (biases
  # behind zero-initialised layers: norms of 1e-10 after 4 steps).
  assert_runs_agree(runs[1], runs[8], ("loss", "grad_norm"), rtol=1e-4,
                    params_rtol=1e-4, params_floor=1e-4)


def test_stopped_and_resumed_equals_uninterrupted(tmp_path, idx_dir):
  config = tiny_config(idx_dir, "flow.py", **MINI_UNET,
                       **{"mesh.num_devices": 2})
  straight, _ = train.train_and_evaluate(config, str(tmp_path / "a"))
  # Stopped between checkpoints (every 3): the stop writes its own.
  train.train_and_evaluate(config, str(tmp_path / "b"), stop_at_step=4)
  resumed, _ = train.train_and_evaluate(config, str(tmp_path / "b"))
  for a, b in ((straight.params, resumed.params),
               (straight.ema_params, resumed.ema_params),
               (straight.opt_state, resumed.opt_state)):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a),
                 jax.device_get(b))


def test_bad_sampler_for_objective_is_refused(idx_dir):
  # In a config: refused when it is loaded (tests/test_config_validation.py).
  with pytest.raises(config_lib.ConfigError, match="diffusion.sampler='ddim':"
                     " the 'flow' objective samples with one of"):
    tiny_config(idx_dir, "flow.py", **{"diffusion.sampler": "ddim"})
  # At sampling time (genimg sample --sampler).
  with pytest.raises(ValueError, match="does not fit objective 'flow'"):
    diffusion.sampler_options(tiny_config(idx_dir, "flow.py"),
                              sampler="ddim")
  config = tiny_config(idx_dir, "ddpm.py")
  with pytest.raises(ValueError, match="needs a class-conditional model"):
    diffusion.sampler_options(config, guidance_scale=2.0)
  with pytest.raises(ValueError, match="steps must be >= 1"):
    diffusion.sampler_options(config, steps=0)
  assert diffusion.sampler_options(config, steps=7, sampler="ddim") == (
      diffusion.SamplerOptions("ddim", 7, 0.0, 1.0, True))


def test_evaluation_under_load(tmp_path, idx_dir):
  """The documented reproducibility of evaluation (docs/multihost.md): on
  one CPU device the metrics are bit-identical with two busy processes
  beside it; on several CPU devices of one process they may differ with
  load, within 1e-4 relative (measured: 1.4e-5 for an 80-step flow run)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  config = tiny_config(idx_dir, "flow.py", **MINI_UNET, eval_samples=64,
                       eval_batch_size=32)
  source = train.data.load_split(config.data, "test")
  results = {}
  for devices in (1, 2):
    mesh = parallel.make_mesh(devices)
    state = train.init_state(config, mesh, jax.random.key(0), 1)
    evaluator = diffusion.make_evaluator(config, mesh, source,
                                         str(tmp_path / str(devices)))
    for load in (0, 2, 0):
      busy = [subprocess.Popen([sys.executable, "-c", "while 1: pass"])
              for _ in range(load)]
      try:
        results[devices, load] = evaluator(state, 1)
      finally:
        for proc in busy:
          proc.kill()
  assert results[1, 0] == results[1, 2]
  for name, value in results[1, 0].items():
    assert results[2, 2][name] == pytest.approx(value, rel=1e-4), name
