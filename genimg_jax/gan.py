"""GANs: the DCGAN generator and discriminator, the usual losses, one step.

The networks are in `genimg_jax.nets.dcgan`.

`train_step(state, batch, rng, *, settings) -> (state, metrics)` does
`n_critic` discriminator updates, then one generator update, then the EMA of
the generator's parameters. Every draw comes from `rng` folded with the step:
fresh noise z for each discriminator update and for the generator update,
dropout masks, the WGAN-GP interpolation weights (U(0, 1) per example) and,
with config.data.random_flip, the left-right flips of the real images.
Real images are scaled to [-1, 1] on device; the generator ends in tanh.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from genimg_jax import classifier, data, images as images_lib, optim
from genimg_jax import parallel, quality
from genimg_jax.nets.dcgan import Discriminator, Generator  # pylint: disable=unused-import

LOSSES = ("non_saturating", "hinge", "least_squares", "wgan_gp")


def discriminator_loss(kind: str, real_logits, fake_logits) -> jax.Array:
  """Per-example discriminator loss [B] of GAN loss `kind` (not the GP)."""
  if kind == "non_saturating":
    return jax.nn.softplus(-real_logits) + jax.nn.softplus(fake_logits)
  if kind == "hinge":
    return jax.nn.relu(1.0 - real_logits) + jax.nn.relu(1.0 + fake_logits)
  if kind == "least_squares":
    return 0.5 * (real_logits - 1.0) ** 2 + 0.5 * fake_logits ** 2
  if kind == "wgan_gp":
    return fake_logits - real_logits
  raise ValueError(f"Unknown GAN loss {kind!r}; choose from {LOSSES}.")


def generator_loss(kind: str, fake_logits) -> jax.Array:
  """Per-example generator loss [B] of GAN loss `kind`."""
  if kind == "non_saturating":
    return jax.nn.softplus(-fake_logits)
  if kind in ("hinge", "wgan_gp"):
    return -fake_logits
  if kind == "least_squares":
    return 0.5 * (fake_logits - 1.0) ** 2
  raise ValueError(f"Unknown GAN loss {kind!r}; choose from {LOSSES}.")


def gradient_penalty(d_fn, real, fake, rng) -> jax.Array:
  """WGAN-GP: mean over examples of (||grad_x D(x_hat)||_2 - 1)^2.

  x_hat = eps * real + (1 - eps) * fake with eps ~ U(0, 1) per example.
  d_fn: images [B, H, W, C] -> logits [B]. rng: draws eps.
  """
  eps = jax.random.uniform(rng, (real.shape[0], 1, 1, 1))
  x_hat = eps * real + (1.0 - eps) * fake
  grads = jax.grad(lambda x: jnp.sum(d_fn(x)))(x_hat)
  norms = jnp.sqrt(jnp.sum(grads ** 2, axis=(1, 2, 3)) + 1e-12)
  return jnp.mean((norms - 1.0) ** 2)


class GANState(flax.struct.PyTreeNode):
  """Both networks' TrainStates (params, optimizer state, batch_stats), the
  EMA of the generator's parameters, and the step."""
  step: jax.Array
  g: classifier.TrainState
  d: classifier.TrainState
  ema_params: Any


@dataclasses.dataclass(frozen=True)
class Settings:
  """The static choices of a GAN step (hashable, bound with partial)."""
  loss: str = "non_saturating"
  n_critic: int = 1
  gp_weight: float = 10.0
  ema_decay: float = 0.999
  z_dim: int = 100
  conditional: bool = False
  skip_nonfinite: bool = False
  noise_sharding: Any = None  # A NamedSharding for z [B, Z], or None.
  ema_warmup: bool = True  # See optim.ema_decay_at.
  random_flip: bool = False  # Real images mirrored (data.random_flip).


def settings_from_config(config: ml_collections.ConfigDict) -> Settings:
  gan = config.gan
  if gan.loss not in LOSSES:
    raise ValueError(f"Unknown gan.loss {gan.loss!r}; choose from {LOSSES}.")
  if gan.conditional and config.data.num_classes < 2:
    raise ValueError("gan.conditional needs a labelled data set "
                     f"(data.num_classes is {config.data.num_classes}).")
  return Settings(gan.loss, gan.n_critic, gan.gp_weight, gan.ema_decay,
                  gan.z_dim, gan.conditional, gan.skip_nonfinite,
                  ema_warmup=gan.get("ema_warmup", True),
                  random_flip=config.data.get("random_flip", False))


def make_models(config) -> tuple[Generator, Discriminator]:
  num_classes = config.data.num_classes if config.gan.conditional else 0
  dtype = jnp.dtype(config.model.dtype)
  return (Generator(tuple(config.data.image_shape), num_classes, dtype),
          Discriminator(num_classes, config.model.dropout_rate,
                        config.model.spectral_norm, dtype))


def create_train_state(config, rng: jax.Array, num_steps: int) -> GANState:
  """Fresh GAN state. rng: both networks' initial parameters. num_steps:
  the run's length, for learning-rate schedules that decay over it."""
  generator, discriminator = make_models(config)
  g_rng, d_rng = jax.random.split(rng)
  z = jnp.zeros((2, config.gan.z_dim))
  labels = jnp.zeros((2,), jnp.int32)
  g_vars = generator.init(g_rng, z, labels, train=False)
  d_vars = discriminator.init(
      {"params": d_rng}, jnp.zeros((2, *config.data.image_shape)), labels,
      train=False)

  def make(module, variables, opt):
    return classifier.TrainState.create(
        apply_fn=module.apply, params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        tx=optim.make_optimizer(opt, num_steps))

  g = make(generator, g_vars, config.optimizer.generator)
  return GANState(step=jnp.zeros((), jnp.int32), g=g,
                  d=make(discriminator, d_vars, config.optimizer.discriminator),
                  ema_params=g.params)


def generate(g: classifier.TrainState, params, z_BZ, labels_B,
             batch_stats=None) -> jax.Array:
  """Images in [-1, 1] [B, H, W, C] from the generator in inference mode.

  batch_stats: the BatchNorm statistics to use (default: the raw
  generator's running averages, which belong to `g.params` only).
  """
  stats = g.batch_stats if batch_stats is None else batch_stats
  return g.apply_fn({"params": params, "batch_stats": stats}, z_BZ, labels_B,
                    train=False)


def standing_batch_stats(generator: Generator, params, batch_stats, z_NBZ,
                         labels_NB) -> Any:
  """BatchNorm statistics that belong to `params` (BigGAN's "standing
  statistics"): the mean over N batches of each BatchNorm layer's batch mean
  and variance, with the generator in training mode.

  The EMA generator's weights never ran in training mode, so the raw
  generator's running statistics do not describe its activations.
  batch_stats: any statistics of the right structure (their values are not
  used). z: [N, B, Z] noise; labels: int32 [N, B] (ignored if unconditional).
  """
  standing = generator.clone(bn_momentum=0.0)  # Running stats := batch's.

  def one_batch(_, z_and_labels):
    z, labels = z_and_labels
    _, new = standing.apply({"params": params, "batch_stats": batch_stats},
                            z, labels, train=True, mutable=["batch_stats"])
    return None, new["batch_stats"]

  _, stats = jax.lax.scan(one_batch, None, (z_NBZ, labels_NB))
  return jax.tree.map(lambda x: jnp.mean(x, axis=0), stats)


def _noise(rng, shape, settings: Settings) -> jax.Array:
  """z ~ N(0, I) of `shape`, sharded like the batch when a sharding is set."""
  z = jax.random.normal(rng, shape)
  if settings.noise_sharding is not None:
    z = jax.lax.with_sharding_constraint(z, settings.noise_sharding)
  return z


def _where_finite(ok, new, old):
  return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


def critic_batches(x_B, n_critic: int, sharding=None) -> jax.Array:
  """[B, ...] -> [n_critic, B / n_critic, ...]: part i is rows i, i + n,
  i + 2n, ..., so with the batch sharded on "data" every part stays spread
  over all devices (a contiguous slice would live on a subset of them).
  sharding: a NamedSharding of the batch; the parts are constrained to it
  (XLA's propagation alone may replicate them)."""
  if n_critic == 1:
    return x_B[None]
  x = x_B.reshape(x_B.shape[0] // n_critic, n_critic, *x_B.shape[1:])
  x = jnp.swapaxes(x, 0, 1)
  if sharding is not None:
    x = jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(
        sharding.mesh, jax.sharding.PartitionSpec(None, *sharding.spec)))
  return x


def train_step(state: GANState, batch: dict, rng: jax.Array, *,
               settings: Settings) -> tuple[GANState, dict]:
  """n_critic discriminator updates, one generator update, the EMA update.

  batch: image uint8 [B, H, W, C], label int32 [B]. With n_critic > 1 the
  real batch is split into n_critic parts of B / n_critic (see
  `critic_batches`), one per critic update; the generator update uses
  B / n_critic samples. Discriminator metrics are means over the critic
  updates.
  rng: folded with state.step, then per update into z, dropout (one mask for
  the real pass, another for the fake pass) and gradient-penalty keys, and,
  with settings.random_flip, the flips of the real images
  (`data.random_flip`, over the whole batch before it is split).
  Metrics add ema_decay, the decay of this step's EMA update.
  """
  rng = jax.random.fold_in(rng, state.step)
  images = batch["image"]
  if settings.random_flip:
    images = data.random_flip(images, rng)
  real_parts = critic_batches(
      classifier.to_float(images) * 2.0 - 1.0, settings.n_critic,
      settings.noise_sharding)
  label_parts = critic_batches(batch["label"], settings.n_critic,
                               settings.noise_sharding)
  kind = settings.loss
  g = state.g
  chunk = real_parts.shape[1]
  cond = lambda labels: labels if settings.conditional else None

  def g_apply(params, z, labels, batch_stats):
    return g.apply_fn({"params": params, "batch_stats": batch_stats}, z,
                      cond(labels), train=True, mutable=["batch_stats"])

  def d_apply(d, params, batch_stats, images, labels, dropout_rng,
              update_stats):
    return d.apply_fn({"params": params, "batch_stats": batch_stats}, images,
                      cond(labels), train=True, update_stats=update_stats,
                      rngs={"dropout": dropout_rng}, mutable=["batch_stats"])

  def critic_update(d, real, labels, key):
    z_rng, drop_real, drop_fake, drop_gp, gp_rng = jax.random.split(key, 5)
    z = _noise(z_rng, (chunk, settings.z_dim), settings)
    fake = jax.lax.stop_gradient(g_apply(g.params, z, labels,
                                         g.batch_stats)[0])

    def d_loss_fn(params):
      real_logits, stats = d_apply(d, params, d.batch_stats, real, labels,
                                   drop_real, True)
      fake_logits, stats = d_apply(d, params, stats["batch_stats"], fake,
                                   labels, drop_fake, True)
      loss = jnp.mean(discriminator_loss(kind, real_logits, fake_logits))
      gp = jnp.zeros(())
      if kind == "wgan_gp":
        gp = gradient_penalty(
            lambda x: d_apply(d, params, stats["batch_stats"], x, labels,
                              drop_gp, False)[0], real, fake, gp_rng)
        loss = loss + settings.gp_weight * gp
      return loss, (stats["batch_stats"], real_logits, fake_logits, gp)

    (d_loss, (d_stats, real_logits, fake_logits, gp)), d_grads = (
        jax.value_and_grad(d_loss_fn, has_aux=True)(d.params))
    d = d.apply_gradients(grads=d_grads, batch_stats=d_stats)
    return d, {"d_loss": d_loss, "d_real": jnp.mean(real_logits),
               "d_fake": jnp.mean(fake_logits), "gp": gp,
               "d_grad_norm": optax.tree.norm(d_grads)}

  # Unrolled (n_critic is small): as a lax.scan the WGAN-GP step (5 x 64)
  # took 8.5 s on 2 CPU devices against 3.2 s unrolled.
  d, per_critic = state.d, []
  for i in range(settings.n_critic):
    d, critic_metrics = critic_update(d, real_parts[i], label_parts[i],
                                      jax.random.fold_in(rng, i))
    per_critic.append(critic_metrics)
  metrics = jax.tree.map(lambda *values: jnp.mean(jnp.stack(values)),
                         *per_critic)

  # The generator update uses one part's worth of examples (and its labels).
  z_rng, drop_rng = jax.random.split(jax.random.fold_in(rng, settings.n_critic))
  z = _noise(z_rng, (chunk, settings.z_dim), settings)
  g_labels = label_parts[0]

  def g_loss_fn(params):
    fake, g_stats = g_apply(params, z, g_labels, g.batch_stats)
    fake_logits, _ = d_apply(d, d.params, d.batch_stats, fake, g_labels,
                             drop_rng, False)
    return jnp.mean(generator_loss(kind, fake_logits)), g_stats["batch_stats"]

  (g_loss, g_stats), g_grads = jax.value_and_grad(g_loss_fn, has_aux=True)(
      g.params)
  g = g.apply_gradients(grads=g_grads, batch_stats=g_stats)
  # The EMA, by default with a warm-up (early samples not dominated by the
  # init; see optim.ema_decay_at).
  decay = optim.ema_decay_at(state.step, settings.ema_decay,
                             settings.ema_warmup)
  ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p,
                     state.ema_params, g.params)
  metrics.update(g_loss=g_loss, g_grad_norm=optax.tree.norm(g_grads),
                 g_param_norm=optax.tree.norm(g.params),
                 d_param_norm=optax.tree.norm(d.params), ema_decay=decay)
  new_state = state.replace(step=state.step + 1, g=g, d=d, ema_params=ema)
  if settings.skip_nonfinite:
    ok = jnp.all(jnp.array([jnp.isfinite(v) for v in jax.tree.leaves(
        metrics)]))
    new_state = _where_finite(ok, new_state,
                              state.replace(step=state.step + 1))
    metrics = {k: jnp.where(ok, v, 0.0) for k, v in metrics.items()}
    metrics["skipped"] = 1.0 - ok.astype(jnp.float32)
  return new_state, metrics


def bind_train_step(config, mesh=None):
  """The GAN step with the config's static settings bound.

  With a mesh, the noise z is sharded like the batch, so the generator runs
  data parallel (left alone, XLA replicates it on every device).
  """
  settings = settings_from_config(config)
  if mesh is not None:
    settings = dataclasses.replace(
        settings, noise_sharding=parallel.data_sharding(mesh))
  if config.batch_size % settings.n_critic:
    raise ValueError(f"batch_size {config.batch_size} must be divisible by "
                     f"gan.n_critic {settings.n_critic}.")
  return functools.partial(train_step, settings=settings)


def make_sampler(config, mesh):
  """jit of generate(), compiled with the run's `parallel.compiler_options`:
  z [N, Z] and labels [N] sharded on "data"."""
  repl, batch = parallel.replicated(mesh), parallel.data_sharding(mesh)
  return jax.jit(generate, in_shardings=(repl, repl, batch, batch, repl),
                 out_shardings=batch,
                 compiler_options=parallel.compiler_options(config, mesh))


def make_ema_batch_stats(config, mesh, num_batches: int = 8,
                         batch_size: int = 256):
  """jit of (state, rng) -> standing BatchNorm statistics of the EMA
  generator over num_batches x batch_size fresh noise vectors (uniform labels
  for conditional models), each batch sharded over the mesh.
  rng: draws the noise and labels."""
  generator, _ = make_models(config)
  settings = settings_from_config(config)
  num_classes = max(config.data.num_classes, 1)  # 0: unlabelled data.
  spread = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(None, parallel.DATA_AXIS))
  batch_size = parallel.fit_to_devices(batch_size, mesh)

  def ema_batch_stats(state: GANState, rng):
    z_rng, label_rng = jax.random.split(rng)
    z = jax.lax.with_sharding_constraint(jax.random.normal(
        z_rng, (num_batches, batch_size, settings.z_dim)), spread)
    labels = jax.lax.with_sharding_constraint(jax.random.randint(
        label_rng, (num_batches, batch_size), 0, num_classes), spread)
    return standing_batch_stats(generator, state.ema_params,
                                state.g.batch_stats, z, labels)
  return jax.jit(ema_batch_stats, out_shardings=parallel.replicated(mesh),
                 compiler_options=parallel.compiler_options(config, mesh))


def sample_uint8(sampler, state: GANState, z_NZ, labels_N, mesh,
                 batch_stats, batch_size: int = 512):
  """uint8 images [N, H, W, C] from the EMA generator with `batch_stats`
  (from `make_ema_batch_stats`), in sharded batches."""
  images = parallel.map_batches(
      lambda z, labels: sampler(state.g, state.ema_params, z, labels,
                                batch_stats),
      (z_NZ, labels_N), mesh, batch_size)
  return images_lib.to_uint8(images)


def sample_images(config, mesh, state: GANState, labels_N: np.ndarray,
                  seed: int) -> np.ndarray:
  """uint8 samples [N, H, W, C] of the EMA generator with standing BatchNorm
  statistics, one per label (ignored if unconditional). seed: the noise and
  the statistics' noise."""
  z_rng, stats_rng = jax.random.split(jax.random.key(seed))
  stats = make_ema_batch_stats(config, mesh)(
      state, parallel.replicate(stats_rng, mesh))
  z = np.asarray(jax.random.normal(z_rng, (len(labels_N), config.gan.z_dim)))
  sampler = make_sampler(config, mesh)
  return sample_uint8(sampler, state, z, labels_N, mesh, stats)


def make_evaluator(config, mesh, eval_source, workdir):
  """evaluator(state, step) -> `quality.QualityMetrics`' metrics ("fid",
  "score" or "inception_score", ...); writes PNG grids.

  Samples come from the EMA generator with its own standing BatchNorm
  statistics, recomputed at every evaluation (`make_ema_batch_stats`).
  Every evaluation writes samples/step_N.png (64 samples from fixed noise),
  samples/interp_N.png (latent interpolations) and, for conditional models,
  samples/classes_N.png (one row per class). FID and score use
  config.eval_samples samples against the reference split
  (`quality.metrics_for_config`; 0: none).
  Every process runs every sampling call; only process 0 writes files.
  """
  settings = settings_from_config(config)
  sampler = make_sampler(config, mesh)
  ema_batch_stats = make_ema_batch_stats(config, mesh)
  fixed_z = np.asarray(jax.random.normal(jax.random.key(config.seed + 1),
                                         (64, settings.z_dim)))
  num_classes = max(config.data.num_classes, 1)  # 0: unlabelled data.
  fixed_labels = data.cycling_labels(64, config.data.num_classes)
  interp_z = np.asarray(images_lib.interpolation_latents(
      jax.random.key(config.seed + 2), 8, 10, settings.z_dim))
  class_z = np.repeat(fixed_z[:10][None], num_classes, 0).reshape(
      -1, settings.z_dim)
  class_labels = np.repeat(np.arange(num_classes, dtype=np.int32), 10)
  metric = quality.metrics_for_config(config, mesh, eval_source)
  sample_dir = os.path.join(workdir, "samples")
  stats_key = jax.random.key(config.seed + 4)

  def evaluator(state, step):
    stats = ema_batch_stats(state, parallel.replicate(
        jax.random.fold_in(stats_key, step), mesh))
    sample = lambda z, labels: sample_uint8(sampler, state, z, labels, mesh,
                                            stats)
    grids = {"step": (sample(fixed_z, fixed_labels), 8),
             "interp": (sample(interp_z, np.repeat(fixed_labels[:8], 10)),
                        10)}
    if settings.conditional:
      grids["classes"] = (sample(class_z, class_labels), 10)
    images_lib.save_grids(sample_dir, grids, step)
    if metric is None:
      return {}
    rng = jax.random.fold_in(jax.random.key(config.seed + 3), step)
    z = np.asarray(jax.random.normal(rng, (config.eval_samples,
                                           settings.z_dim)))
    labels = data.cycling_labels(config.eval_samples,
                                 config.data.num_classes)
    return metric.of_generator(
        lambda z, labels: sampler(state.g, state.ema_params, z, labels, stats),
        (z, labels))
  return evaluator
