"""VAEs: MLP and convolutional, beta-VAE, class-conditional; ELBO and IWAE.

The encoder gives the mean and log-variance of q(z|x) = N(mu, diag(exp(lv))),
z is drawn by reparameterisation from an explicit key, and the loss is the
negative ELBO: -log p(x|z) + beta * KL(q(z|x) || N(0, I)) with the KL in
closed form. Likelihoods:
  "bernoulli": dynamically binarized pixels (a fresh Bernoulli(x / 255) draw
      each time an image is used, from an explicit key); decoder logits.
  "logistic": a discretized logistic over the 256 pixel values (PixelCNN++
      style, one component); decoder means and log-scales; bits per dim.
All log-likelihoods are in nats per image unless named bits_per_dim.
The networks are in `genimg_jax.nets` (`nets.mlp_vae`, `nets.conv_vae`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from genimg_jax import classifier, data, images as images_lib, optim
from genimg_jax import parallel, quality
from genimg_jax.nets.conv_vae import VAE, ConvDecoder, ConvEncoder  # pylint: disable=unused-import
from genimg_jax.nets.mlp_vae import MLPDecoder, MLPEncoder  # pylint: disable=unused-import

LIKELIHOODS = ("bernoulli", "logistic")


def kl_to_standard_normal(mean_BZ, logvar_BZ) -> jax.Array:
  """KL(N(mean, exp(logvar)) || N(0, I)) per example [B], closed form."""
  return 0.5 * jnp.sum(jnp.exp(logvar_BZ) + mean_BZ ** 2 - 1.0 - logvar_BZ,
                       axis=-1)


def gaussian_log_prob(z, mean, logvar) -> jax.Array:
  """log N(z; mean, diag(exp(logvar))) summed over the last axis."""
  return -0.5 * jnp.sum(math.log(2 * math.pi) + logvar +
                        (z - mean) ** 2 * jnp.exp(-logvar), axis=-1)


def bernoulli_log_prob(x_bin, logits) -> jax.Array:
  """log p(x | logits) summed over pixels [B, ...] -> [B]; x in {0, 1}.

  x log sigmoid(l) + (1 - x) log sigmoid(-l) = x l - softplus(l): one
  transcendental per pixel instead of two.
  """
  ll = x_bin * logits - jax.nn.softplus(logits)
  return jnp.sum(ll.reshape(ll.shape[0], -1), axis=-1)


def discretized_logistic_log_prob(x_uint8, mean, log_scale) -> jax.Array:
  """log P(x) of 8-bit pixels under a logistic discretized to 256 bins.

  x: uint8 [B, H, W, C]; mean in [-1, 1] scale, log_scale: same shape.
  The edge bins take the tails (x = 0: (-inf, -1 + 1/255]; x = 255:
  [1 - 1/255, inf)). Returns [B], summed over pixels.
  """
  x = x_uint8.astype(jnp.float32) / 127.5 - 1.0
  inv_scale = jnp.exp(-log_scale)
  plus = inv_scale * (x - mean + 1.0 / 255.0)
  minus = inv_scale * (x - mean - 1.0 / 255.0)
  cdf_delta = jax.nn.sigmoid(plus) - jax.nn.sigmoid(minus)
  log_cdf_plus = plus - jax.nn.softplus(plus)          # log sigmoid(plus)
  log_one_minus_cdf_minus = -jax.nn.softplus(minus)    # log (1 - sigmoid)
  mid = inv_scale * (x - mean)
  # Where the bin is too narrow for the float difference, use the density.
  log_pdf_mid = mid - log_scale - 2.0 * jax.nn.softplus(mid) + math.log(
      2.0 / 255.0)
  inner = jnp.where(cdf_delta > 1e-5,
                    jnp.log(jnp.maximum(cdf_delta, 1e-12)), log_pdf_mid)
  ll = jnp.where(x_uint8 == 0, log_cdf_plus,
                 jnp.where(x_uint8 == 255, log_one_minus_cdf_minus, inner))
  return jnp.sum(ll.reshape(ll.shape[0], -1), axis=-1)


@dataclasses.dataclass(frozen=True)
class Settings:
  likelihood: str = "bernoulli"
  beta: float = 1.0
  conditional: bool = False
  random_flip: bool = False  # Training images mirrored (data.random_flip).


def settings_from_config(config) -> Settings:
  if config.vae.likelihood not in LIKELIHOODS:
    raise ValueError(f"Unknown vae.likelihood {config.vae.likelihood!r}; "
                     f"choose from {LIKELIHOODS}.")
  if config.vae.conditional and config.data.num_classes < 2:
    raise ValueError("vae.conditional needs a labelled data set "
                     f"(data.num_classes is {config.data.num_classes}).")
  return Settings(config.vae.likelihood, config.vae.beta,
                  config.vae.conditional,
                  # Configs saved before this field: no flips.
                  config.data.get("random_flip", False))


def make_model(config) -> VAE:
  return VAE(config.vae.architecture, config.vae.latent_dim,
             tuple(config.data.image_shape), config.vae.likelihood,
             config.data.num_classes if config.vae.conditional else 0,
             config.vae.hidden, jnp.dtype(config.model.dtype))


def create_train_state(config, rng, num_steps) -> classifier.TrainState:
  """Fresh VAE state. rng: parameter initialisation."""
  model = make_model(config)
  x = jnp.zeros((1, *config.data.image_shape))
  params = model.init(rng, x, jax.random.key(0),
                      jnp.zeros((1,), jnp.int32))["params"]
  return classifier.TrainState.create(
      apply_fn=model.apply, params=params, batch_stats={},
      tx=optim.make_optimizer(config.optimizer, num_steps))


def model_input(image_uint8, likelihood: str, rng) -> jax.Array:
  """What the encoder sees and the likelihood scores, on device.

  bernoulli: a fresh binarization, float {0, 1} (rng: the Bernoulli draws).
  logistic: the uint8 pixels themselves (scored as 8-bit values); the encoder
  gets them scaled to [0, 1].
  """
  x = classifier.to_float(image_uint8)
  if likelihood == "bernoulli":
    return jax.random.bernoulli(rng, x).astype(jnp.float32)
  return x


def log_likelihood(likelihood: str, image_uint8, x, outputs) -> jax.Array:
  """log p(x | z) [B] from the decoder outputs."""
  if likelihood == "bernoulli":
    return bernoulli_log_prob(x, outputs)
  mean, log_scale = jnp.split(outputs, 2, axis=-1)
  return discretized_logistic_log_prob(image_uint8, jnp.tanh(mean),
                                       jnp.maximum(log_scale, -7.0))


def elbo_terms(apply_fn, params, image_uint8, labels, rng, settings):
  """Per-example (log p(x|z), KL) [B] for one z ~ q(z|x).

  rng: split into the binarization draw and the reparameterisation draw.
  """
  bin_rng, z_rng = jax.random.split(rng)
  x = model_input(image_uint8, settings.likelihood, bin_rng)
  outputs, mean, logvar = apply_fn({"params": params}, x, z_rng, labels)
  return (log_likelihood(settings.likelihood, image_uint8, x, outputs),
          kl_to_standard_normal(mean, logvar))


def train_step(state, batch, rng, *, settings: Settings):
  """One step on the mean negative (beta-)ELBO. rng: binarization, z and,
  with settings.random_flip, the flips (`data.random_flip`).

  Metrics: loss (with beta), nelbo (beta = 1), recon (-log p(x|z)), kl, all
  in nats per image, bits_per_dim of the nelbo, grad_norm and param_norm (of
  the updated parameters, so an update that overflows them shows at once).
  """
  rng = jax.random.fold_in(rng, state.step)
  labels = batch["label"] if settings.conditional else None
  images = batch["image"]
  if settings.random_flip:
    images = data.random_flip(images, rng)

  def loss_fn(params):
    log_px, kl = elbo_terms(state.apply_fn, params, images, labels, rng,
                            settings)
    return jnp.mean(-log_px + settings.beta * kl), (log_px, kl)

  (loss, (log_px, kl)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  state = state.apply_gradients(grads=grads)
  nelbo = jnp.mean(kl - log_px)
  dims = math.prod(batch["image"].shape[1:])
  return state, {"loss": loss, "nelbo": nelbo, "recon": -jnp.mean(log_px),
                 "kl": jnp.mean(kl), "bits_per_dim": nelbo / (dims * math.log(2)),
                 "grad_norm": optax.tree.norm(grads),
                 "param_norm": optax.tree.norm(state.params)}


def bind_train_step(config, mesh=None):
  """The VAE step with the config's static settings bound."""
  del mesh  # Every intermediate follows the sharded batch.
  return functools.partial(train_step, settings=settings_from_config(config))


def log_mean_importance_weight(log_px_fn, mean_BZ, logvar_BZ, rng,
                               num_samples: int, chunk: int = 100
                               ) -> jax.Array:
  """log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x) [B], z_k ~ q = N(mean, exp(lv)).

  log_px_fn(z_kBZ) -> log p(x | z) [k, B]; p(z) = N(0, I). A lower bound on
  log p(x) that tightens as K grows; K = 1 is the single-sample ELBO. Samples
  are drawn `chunk` at a time: rng is split into K / chunk keys and key i
  gives the standard-normal eps [chunk, B, Z] of samples i*chunk..(i+1)*chunk-1.
  """
  chunk = min(chunk, num_samples)
  if num_samples % chunk:
    raise ValueError(f"num_samples {num_samples} must be a multiple of the "
                     f"chunk {chunk}.")

  def log_weights(key):
    eps = jax.random.normal(key, (chunk, *mean_BZ.shape))
    z = mean_BZ + jnp.exp(0.5 * logvar_BZ) * eps               # [k, B, Z]
    log_pz = gaussian_log_prob(z, 0.0, jnp.zeros_like(z))
    log_qz = gaussian_log_prob(z, mean_BZ, logvar_BZ)
    return log_px_fn(z) + log_pz - log_qz                      # [k, B]

  keys = jax.random.split(rng, num_samples // chunk)
  weights = jax.lax.map(log_weights, keys).reshape(num_samples, -1)
  return jax.scipy.special.logsumexp(weights, axis=0) - math.log(num_samples)


def importance_weighted_bound(apply_fn, params, image_uint8, labels, rng,
                              settings: Settings, num_samples: int,
                              chunk: int = 100, decode_samples: int = 1
                              ) -> jax.Array:
  """log (1/K) sum_k p(x, z_k) / q(z_k | x), z_k ~ q(z|x): [B] nats.

  The model's `log_mean_importance_weight`. rng: split into the binarization
  (one draw shared by all K samples) and the K latent draws. The decoder sees
  `decode_samples` x B latents at a time (`lax.map`'s batch_size); the draws
  are those of `chunk` either way. On CPU one sample at a time (B latents
  per device) is fastest: the working set stays in cache (2.9-4.6x faster
  than 10 x B at B = 100, docs/performance.md); a GPU may want more.
  """
  bin_rng, z_rng = jax.random.split(rng)
  x = model_input(image_uint8, settings.likelihood, bin_rng)
  variables = {"params": params}
  mean, logvar = apply_fn(variables, x, labels, method="encode")

  def log_px_one(z_BZ):
    outputs = apply_fn(variables, z_BZ, labels, method="decode")
    return log_likelihood(settings.likelihood, image_uint8, x, outputs)

  def log_px_fn(z_kBZ):
    return jax.lax.map(log_px_one, z_kBZ,
                       batch_size=decode_samples if decode_samples > 1
                       else None)

  return log_mean_importance_weight(log_px_fn, mean, logvar, z_rng,
                                    num_samples, chunk)


def eval_step(state, batch, rng, *, settings: Settings, iw_samples: int):
  """Sums over the real (mask 1) examples: nelbo, recon, kl, iwae, count.

  rng: z draws (the binarized test set is fixed by the evaluator).
  """
  labels = batch["label"] if settings.conditional else None
  mask = batch["mask"]
  elbo_rng, iw_rng = jax.random.split(rng)
  log_px, kl = elbo_terms(state.apply_fn, state.params, batch["image"], labels,
                          elbo_rng, settings)
  sums = {"nelbo": jnp.sum((kl - log_px) * mask),
          "recon": jnp.sum(-log_px * mask), "kl": jnp.sum(kl * mask),
          "count": jnp.sum(mask)}
  if iw_samples:
    bound = importance_weighted_bound(state.apply_fn, state.params,
                                      batch["image"], labels, iw_rng, settings,
                                      iw_samples)
    sums["iw_nll"] = jnp.sum(-bound * mask)
  return sums


def binarize_once(images_uint8: np.ndarray, seed: int = 0) -> np.ndarray:
  """A fixed stochastic binarization of an evaluation split, uint8 {0, 255}."""
  rng = np.random.default_rng(seed)
  return np.where(rng.random(images_uint8.shape) < images_uint8 / 255.0, 255,
                  0).astype(np.uint8)


def make_decoder(config, mesh):
  """decode(params, z [b, Z], labels [b]) -> the decoder's mean images in
  [0, 1] [b, H, W, C], jitted; z, labels and images sharded on "data"
  (labels unused if unconditional)."""
  settings = settings_from_config(config)
  model = make_model(config)
  repl, batch_sharding = (parallel.replicated(mesh),
                          parallel.data_sharding(mesh))

  def mean_image(outputs):
    if settings.likelihood == "bernoulli":
      return jax.nn.sigmoid(outputs)
    return (jnp.tanh(jnp.split(outputs, 2, -1)[0]) + 1.0) / 2.0

  @functools.partial(jax.jit, in_shardings=(repl, batch_sharding,
                                            batch_sharding),
                     out_shardings=batch_sharding,
                     compiler_options=parallel.compiler_options(config, mesh))
  def decode(params, z, labels):
    return mean_image(model.apply({"params": params}, z,
                                  labels if settings.conditional else None,
                                  method="decode"))

  return decode


def decode_uint8(decode, params, z_NZ, labels_N, mesh) -> np.ndarray:
  """uint8 images [N, H, W, C] of `make_decoder`'s decode, in sharded
  batches."""
  return images_lib.to_uint8(parallel.map_batches(
      functools.partial(decode, params), (z_NZ, labels_N), mesh), 0.0, 1.0)


def sample_images(config, mesh, state, labels_N: np.ndarray,
                  seed: int) -> np.ndarray:
  """uint8 prior samples [N, H, W, C] (decoder means), one per label
  (ignored if unconditional). seed: the latents."""
  z = np.asarray(jax.random.normal(jax.random.key(seed),
                                   (len(labels_N), config.vae.latent_dim)))
  return decode_uint8(make_decoder(config, mesh), state.params, z, labels_N,
                      mesh)


def make_eval_step(config, mesh):
  """`eval_step` with config.vae.iw_samples, jitted: state and rng
  replicated, batch sharded on "data", sums replicated."""
  repl, batch_sharding = (parallel.replicated(mesh),
                          parallel.data_sharding(mesh))
  return jax.jit(
      functools.partial(eval_step, settings=settings_from_config(config),
                        iw_samples=config.vae.iw_samples),
      in_shardings=(repl, batch_sharding, repl), out_shardings=repl,
      compiler_options=parallel.compiler_options(config, mesh))


def make_evaluator(config, mesh, eval_source, workdir):
  """evaluator(state, step) -> test nelbo, recon, kl, bits/dim, IWAE NLL
  (config.vae.iw_samples > 0), FID/score of prior samples
  (config.eval_samples > 0); writes reconstruction, prior-sample and
  interpolation grids to workdir/samples/. The z draws of the bounds
  (seed + 7) and of the FID samples (seed + 3) are folded with `step`."""
  settings = settings_from_config(config)
  all_examples = eval_source.take(np.arange(len(eval_source)))
  images = all_examples["image"]
  if settings.likelihood == "bernoulli":  # Scored on one fixed binarization.
    images = binarize_once(images, config.seed)
  source = data.ArraySource(images, all_examples["label"])
  step_fn = make_eval_step(config, mesh)
  eval_key = jax.random.key(config.seed + 7)
  model = make_model(config)
  dims = math.prod(config.data.image_shape)
  metric = quality.metrics_for_config(
      config, mesh, data.ArraySource(all_examples["image"],
                                     all_examples["label"]))

  decode = make_decoder(config, mesh)
  sample_uint8 = lambda params, z, labels: decode_uint8(decode, params, z,
                                                        labels, mesh)

  z_dim = config.vae.latent_dim
  prior_z = np.asarray(jax.random.normal(jax.random.key(config.seed + 1),
                                         (64, z_dim)))
  prior_labels = data.cycling_labels(64, config.data.num_classes)
  interp_z = np.asarray(images_lib.interpolation_latents(
      jax.random.key(config.seed + 2), 8, 10, z_dim))
  sample_dir = os.path.join(workdir, "samples")

  def evaluator(state, step):
    # Batch i draws its z from fold_in(fold_in(key, step), i): other noise at
    # every evaluation and in every batch, the same numbers in a resumed run.
    step_key = jax.random.fold_in(eval_key, step)
    batch_rngs = (parallel.replicate(jax.random.fold_in(step_key, i), mesh)
                  for i in itertools.count())
    sums = data.sum_over_split(lambda s, b: step_fn(s, b, next(batch_rngs)),
                               state, source, config.eval_batch_size, mesh)
    count = sums.pop("count")
    metrics = {k: float(v / count) for k, v in sums.items()}
    metrics["bits_per_dim"] = metrics["nelbo"] / (dims * math.log(2))
    if "iw_nll" in metrics:
      metrics["iw_bits_per_dim"] = metrics["iw_nll"] / (dims * math.log(2))
    # Every process samples (the calls are sharded over all hosts' devices);
    # only process 0 writes the grids.
    originals = source.take(np.arange(32) % len(source))  # Repeats if < 32.
    mean, _ = model.apply({"params": state.params},
                          classifier.to_float(originals["image"]),
                          originals["label"] if settings.conditional
                          else None, method="encode")
    recon = sample_uint8(state.params, parallel.to_host(mean),
                         originals["label"])
    grids = {
        "recon": (np.stack([originals["image"], recon], 1).reshape(
            -1, *recon.shape[1:]), 8),
        "prior": (sample_uint8(state.params, prior_z, prior_labels), 8),
        "interp": (sample_uint8(state.params, interp_z,
                                np.repeat(prior_labels[:8], 10)), 10)}
    images_lib.save_grids(sample_dir, grids, step)
    if metric is not None:
      z = np.asarray(jax.random.normal(
          jax.random.fold_in(jax.random.key(config.seed + 3), step),
          (config.eval_samples, z_dim)))
      labels = data.cycling_labels(config.eval_samples,
                                   config.data.num_classes)
      metrics.update(metric.of_generator(
          functools.partial(decode, state.params), (z, labels),
          value_range=(0.0, 1.0)))
    return metrics
  return evaluator
