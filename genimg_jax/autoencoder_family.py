"""The autoencoder family: a KL autoencoder trained as latent diffusion's
first stage, so that the latent pipeline runs without outside weights.

The network is `nets.autoencoder_kl.AutoencoderKL` (diffusers' SD VAE, here
with config.autoencoder's small widths). Images are scaled to [-1, 1]; the
encoder gives q(z|x) = N(mean, diag(exp(logvar))), z = mean + exp(logvar / 2)
eps is drawn from an explicit key, and the loss per image is LDM's without
LPIPS:

  rec = sum over pixels of |x - x_rec| ("l1") or (x - x_rec)^2 ("l2")
  + kl_weight * KL(q(z|x) || N(0, I)) summed over the latent's elements,

averaged over the batch (LDM's kl_weight: 1e-6).

With autoencoder.disc_weight > 0, LDM's (taming-transformers')
`LPIPSWithDiscriminator` adversarial terms are added, with a PatchGAN
discriminator D (`nets.patch_discriminator.NLayerDiscriminator`) on patch
logits; from step disc_start on (disc_factor f = 1, before it 0):

  autoencoder: rec + kl_weight * KL + f * lambda * g_loss,
      g_loss = -mean(D(x_rec)) (taming's, for either disc_loss),
      lambda = disc_weight * clip(||d mean(rec) / d W|| /
               (||d g_loss / d W|| + 1e-4), 0, 1e4), held constant, with W
               the decoder's conv_out kernel (taming's adaptive weight; its
               nll is the reconstruction term only, without the KL);
  D: f * 0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(sg(x_rec)))))
      ("hinge"; "vanilla": softplus(-D(x)) and softplus(D(sg(x_rec)))).

Both networks are updated in one step from one forward pass of the
autoencoder (see `train_step`). `export` writes the trained network for
`autoencoder.load` with its scaling factor, 1 / std of sampled latents of a
training batch (LDM's `scale_by_std`); the discriminator is not exported.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from genimg_jax import autoencoder, classifier, data, images as images_lib
from genimg_jax import gan, optim, parallel
from genimg_jax.nets.autoencoder_kl import AutoencoderKL
from genimg_jax.nets.patch_discriminator import NLayerDiscriminator

LOSSES = ("l1", "l2")
# autoencoder.disc_loss -> the GAN family's discriminator loss of that name.
DISC_LOSSES = {"hinge": "hinge", "vanilla": "non_saturating"}
ADAPTIVE_EPS, ADAPTIVE_MAX = 1e-4, 1e4  # taming's calculate_adaptive_weight.


@dataclasses.dataclass(frozen=True)
class Settings:
  loss: str = "l1"
  kl_weight: float = 1e-6
  random_flip: bool = False  # Training images mirrored (data.random_flip).
  disc_weight: float = 0.0  # 0: no discriminator.
  disc_start: int = 0  # The step from which the adversarial terms count.
  disc_loss: str = "hinge"


class AutoencoderState(classifier.TrainState):
  """The autoencoder's TrainState plus the discriminator's (params,
  optimizer state, BatchNorm statistics): the state when
  autoencoder.disc_weight > 0 (without a discriminator the state is a
  plain `classifier.TrainState`, as before it existed)."""
  disc: Any = None


def settings_from_config(config) -> Settings:
  a = config.autoencoder
  if a.loss not in LOSSES:
    raise ValueError(f"Unknown autoencoder.loss {a.loss!r}; choose from "
                     f"{LOSSES}.")
  disc_loss = a.get("disc_loss", "hinge")
  if disc_loss not in DISC_LOSSES:
    raise ValueError(f"Unknown autoencoder.disc_loss {disc_loss!r}; choose "
                     f"from {tuple(DISC_LOSSES)}.")
  return Settings(a.loss, a.kl_weight, config.data.get("random_flip", False),
                  float(a.get("disc_weight", 0.0)),
                  int(a.get("disc_start", 0)), disc_loss)


def make_model(config, scaling_factor: float = 1.0) -> AutoencoderKL:
  """The config's AutoencoderKL for data.image_shape's channels."""
  a, channels = config.autoencoder, config.data.image_shape[2]
  return AutoencoderKL(
      in_channels=channels, out_channels=channels,
      block_out_channels=tuple(a.block_out_channels),
      layers_per_block=a.layers_per_block, latent_channels=a.latent_channels,
      norm_num_groups=a.norm_num_groups, scaling_factor=scaling_factor,
      shift_factor=None, mid_block_add_attention=a.mid_block_attention)


def make_discriminator(config) -> NLayerDiscriminator:
  """The config's patch discriminator (autoencoder.disc_channels,
  disc_layers)."""
  a = config.autoencoder
  return NLayerDiscriminator(channels=a.get("disc_channels", 64),
                             num_layers=a.get("disc_layers", 3))


def create_train_state(config, rng, num_steps) -> classifier.TrainState:
  """Fresh state: a `classifier.TrainState`, or with
  autoencoder.disc_weight > 0 an `AutoencoderState` whose `disc` is the
  discriminator's TrainState (the same optimizer config as the
  autoencoder's). rng: the autoencoder's initial parameters; the
  discriminator's come from rng folded with 1."""
  model = make_model(config)
  params = model.init(rng, jnp.zeros((1, *config.data.image_shape)))["params"]
  tx = optim.make_optimizer(config.optimizer, num_steps)
  if not config.autoencoder.get("disc_weight", 0.0):
    return classifier.TrainState.create(
        apply_fn=model.apply, params=params, batch_stats={}, tx=tx)
  disc = make_discriminator(config)
  d_vars = disc.init(jax.random.fold_in(rng, 1),
                     jnp.zeros((2, *config.data.image_shape)))
  d_state = classifier.TrainState.create(
      apply_fn=disc.apply, params=d_vars["params"],
      batch_stats=d_vars["batch_stats"],
      tx=optim.make_optimizer(config.optimizer, num_steps))
  return AutoencoderState.create(apply_fn=model.apply, params=params,
                                 batch_stats={}, tx=tx, disc=d_state)


def to_model_range(image_uint8):
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return image_uint8.astype(jnp.float32) / 127.5 - 1.0


def kl_to_standard_normal(mean, logvar) -> jax.Array:
  """KL(N(mean, exp(logvar)) || N(0, I)) per example [B], summed over every
  latent element (diffusers' and LDM's `DiagonalGaussianDistribution.kl`)."""
  terms = jnp.exp(logvar) + mean ** 2 - 1.0 - logvar
  return 0.5 * jnp.sum(terms.reshape(terms.shape[0], -1), axis=-1)


def reconstruction_error(loss: str, x, x_rec) -> jax.Array:
  """Per example [B]: the sum over pixels of |x - x_rec| or its square."""
  diff = x_rec - x
  err = jnp.abs(diff) if loss == "l1" else diff ** 2
  return jnp.sum(err.reshape(err.shape[0], -1), axis=-1)


def disc_factor(step, disc_start: int) -> jax.Array:
  """taming's `adopt_weight`: 1.0 from step `disc_start` on, else 0.0."""
  return jnp.where(step >= disc_start, 1.0, 0.0)


def adaptive_weight(rec_grad_W, g_grad_W, disc_weight: float) -> jax.Array:
  """taming's `calculate_adaptive_weight`: disc_weight * clip(||rec_grad||
  / (||g_grad|| + 1e-4), 0, 1e4), gradients of the reconstruction and of
  the generator loss w.r.t. the last layer's kernel W; no gradient flows
  through it."""
  ratio = jnp.linalg.norm(rec_grad_W) / (jnp.linalg.norm(g_grad_W)
                                         + ADAPTIVE_EPS)
  return disc_weight * jax.lax.stop_gradient(
      jnp.clip(ratio, 0.0, ADAPTIVE_MAX))


def last_layer(params_or_grads):
  """The decoder's final conv kernel [3, 3, C, channels] ("last_layer" of
  taming's adaptive weight)."""
  return params_or_grads["decoder"]["conv_out"]["kernel"]


def discriminator_loss(kind: str, logits_real, logits_fake) -> jax.Array:
  """0.5 * (mean over patches and examples of the real term + of the fake
  term), taming's d_loss; kind "hinge" or "vanilla"."""
  return 0.5 * jnp.mean(gan.discriminator_loss(DISC_LOSSES[kind], logits_real,
                                               logits_fake))


def step_inputs(state, batch, rng, settings: Settings):
  """(x, z_rng): the batch's images, flipped (settings.random_flip; rng
  folded with the step) and scaled to [-1, 1], [B, H, W, C] float32, and
  the key of the posterior sample z."""
  rng = jax.random.fold_in(rng, state.step)
  images = batch["image"]
  if settings.random_flip:
    images = data.random_flip(images, rng)
  return to_model_range(images), jax.random.fold_in(rng, 0)


def reconstruction_loss_fn(apply_fn, x, z_rng, settings: Settings):
  """params -> (mean over the batch of rec + kl_weight * KL, (x_rec, rec
  [B], kl [B])): the autoencoder's loss without the discriminator."""

  def loss_fn(params):
    x_rec, mean, logvar = apply_fn({"params": params}, x, z_rng)
    rec = reconstruction_error(settings.loss, x, x_rec)
    kl = kl_to_standard_normal(mean, logvar)
    return jnp.mean(rec + settings.kl_weight * kl), (x_rec, rec, kl)

  return loss_fn


def reconstruction_metrics(x, x_rec, rec, kl) -> dict:
  """Batch means of rec and kl (per image), l1 and mse (per pixel in
  [-1, 1])."""
  return {"rec": jnp.mean(rec), "kl": jnp.mean(kl),
          "l1": jnp.mean(jnp.abs(x_rec - x)),
          "mse": jnp.mean((x_rec - x) ** 2)}


def train_step(state, batch, rng, *, settings: Settings):
  """One step on the mean per-image loss (module docstring).

  rng (folded with the step): z's draw and, with settings.random_flip, the
  flips (`data.random_flip`); the discriminator draws nothing. Metrics:
  loss, rec (the reconstruction term per image), kl (nats per image), l1
  and mse per pixel in [-1, 1], grad_norm, param_norm (after the update);
  with the discriminator (settings.disc_weight > 0, `adversarial_step`)
  also g_loss, disc_weight, disc_factor, disc_loss, logits_real,
  logits_fake, disc_grad_norm.
  """
  if settings.disc_weight > 0:
    return adversarial_step(state, batch, rng, settings=settings)
  x, z_rng = step_inputs(state, batch, rng, settings)
  (loss, (x_rec, rec, kl)), grads = jax.value_and_grad(
      reconstruction_loss_fn(state.apply_fn, x, z_rng, settings),
      has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads)
  return state, {"loss": loss, **reconstruction_metrics(x, x_rec, rec, kl),
                 "grad_norm": optax.tree.norm(grads),
                 "param_norm": optax.tree.norm(state.params)}


def adversarial_step(state: AutoencoderState, batch, rng, *,
                     settings: Settings):
  """`train_step` with the discriminator (module docstring): one forward
  pass of the autoencoder; the gradients of rec + kl_weight * KL (g_rec)
  and of g_loss (g_adv) w.r.t. its parameters, lambda from their
  decoder conv_out leaves, the update with g_rec + f * lambda * g_adv; the
  discriminator's update with the gradient of f * d_loss on the same x and
  x_rec (stop-gradient), from its parameters before this step.

  taming (PyTorch Lightning's loop over two optimizers) updates the
  autoencoder first and then draws a new reconstruction with it for the
  discriminator's step; here both updates start from the same forward, as
  one simultaneous step. D runs in training mode everywhere (BatchNorm on
  the batch's statistics); its running averages are updated by the real,
  then the fake pass of its own loss, not by the generator's pass. rng:
  as `train_step` (z's draw, flips).
  """
  x, z_rng = step_inputs(state, batch, rng, settings)
  d = state.disc
  rec_loss_fn = reconstruction_loss_fn(state.apply_fn, x, z_rng, settings)

  def d_logits(params, batch_stats, images):
    """D in training mode: (logits [B, h, w, 1], updated batch_stats)."""
    logits, new = d.apply_fn({"params": params, "batch_stats": batch_stats},
                             images, train=True, mutable=["batch_stats"])
    return logits, new["batch_stats"]

  def g_loss_fn(params):
    x_rec, _, _ = state.apply_fn({"params": params}, x, z_rng)
    logits_fake, _ = d_logits(d.params, d.batch_stats, x_rec)
    return jnp.mean(gan.generator_loss("hinge", logits_fake))

  (rec_loss, (x_rec, rec, kl)), rec_grads = jax.value_and_grad(
      rec_loss_fn, has_aux=True)(state.params)
  g_loss, g_grads = jax.value_and_grad(g_loss_fn)(state.params)
  factor = disc_factor(state.step, settings.disc_start)
  # The KL does not reach the decoder: last_layer(rec_grads) is the
  # gradient of the reconstruction term alone (taming's nll_loss).
  lam = adaptive_weight(last_layer(rec_grads), last_layer(g_grads),
                        settings.disc_weight)
  grads = jax.tree.map(lambda a, b: a + (factor * lam) * b, rec_grads,
                       g_grads)

  fake = jax.lax.stop_gradient(x_rec)

  def d_loss_fn(params):
    logits_real, stats = d_logits(params, d.batch_stats, x)
    logits_fake, stats = d_logits(params, stats, fake)
    loss = factor * discriminator_loss(settings.disc_loss, logits_real,
                                       logits_fake)
    return loss, (stats, logits_real, logits_fake)

  (d_loss, (d_stats, logits_real, logits_fake)), d_grads = (
      jax.value_and_grad(d_loss_fn, has_aux=True)(d.params))
  new_d = d.apply_gradients(grads=d_grads, batch_stats=d_stats)
  state = state.apply_gradients(grads=grads, disc=new_d)
  return state, {"loss": rec_loss + factor * lam * g_loss,
                 **reconstruction_metrics(x, x_rec, rec, kl),
                 "grad_norm": optax.tree.norm(grads),
                 "param_norm": optax.tree.norm(state.params),
                 "g_loss": g_loss, "disc_weight": lam, "disc_factor": factor,
                 "disc_loss": d_loss, "logits_real": jnp.mean(logits_real),
                 "logits_fake": jnp.mean(logits_fake),
                 "disc_grad_norm": optax.tree.norm(d_grads)}


def bind_train_step(config, mesh=None):
  """The autoencoder step with the config's static settings bound."""
  del mesh  # Every intermediate follows the sharded batch.
  return functools.partial(train_step, settings=settings_from_config(config))


def eval_step(state, batch):
  """Sums over the real (mask 1) examples of the reconstruction of the
  posterior mean: abs and squared error over pixels (in [-1, 1]), KL, and
  the count of examples."""
  x = to_model_range(batch["image"])
  variables = {"params": state.params}
  mean, logvar = state.apply_fn(variables, x, method="encode")
  x_rec = state.apply_fn(variables, mean, method="decode")
  mask = batch["mask"]
  per = lambda e: jnp.sum(e.reshape(e.shape[0], -1), axis=-1)
  return {"abs": jnp.sum(per(jnp.abs(x_rec - x)) * mask),
          "sq": jnp.sum(per((x_rec - x) ** 2) * mask),
          "kl": jnp.sum(kl_to_standard_normal(mean, logvar) * mask),
          "count": jnp.sum(mask)}


def make_reconstructor(config, mesh):
  """jit of (params, images uint8 [b, H, W, C]) -> reconstructions of the
  posterior means in [-1, 1]; images sharded on "data"."""
  model = make_model(config)
  repl, batch = parallel.replicated(mesh), parallel.data_sharding(mesh)

  def reconstruct(params, images):
    variables = {"params": params}
    mean, _ = model.apply(variables, to_model_range(images), method="encode")
    return model.apply(variables, mean, method="decode")
  return jax.jit(reconstruct, in_shardings=(repl, batch), out_shardings=batch,
                 compiler_options=parallel.compiler_options(config, mesh))


def make_evaluator(config, mesh, eval_source, workdir):
  """evaluator(state, step) -> l1 and mse per pixel (in [-1, 1]), psnr (dB,
  of the split's mse, peak-to-peak 2) and kl (nats per image) of the
  reconstructions of the posterior means over the eval split; writes
  samples/recon_STEP.png (32 originals, each beside its reconstruction).
  Every process runs every sharded call; process 0 writes."""
  repl, batch_sharding = (parallel.replicated(mesh),
                          parallel.data_sharding(mesh))
  step_fn = jax.jit(eval_step, in_shardings=(repl, batch_sharding),
                    out_shardings=repl,
                    compiler_options=parallel.compiler_options(config, mesh))
  reconstruct = make_reconstructor(config, mesh)
  originals = eval_source.take(np.arange(32) % len(eval_source))["image"]
  dims = math.prod(config.data.image_shape)
  sample_dir = os.path.join(workdir, "samples")

  def evaluator(state, step):
    sums = data.sum_over_split(step_fn, state, eval_source,
                               config.eval_batch_size, mesh)
    count = float(sums["count"])
    mse = float(sums["sq"]) / (count * dims)
    metrics = {"l1": float(sums["abs"]) / (count * dims), "mse": mse,
               "psnr": 10.0 * math.log10(4.0 / max(mse, 1e-12)),
               "kl": float(sums["kl"]) / count}
    recon = images_lib.to_uint8(parallel.map_batches(
        functools.partial(reconstruct, state.params), (originals,), mesh))
    grid = np.stack([originals, recon], 1).reshape(-1, *recon.shape[1:])
    images_lib.save_grids(sample_dir, {"recon": (grid, 8)}, step)
    return metrics
  return evaluator


def scaling_factor(config, mesh, params, train_source) -> tuple[float, int]:
  """(1 / std of z, the number of images): z = mean + exp(logvar / 2) eps
  over every element of the latents of the first training batch of the run
  (config.batch_size images, the seed's order), eps from
  numpy default_rng(config.seed): LDM's `scale_by_std` (there, the first
  batch of the run)."""
  n = min(config.batch_size, len(train_source))
  indices = np.sort(data.global_batch_indices(len(train_source), n,
                                              config.seed, 0))
  images = train_source.take(indices)["image"]
  model = make_model(config)
  repl, batch = parallel.replicated(mesh), parallel.data_sharding(mesh)
  encode = jax.jit(lambda p, x: model.apply({"params": p}, to_model_range(x),
                                            method="encode"),
                   in_shardings=(repl, batch), out_shardings=batch)
  mean, logvar = parallel.map_batches(functools.partial(encode, params),
                                      (images,), mesh)
  eps = np.random.default_rng(config.seed).standard_normal(mean.shape)
  z = np.asarray(mean, np.float64) + np.exp(0.5 * np.asarray(
      logvar, np.float64)) * eps
  return float(1.0 / np.std(z)), n


def export(config, mesh, state, output: str, workdir: str) -> dict:
  """Writes the trained autoencoder as OUTPUT + OUTPUT.json (the format of
  `autoencoder.load`, with config.scaling_factor from `scaling_factor`).
  Every process computes; process 0 writes. Returns the .json's contents."""
  train_source = data.load_split(config.data, "train", workdir)
  factor, n = scaling_factor(config, mesh, state.params, train_source)
  model = make_model(config, factor)
  step = int(jax.device_get(state.step))
  extra = {"source": f"genimg autoencoder workdir {os.path.abspath(workdir)}",
           "step": step, "scaling_factor_images": n}
  params = jax.tree.map(parallel.to_host, state.params)
  if jax.process_index() == 0:
    return autoencoder.save(model, {"params": params}, output, **extra)
  return {"output": output, "scaling_factor": factor, **extra}
