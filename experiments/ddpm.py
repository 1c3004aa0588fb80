"""DDPM: the UNet predicts the noise (eps), linear schedule, T = 1000;
samples and FID by DDIM (50 steps, eta 0) from the EMA parameters.

  genimg train --config experiments/ddpm.py --workdir workdirs/ddpm
  genimg train --config experiments/ddpm.py:cifar10,full --workdir workdirs/ddpm_cifar10
  genimg train --config experiments/ddpm.py:celeb_a64,full --workdir workdirs/ddpm_celeba
  genimg sample --workdir workdirs/ddpm --num 64 --sampler ddim --steps 20 --output ddpm.png

v-prediction: --config.diffusion.objective=v; cosine schedule:
--config.diffusion.schedule=cosine. Class-conditional with classifier-free
guidance: experiments/ddpm_cond.py.

local (28 x 28): a 0.41M-parameter UNet (channels 16, multipliers (1, 2, 2),
attention at 7 x 7), batch 64, 2,000 steps, FID after 1,000 and 2,000 steps
by DDIM with 10 steps (measured on 2 CPU cores: about 1.2 s a step, and
10 minutes for the step-1,000 FID on the shared machine; see docs/diffusion.md).
full: DDPM's networks: on
CIFAR-10 35.7M parameters (channels 128, (1, 2, 2, 2), attention at 16 x 16,
dropout 0.1), batch 128, 800,000 steps, Adam 2e-4 after 5,000 steps of
linear warm-up, gradients clipped at norm 1, EMA 0.9999 from the first step,
random left-right flips on CIFAR-10 and CelebA (Ho et al. 2020, Appendix B).
local: EMA 0.999 with the warm-up of optim.ema_decay_at, no flips.
"""

import ml_collections

from experiments import common


def get_config(arg=""):
  dataset, variant = common.parse_arg(arg)
  local = variant == "local"
  config = common.get_run_config(ml_collections.ConfigDict(), "diffusion")
  # XLA's own CPU convolutions, not YNNPACK fusions: faster steps on
  # CPU (the local UNet 1.35-1.65x; docs/performance.md).
  # No effect on GPU or TPU.
  config.xla_cpu_ynn_fusions = False
  config.data = common.get_data_config(dataset, variant)
  side = config.data.image_shape[0]

  config.model = ml_collections.ConfigDict()
  config.model.dtype = "float32"
  if side == 28:
    config.model.channels = 16 if local else 64
    config.model.multipliers = (1, 2, 2)
    config.model.attention_resolutions = (7,) if local else (14,)
  else:  # 32 x 32 (DDPM's CIFAR-10 network) and 64 x 64.
    config.model.channels = 64 if local else 128
    config.model.multipliers = (1, 2, 2, 2)
    config.model.attention_resolutions = (16,)
  config.model.num_res_blocks = 2
  config.model.dropout_rate = 0.1
  # Rematerialisation: "blocks" or "full" trade compute for activation
  # memory (docs/performance.md); the same parameters and gradients.
  config.model.remat = "none"

  config.diffusion = ml_collections.ConfigDict()
  config.diffusion.objective = "eps"
  config.diffusion.schedule = "linear"
  config.diffusion.num_timesteps = 1000
  config.diffusion.conditional = False
  config.diffusion.label_dropout = 0.1
  config.diffusion.ema_decay = 0.999 if local else 0.9999
  # full: the decay from the first update, as DDPM. local: the warm-up
  # min(decay, (1 + t) / (10 + t)) (optim.ema_decay_at): without it the EMA
  # at the first evaluation (step 1,000) would still hold 0.999^1000 = 37%
  # of the random initial weights; with it, 3e-22.
  config.diffusion.ema_warmup = local
  # Sampling at evaluation and by `genimg sample` (a resume may change these).
  config.diffusion.sampler = "ddim"
  config.diffusion.sample_steps = 10 if local else 50
  config.diffusion.eta = 0.0
  config.diffusion.guidance_scale = 1.0
  # x0_hat clipped to [-1, 1] and eps_hat recomputed from it (ddpm, ddim).
  config.diffusion.clip_denoised = True
  # ddpm: "fixedsmall" (posterior variance beta~_t) or "fixedlarge" (beta_t,
  # DDPM's CIFAR-10 FID 3.17).
  config.diffusion.ddpm_variance = "fixedsmall"
  # ddim: "trailing" (from T - 1), "leading" (diffusers'), "uniform" or
  # "quadratic" (DDIM's tables); see samplers.ddim_timesteps.
  config.diffusion.ddim_spacing = "trailing"
  # Latent diffusion (experiments/latent_dit.py, docs/latent.md): the
  # latents of `genimg encode-latents` and the autoencoder that decodes
  # them; "" and "": pixel space.
  config.diffusion.latents = ""
  config.diffusion.autoencoder = ""

  config.optimizer = common.get_optimizer_config(
      "adam", 1e-3 if local else 2e-4, "cosine" if local else "constant",
      200 if local else 5000)
  config.optimizer.grad_clip = 1.0

  common.set_sample_quality(config, dataset)
  config.eval_batch_size = 500
  config.num_epochs = 0
  if local:
    config.batch_size = 64
    config.num_steps = 2000
    config.eval_every = 1000
    config.checkpoint_every = 500
  else:
    config.batch_size = 128
    config.num_steps = 800000
    config.eval_every = 50000
    config.checkpoint_every = 5000
  return config
