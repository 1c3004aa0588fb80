"""Diffusion and flow matching: schedules, objectives, the train step, the
evaluator. The network is `unet.UNet` or, with config.model.name "dit",
`dit.DiT` (`make_model`); the samplers are in `samplers.py`.

Images are scaled to [-1, 1]. Objectives (config.diffusion.objective):
  "eps"  DDPM: x_t = sqrt(ab_t) x + sqrt(1 - ab_t) eps, t uniform in
         {0, ..., T-1}; the network predicts eps. Loss: mean squared error
         (DDPM's L_simple: uniform over t).
  "v"    the same x_t; the network predicts v = sqrt(ab_t) eps -
         sqrt(1 - ab_t) x (Salimans & Ho 2022). Its MSE is the eps MSE / ab_t
         = (1 + SNR_t) times the MSE of x0_hat.
  "flow" flow matching / rectified flow: x_t = t x + (1 - t) eps, t uniform
         in [0, 1] (t = 0 noise, t = 1 data); the network predicts the
         velocity x - eps. Its MSE is the MSE of x0_hat / (1 - t)^2.
Schedules of ab_t = alpha-bar (config.diffusion.schedule): "linear" (DDPM:
betas 1e-4 to 0.02 over T = 1000) and "cosine" (Nichol & Dhariwal 2021,
s = 0.008, betas clipped at 0.999). The network sees the time as t for
diffusion and 1000 t for flow matching (the same range).

With config.model.learn_sigma (DiT, eps objective) the network also
learns the variance of each reverse step, as Improved DDPM (Nichol &
Dhariwal 2021) and DiT: it outputs 2C channels, eps and v, and
log Sigma_t = frac log beta_t + (1 - frac) log beta~_t with frac = (v + 1)
/ 2. The loss is L_simple + VLB_WEIGHT L_vlb (`hybrid_loss_terms`), the
variational bound estimated as T L_t at the drawn t (`vlb.vlb_term_bits`)
with eps stopped from its gradient; the ddpm sampler takes the learned
variance, ddim reads the eps channels only.

Class-conditional models (config.diffusion.conditional) learn the "no label"
class num_classes too: each training label is replaced by it with
probability config.diffusion.label_dropout. Classifier-free guidance at
sampling with scale s: out = out(no label) + s (out(label) - out(no label));
s = 1 is the conditional model, s = 0 the unconditional one; s = 1 + w for
Ho & Salimans' guidance weight w (w = 0.3: s = 1.3).
The EMA of the parameters (state.ema_params) is what samples and evaluates.

Latent diffusion (config.diffusion.latents, `latents.py`): the batches hold
float32 posterior moments of a KL autoencoder instead of uint8 images; the
step trains on z = scaling_factor * (mean + exp(logvar / 2) eps), drawn
from the step's rng, the network sees the latent shape, and the samplers
run in latent space (no clipping) and decode on device to images in
[-1, 1] for grids, FID and `genimg sample`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from genimg_jax import config as config_lib, data, images as images_lib
from genimg_jax import latents as latents_lib, optim, parallel, quality
from genimg_jax import samplers, vlb
from genimg_jax.nets import dit, unet

OBJECTIVES = ("eps", "v", "flow")
SCHEDULES = ("linear", "cosine")
FLOW_TIME_SCALE = 1000.0  # The network's time input is 1000 t for flow.
# lambda of Improved DDPM's L_hybrid = L_simple + lambda L_vlb.
VLB_WEIGHT = 0.001


def linear_alpha_bars(num_timesteps: int = 1000, beta_start: float = 1e-4,
                      beta_end: float = 0.02) -> np.ndarray:
  """DDPM's schedule: ab_t = prod_{s <= t} (1 - beta_s), betas linear.
  [T] float64, t = 0 .. T-1."""
  betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
  return np.cumprod(1.0 - betas)


def cosine_alpha_bars(num_timesteps: int = 1000, s: float = 0.008,
                      max_beta: float = 0.999) -> np.ndarray:
  """Nichol & Dhariwal's: ab_t = f(t + 1) / f(0), f(u) = cos^2(pi/2
  (u / T + s) / (1 + s)), with each beta = 1 - ab_t / ab_{t-1} clipped at
  max_beta. [T] float64, t = 0 .. T-1."""
  f = lambda u: np.cos((u / num_timesteps + s) / (1 + s) * np.pi / 2) ** 2
  u = np.arange(num_timesteps + 1, dtype=np.float64)
  betas = np.minimum(1.0 - f(u[1:]) / f(u[:-1]), max_beta)
  return np.cumprod(1.0 - betas)


def alpha_bars_for(schedule: str, num_timesteps: int) -> np.ndarray:
  if schedule == "linear":
    return linear_alpha_bars(num_timesteps)
  if schedule == "cosine":
    return cosine_alpha_bars(num_timesteps)
  raise ValueError(f"Unknown diffusion.schedule {schedule!r}; choose from "
                   f"{SCHEDULES}.")


def bcast(v_B, x):
  """[B] -> [B, 1, 1, 1] (as many ones as x has trailing axes)."""
  return jnp.reshape(v_B, v_B.shape + (1,) * (x.ndim - v_B.ndim))


def noised_input(x0, noise, sqrt_ab_B, sqrt_one_minus_ab_B):
  """q(x_t | x_0) by reparameterisation: sqrt(ab) x0 + sqrt(1 - ab) noise.

  The square roots come from float64 tables (`Settings.sqrt_tables`): in
  float32, 1 - ab loses 3 of its digits near t = 0.
  """
  return (bcast(sqrt_ab_B, x0) * x0 +
          bcast(sqrt_one_minus_ab_B, x0) * noise)


def flow_input(x0, noise, t_B):
  """The straight path t x0 + (1 - t) noise (t = 0 noise, t = 1 data)."""
  t = bcast(t_B, x0)
  return t * x0 + (1.0 - t) * noise


def target(objective: str, x0, noise, sqrt_ab_B=None,
           sqrt_one_minus_ab_B=None):
  """What the network learns to predict: eps, v or the flow velocity."""
  if objective == "eps":
    return noise
  if objective == "v":
    return (bcast(sqrt_ab_B, x0) * noise -
            bcast(sqrt_one_minus_ab_B, x0) * x0)
  if objective == "flow":
    return x0 - noise
  raise ValueError(f"Unknown diffusion.objective {objective!r}; choose from "
                   f"{OBJECTIVES}.")


def x0_and_eps(objective: str, output, x_t, sqrt_ab, sqrt_one_minus_ab):
  """(x0_hat, eps_hat) from a diffusion network's output at x_t."""
  a, s = sqrt_ab, sqrt_one_minus_ab
  if objective == "eps":
    return (x_t - s * output) / a, output
  if objective == "v":
    return a * x_t - s * output, s * x_t + a * output
  raise ValueError(f"x0_and_eps is for 'eps' and 'v', not {objective!r}.")


@dataclasses.dataclass(frozen=True)
class Settings:
  """The static settings of the step and the samplers."""
  objective: str = "eps"
  schedule: str = "linear"
  num_timesteps: int = 1000
  num_classes: int = 0  # > 0: class-conditional.
  label_dropout: float = 0.1
  ema_decay: float = 0.9999
  ema_warmup: bool = True  # See optim.ema_decay_at.
  random_flip: bool = False  # Training images mirrored (data.random_flip).
  latent: bool = False  # Batches of latent moments (latents.py).
  scaling_factor: float = 1.0  # Latents only: z = scale (sample - shift).
  shift_factor: float = 0.0
  learn_sigma: bool = False  # 2C outputs: eps, then the variance's v.

  def alpha_bars(self) -> np.ndarray:
    return alpha_bars_for(self.schedule, self.num_timesteps)

  def sqrt_tables(self):
    """(sqrt(ab), sqrt(1 - ab)) [T] float32, computed in float64."""
    ab = self.alpha_bars()
    return (jnp.asarray(np.sqrt(ab), jnp.float32),
            jnp.asarray(np.sqrt(1.0 - ab), jnp.float32))


def settings_from_config(config) -> Settings:
  d = config.diffusion
  if d.objective not in OBJECTIVES:
    raise ValueError(f"Unknown diffusion.objective {d.objective!r}; choose "
                     f"from {OBJECTIVES}.")
  alpha_bars_for(d.schedule, 2)  # Checks the name.
  if d.conditional and config.data.num_classes < 2:
    raise ValueError("diffusion.conditional needs a labelled data set "
                     f"(data.num_classes is {config.data.num_classes}).")
  learn_sigma = config.model.get("learn_sigma", False)
  if learn_sigma and d.objective != "eps":
    raise config_lib.ConfigError(
        f"model.learn_sigma needs diffusion.objective 'eps', not "
        f"{d.objective!r}; set model.learn_sigma=false.")
  latent = {}
  if latents_lib.is_latent(config):
    meta = latents_lib.info(config)
    latent = {"latent": True, "scaling_factor": meta["scaling_factor"],
              "shift_factor": meta["shift_factor"]}
  return Settings(d.objective, d.schedule, d.num_timesteps,
                  config.data.num_classes if d.conditional else 0,
                  d.label_dropout, d.ema_decay,
                  # Configs saved before these fields: warm-up, no flips.
                  d.get("ema_warmup", True),
                  config.data.get("random_flip", False),
                  learn_sigma=learn_sigma, **latent)


def model_shape(config) -> tuple[int, int, int]:
  """(H, W, C) the network sees: data.image_shape, or the latents'."""
  if latents_lib.is_latent(config):
    return latents_lib.latent_shape(config)
  return tuple(config.data.image_shape)


def load_split(config, split: str, workdir: str | None = None):
  """The trainer's source of `split`: the images, or with
  config.diffusion.latents their latent moments (`latents.load_split`)."""
  if latents_lib.is_latent(config):
    return latents_lib.load_split(config, split)
  return data.load_split(config.data, split, workdir)


MODELS = ("unet", "dit")


def make_model(config, num_classes: int) -> unet.UNet | dit.DiT:
  """The network of config.model.name: "unet" (also for configs without
  the field) or "dit" (DiT; SiT with the flow objective)."""
  m = config.model
  name = m.get("name", "unet")
  if name == "unet":
    return unet.UNet(m.channels, tuple(m.multipliers), m.num_res_blocks,
                     tuple(m.attention_resolutions), m.dropout_rate,
                     num_classes, jnp.dtype(m.dtype),
                     remat=m.get("remat", "none"))
  if name == "dit":
    return dit.DiT(m.patch_size, m.hidden_size, m.depth, m.num_heads,
                   m.mlp_ratio, num_classes,
                   learn_sigma=m.get("learn_sigma", False),
                   dtype=jnp.dtype(m.dtype), remat=m.get("remat", "none"))
  raise config_lib.ConfigError(
      f"model.name {name!r} is not a diffusion network; choose from "
      f"{MODELS}.")


class TrainState(train_state.TrainState):
  """Parameters, optimizer state, step and the EMA of the parameters."""
  ema_params: Any = None


def create_train_state(config, rng, num_steps) -> TrainState:
  """Fresh state; the EMA starts at the initial parameters. rng: init."""
  settings = settings_from_config(config)
  model = make_model(config, settings.num_classes)
  params = model.init(rng, jnp.zeros((1, *model_shape(config))),
                      jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))["params"]
  return TrainState.create(apply_fn=model.apply, params=params,
                           ema_params=params,
                           tx=optim.make_optimizer(config.optimizer,
                                                   num_steps))


def to_model_range(image_uint8):
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return image_uint8.astype(jnp.float32) / 127.5 - 1.0


def clean_input(settings: Settings, images, rng, train: bool):
  """x0 for the network: uint8 images [B, H, W, C] -> [-1, 1] (mirrored
  at random with settings.random_flip in training), or latent moments ->
  `latents.draw_latents` (the flips' moments in training with
  random_flip). rng: the step's (folded with the step)."""
  flip = settings.random_flip and train
  if settings.latent:
    return latents_lib.draw_latents(images, rng, settings.scaling_factor,
                                    settings.shift_factor, flip)
  if flip:
    images = data.random_flip(images, rng)
  return to_model_range(images)


def training_example(settings: Settings, x0, rng):
  """(x_t, network time [B], target) for clean images x0 in [-1, 1].

  rng: split into the noise and the time draws.
  """
  noise_rng, time_rng = jax.random.split(rng)
  noise = jax.random.normal(noise_rng, x0.shape)
  batch = x0.shape[0]
  if settings.objective == "flow":
    t = jax.random.uniform(time_rng, (batch,))
    return (flow_input(x0, noise, t), t * FLOW_TIME_SCALE,
            target("flow", x0, noise))
  t = jax.random.randint(time_rng, (batch,), 0, settings.num_timesteps)
  sqrt_ab, sqrt_one_minus_ab = (table[t] for table in settings.sqrt_tables())
  return (noised_input(x0, noise, sqrt_ab, sqrt_one_minus_ab),
          t.astype(jnp.float32),
          target(settings.objective, x0, noise, sqrt_ab, sqrt_one_minus_ab))


def drop_labels(labels_B, num_classes: int, rate: float, rng):
  """Each label replaced by `num_classes` ("no label") with prob. `rate`."""
  drop = jax.random.bernoulli(rng, rate, labels_B.shape)
  return jnp.where(drop, num_classes, labels_B)


def hybrid_loss_terms(settings: Settings, output, target_, x0, x_t, time_B):
  """(mse [B], vlb [B]) of a learn_sigma network's output [B, H, W, 2C]:
  the mean squared error of its eps channels (L_simple) and L_t of the
  variational bound in bits per dimension (`vlb.vlb_term_bits`), computed
  with eps stopped from the gradient, so that L_vlb trains the variance
  channels only (guided-diffusion's frozen mean). The loss is mse +
  VLB_WEIGHT T vlb (T L_t estimates L_vlb; at T = 1000 it is DiT's
  mse + vlb). time_B: the network's time, the step t as float."""
  eps_hat, var_values = jnp.split(output, 2, axis=-1)
  mse = jnp.mean((eps_hat - target_) ** 2, axis=(1, 2, 3))
  t = time_B.astype(jnp.int32)
  sqrt_ab, sqrt_one_minus_ab = (bcast(table[t], x0)
                                for table in settings.sqrt_tables())
  x0_hat, _ = x0_and_eps("eps", jax.lax.stop_gradient(eps_hat), x_t, sqrt_ab,
                         sqrt_one_minus_ab)
  return mse, vlb.vlb_term_bits(x0, x_t, x0_hat, (var_values + 1.0) / 2.0, t,
                                settings.alpha_bars())


def train_step(state: TrainState, batch, rng, *, settings: Settings):
  """One step on the mean squared error of the objective's target (with
  settings.learn_sigma, `hybrid_loss_terms`: metrics mse and vlb too).

  rng (folded with the step): the noise, the times, the label dropout, the
  network's dropout and, with settings.random_flip, the flips
  (`data.random_flip`), and for latents the posterior draws
  (`latents.draw_latents`). Metrics: loss, grad_norm, param_norm (after the
  update), ema_decay (the decay of this step's EMA update).
  """
  rng = jax.random.fold_in(rng, state.step)
  example_rng, label_rng, dropout_rng = jax.random.split(rng, 3)
  x0 = clean_input(settings, batch["image"], rng, train=True)
  x_t, time, target_ = training_example(settings, x0, example_rng)
  labels = None
  if settings.num_classes:
    labels = drop_labels(batch["label"], settings.num_classes,
                         settings.label_dropout, label_rng)

  def loss_fn(params):
    output = state.apply_fn({"params": params}, x_t, time, labels, train=True,
                            rngs={"dropout": dropout_rng})
    if not settings.learn_sigma:
      return jnp.mean((output - target_) ** 2), {}
    mse, vb = hybrid_loss_terms(settings, output, target_, x0, x_t, time)
    mse, vb = jnp.mean(mse), jnp.mean(vb)
    return mse + VLB_WEIGHT * settings.num_timesteps * vb, {"mse": mse,
                                                            "vlb": vb}

  (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  new_state = state.apply_gradients(grads=grads)
  decay = optim.ema_decay_at(state.step, settings.ema_decay,
                             settings.ema_warmup)
  ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p,
                     state.ema_params, new_state.params)
  return new_state.replace(ema_params=ema), {
      "loss": loss, "grad_norm": optax.tree.norm(grads),
      "param_norm": optax.tree.norm(new_state.params), "ema_decay": decay,
      **terms}


def bind_train_step(config, mesh=None):
  """The diffusion step with the config's static settings bound."""
  del mesh  # Every intermediate follows the sharded batch.
  return functools.partial(train_step, settings=settings_from_config(config))


def guided_network(apply_fn, params, labels_B, num_classes: int,
                   guidance_scale: float, learn_sigma: bool = False):
  """network(x_t, time_B) -> output, with classifier-free guidance.

  Unconditional models (num_classes 0) ignore labels. With scale 1 the
  conditional output alone; otherwise one call on [x_t; x_t] with [labels;
  no label]: out_u + s (out_c - out_u); with learn_sigma only for the eps
  channels, the variance channels the conditional output's (DiT's
  `forward_with_cfg`).
  """
  variables = {"params": params}
  if not num_classes:
    return lambda x, time: apply_fn(variables, x, time, None)
  if guidance_scale == 1.0:
    return lambda x, time: apply_fn(variables, x, time, labels_B)
  unlabelled = jnp.full_like(labels_B, num_classes)

  def network(x, time):
    both = apply_fn(variables, jnp.concatenate([x, x]),
                    jnp.concatenate([time, time]),
                    jnp.concatenate([labels_B, unlabelled]))
    conditional, unconditional = jnp.split(both, 2)
    guided = unconditional + guidance_scale * (conditional - unconditional)
    if learn_sigma:
      channels = x.shape[-1]
      guided = jnp.concatenate([guided[..., :channels],
                                conditional[..., channels:]], axis=-1)
    return guided
  return network


def make_denoise_fn(network, settings: Settings, clip: bool = True,
                    learned_variance: bool = False):
  """denoise_fn(x_t, t) -> (x0_hat, eps_hat) for the DDPM/DDIM samplers; t is
  a scalar int step. clip: x0_hat clipped to [-1, 1] and eps_hat recomputed
  from it (so a DDIM step stays consistent). A settings.learn_sigma network's
  variance channels are dropped, or with learned_variance returned third
  as frac = (v + 1) / 2 (ddpm_sample's "learned" variance)."""
  sqrt_ab_table, sqrt_one_minus_ab_table = settings.sqrt_tables()

  def denoise_fn(x, t):
    time = jnp.full((x.shape[0],), t, jnp.float32)
    a, s = sqrt_ab_table[t], sqrt_one_minus_ab_table[t]
    output = network(x, time)
    if settings.learn_sigma:
      output, var_values = jnp.split(output, 2, axis=-1)
    x0, eps = x0_and_eps(settings.objective, output, x, a, s)
    if clip:
      x0 = jnp.clip(x0, -1.0, 1.0)
      eps = (x - a * x0) / s
    if learned_variance:
      return x0, eps, (var_values + 1.0) / 2.0
    return x0, eps
  return denoise_fn


def make_velocity_fn(network):
  """velocity_fn(x_t, t) -> v for a flow-matching network; t in [0, 1]."""
  return lambda x, t: network(
      x, jnp.full((x.shape[0],), t * FLOW_TIME_SCALE, jnp.float32))


@dataclasses.dataclass(frozen=True)
class SamplerOptions:
  """sampler: ddpm or ddim (eps, v); euler or heun (flow). steps: ddim,
  euler, heun (ddpm always takes T). eta: ddim's noise. guidance_scale: s
  of `guided_network` (s = 1 + w, Ho & Salimans' w). clip: x0_hat clipped
  to [-1, 1] and eps_hat recomputed from it (ddpm, ddim). ddpm_variance:
  "fixedsmall" or "fixedlarge" (`samplers.ddpm_tables`). ddim_spacing: the
  timestep table (`samplers.ddim_timesteps`)."""
  sampler: str = "ddim"
  steps: int = 50
  eta: float = 0.0
  guidance_scale: float = 1.0
  clip: bool = True
  ddpm_variance: str = "fixedsmall"
  ddim_spacing: str = "trailing"


def sampler_options(config, **overrides) -> SamplerOptions:
  """The config's sampler settings (diffusion.sampler, sample_steps, eta,
  guidance_scale, clip_denoised, ddpm_variance, ddim_spacing; the last two
  default to fixedsmall and trailing for configs saved without them) with
  `overrides` (SamplerOptions fields; None keeps the config's). Raises
  ConfigError for settings that cannot run, and for explicit `steps` with
  the ddpm sampler, which always takes num_timesteps."""
  d = config.diffusion
  options = SamplerOptions(d.sampler, d.sample_steps, d.eta,
                           d.guidance_scale, d.clip_denoised,
                           d.get("ddpm_variance", "fixedsmall"),
                           d.get("ddim_spacing", "trailing"))
  overrides = {k: v for k, v in overrides.items() if v is not None}
  options = dataclasses.replace(options, **overrides)
  allowed = (samplers.FLOW_SAMPLERS if d.objective == "flow"
             else samplers.DIFFUSION_SAMPLERS)
  if options.sampler not in allowed:
    raise ValueError(f"Sampler {options.sampler!r} does not fit objective "
                     f"{d.objective!r}; choose from {allowed}.")
  if options.steps < 1:
    raise ValueError(f"Sampler steps must be >= 1, got {options.steps}.")
  if (options.sampler == "ddpm" and "steps" in overrides
      and overrides["steps"] != d.num_timesteps):
    raise config_lib.ConfigError(
        f"--steps {overrides['steps']}: the ddpm sampler always takes all "
        f"{d.num_timesteps} steps (diffusion.num_timesteps); use --sampler "
        "ddim for fewer.")
  if options.ddpm_variance not in samplers.DDPM_VARIANCES:
    raise config_lib.ConfigError(
        f"diffusion.ddpm_variance {options.ddpm_variance!r}: choose from "
        f"{samplers.DDPM_VARIANCES}.")
  if options.ddim_spacing not in samplers.DDIM_SPACINGS:
    raise config_lib.ConfigError(
        f"diffusion.ddim_spacing {options.ddim_spacing!r}: choose from "
        f"{samplers.DDIM_SPACINGS}.")
  if options.guidance_scale != 1.0 and not d.conditional:
    raise ValueError("Classifier-free guidance needs a class-conditional "
                     "model (experiments/ddpm_cond.py, flow_cond.py); this "
                     "one is unconditional.")
  return options


def generate(params, noise_BHWC, labels_B, rng, *, apply_fn,
             settings: Settings, options: SamplerOptions):
  """Images in [-1, 1] [B, H, W, C] from noise [B, H, W, C] (and labels [B]
  if conditional); latents (not clipped) for latent models. rng: the
  ddpm/ddim(eta > 0) noise."""
  clip = (lambda x: x) if settings.latent else (
      lambda x: jnp.clip(x, -1.0, 1.0))
  network = guided_network(apply_fn, params, labels_B, settings.num_classes,
                           options.guidance_scale, settings.learn_sigma)
  if settings.objective == "flow":
    solver = {"euler": samplers.euler_sample,
              "heun": samplers.heun_sample}[options.sampler]
    x = solver(make_velocity_fn(network), noise_BHWC, options.steps)
    return clip(x)
  denoise_fn = make_denoise_fn(network, settings, options.clip)
  alpha_bars = settings.alpha_bars()
  if options.sampler == "ddpm" and settings.learn_sigma:
    x = samplers.ddpm_sample(
        make_denoise_fn(network, settings, options.clip, True), alpha_bars,
        noise_BHWC, rng, samplers.LEARNED)
  elif options.sampler == "ddpm":
    x = samplers.ddpm_sample(denoise_fn, alpha_bars, noise_BHWC, rng,
                             options.ddpm_variance)
  else:
    x = samplers.ddim_sample(
        denoise_fn, alpha_bars, noise_BHWC,
        samplers.ddim_timesteps(settings.num_timesteps, options.steps,
                                options.ddim_spacing),
        options.eta, rng)
  return clip(x)


def make_sampler(config, mesh, options: SamplerOptions):
  """jit of (params, noise, labels, rng) -> images in [-1, 1]; noise and
  labels sharded on "data", params and rng replicated. For latent models
  the noise is latent-shaped and the samples are decoded in the same
  program (`latents.make_decoder`; the autoencoder's variables replicated
  once, passed as an argument)."""
  settings = settings_from_config(config)
  model = make_model(config, settings.num_classes)
  repl, batch = parallel.replicated(mesh), parallel.data_sharding(mesh)
  sample = functools.partial(generate, apply_fn=model.apply,
                             settings=settings, options=options)
  options_ = parallel.compiler_options(config, mesh)
  if not settings.latent:
    return jax.jit(sample, in_shardings=(repl, batch, batch, repl),
                   out_shardings=batch, compiler_options=options_)
  ae_model, ae_variables = latents_lib.load_autoencoder(config)
  decode, ae_variables = latents_lib.make_decoder(
      ae_model, ae_variables, mesh, settings.scaling_factor,
      settings.shift_factor)
  sample_and_decode = jax.jit(
      lambda ae, params, noise, labels, rng: decode(
          ae, sample(params, noise, labels, rng)),
      in_shardings=(repl, repl, batch, batch, repl), out_shardings=batch,
      compiler_options=options_)
  return functools.partial(sample_and_decode, ae_variables)


def batch_sampler(sampler, params, rng, mesh):
  """(noise, labels) -> images in [-1, 1] on device; the i-th call (batch
  i) draws its sampler noise from fold_in(rng, i)."""
  counter = itertools.count()
  return lambda noise, labels: sampler(params, noise, labels,
                                       parallel.replicate(jax.random.fold_in(
                                           rng, next(counter)), mesh))


def sample_uint8(sampler, params, noise_NHWC, labels_N, rng, mesh,
                 batch_size: int = 512) -> np.ndarray:
  """uint8 images [N, H, W, C] in sharded batches (see `batch_sampler`)."""
  images = parallel.map_batches(batch_sampler(sampler, params, rng, mesh),
                                (noise_NHWC, labels_N), mesh, batch_size)
  return images_lib.to_uint8(images)


def sample_images(config, mesh, state, labels_N: np.ndarray, seed: int,
                  batch_size: int = 512, **sampler_overrides) -> np.ndarray:
  """uint8 samples [N, H, W, C] of the EMA model, one per label (ignored if
  unconditional); seed: the initial noise and the sampler's noise."""
  options = sampler_options(config, **sampler_overrides)
  noise_rng, sampler_rng = jax.random.split(jax.random.key(seed))
  noise = np.asarray(jax.random.normal(
      noise_rng, (len(labels_N), *model_shape(config))))
  return sample_uint8(make_sampler(config, mesh, options), state.ema_params,
                      noise, labels_N, sampler_rng, mesh, batch_size)


def eval_step(state, batch, rng, *, settings: Settings):
  """Sums over real (mask 1) test examples of the EMA network's loss
  (labels kept; the training loss, `hybrid_loss_terms` with learn_sigma)
  and the count. rng: noise and times, and for latents the posterior
  draws."""
  x0 = clean_input(settings, batch["image"], rng, train=False)
  x_t, time, target_ = training_example(settings, x0, rng)
  labels = batch["label"] if settings.num_classes else None
  output = state.apply_fn({"params": state.ema_params}, x_t, time, labels)
  if settings.learn_sigma:
    mse, vb = hybrid_loss_terms(settings, output, target_, x0, x_t, time)
    per_example = mse + VLB_WEIGHT * settings.num_timesteps * vb
  else:
    per_example = jnp.mean((output - target_) ** 2, axis=(1, 2, 3))
  mask = batch["mask"]
  return {"loss": jnp.sum(per_example * mask), "count": jnp.sum(mask)}


def make_evaluator(config, mesh, eval_source, workdir):
  """evaluator(state, step) -> test loss of the EMA network and, with
  config.eval_samples > 0, FID and score of its samples (the configured
  sampler); writes samples/step_N.png (64 samples from fixed noise) and, for
  conditional models, samples/classes_N.png (a row per class). The test
  loss's noise (seed + 7) and the FID samples' (seed + 3) are folded with
  `step`. Every process runs every sharded call; process 0 writes files."""
  settings = settings_from_config(config)
  options = sampler_options(config)
  sampler = make_sampler(config, mesh, options)
  repl, batch_sharding = (parallel.replicated(mesh),
                          parallel.data_sharding(mesh))
  loss_fn = jax.jit(functools.partial(eval_step, settings=settings),
                    in_shardings=(repl, batch_sharding, repl),
                    out_shardings=repl,
                    compiler_options=parallel.compiler_options(config, mesh))
  # FID's reference: the split's images (not the latents of eval_source).
  metric = quality.metrics_for_config(
      config, mesh, data.load_split(config.data, config.data.eval_split,
                                    workdir)
      if settings.latent and config.eval_samples else eval_source)
  shape = model_shape(config)
  num_classes = max(config.data.num_classes, 1)
  fixed_noise = np.asarray(jax.random.normal(jax.random.key(config.seed + 1),
                                             (64, *shape)))
  fixed_labels = data.cycling_labels(64, config.data.num_classes)
  class_noise = np.repeat(fixed_noise[None, :10], num_classes, 0).reshape(
      -1, *shape)
  class_labels = np.repeat(np.arange(num_classes, dtype=np.int32), 10)
  sample_dir = os.path.join(workdir, "samples")
  loss_key, sample_key = jax.random.key(config.seed + 7), jax.random.key(
      config.seed + 3)

  def evaluator(state, step):
    step_key = jax.random.fold_in(loss_key, step)
    batch_rngs = (parallel.replicate(jax.random.fold_in(step_key, i), mesh)
                  for i in itertools.count())
    sums = data.sum_over_split(lambda s, b: loss_fn(s, b, next(batch_rngs)),
                               state, eval_source, config.eval_batch_size,
                               mesh)
    metrics = {"loss": float(sums["loss"] / sums["count"])}
    sample = lambda noise, labels, rng: sample_uint8(
        sampler, state.ema_params, noise, labels, rng, mesh,
        config.eval_batch_size)
    grid_rng = jax.random.key(config.seed + 2)
    grids = {"step": (sample(fixed_noise, fixed_labels, grid_rng), 8)}
    if settings.num_classes:
      grids["classes"] = (sample(class_noise, class_labels, grid_rng), 10)
    images_lib.save_grids(sample_dir, grids, step)
    if metric is not None:
      noise_rng, sampler_rng = jax.random.split(
          jax.random.fold_in(sample_key, step))
      noise = np.asarray(jax.random.normal(
          noise_rng, (config.eval_samples, *shape)))
      labels = data.cycling_labels(config.eval_samples,
                                   config.data.num_classes)
      metrics.update(metric.of_generator(
          batch_sampler(sampler, state.ema_params, sampler_rng, mesh),
          (noise, labels), config.eval_batch_size))
    return metrics
  return evaluator

