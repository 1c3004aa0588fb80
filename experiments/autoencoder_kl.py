"""A small KL autoencoder (diffusers' AutoencoderKL, genimg_jax/nets/
autoencoder_kl.py), the first stage of latent diffusion, trained here so
that experiments/latent_dit.py needs no outside weights.

  genimg train --config experiments/autoencoder_kl.py --workdir workdirs/autoencoder_kl
  genimg export-autoencoder --workdir workdirs/autoencoder_kl \
      --output workdirs/autoencoder_kl.msgpack

local: block_out_channels (32, 64, 64) (two halvings: 28 x 28 x 1 -> 7 x 7
x 4 latents, 32 x 32 -> 8 x 8, 64 x 64 -> 16 x 16), one resnet a level,
GroupNorm of 8 groups, mid-block attention, 953,413 parameters; batch 64, 1,000
steps, Adam 1e-3 (cosine, 200 warm-up steps).
full: (128, 256, 256), two resnets a level, 32 groups (SD's VAE with one
level fewer), batch 64, 100,000 steps, Adam 1e-4 constant. Both: L1 reconstruction + 1e-6 x KL (LDM's kl_weight; no LPIPS),
evaluated by the L1, MSE and PSNR of the reconstructions of the posterior
means over the test split. The export's scaling factor is 1 / std of the
sampled latents of the first training batch.

The PatchGAN discriminator of LDM's `LPIPSWithDiscriminator` is off by
default (disc_weight 0); on, from step 500:

  genimg train --config experiments/autoencoder_kl.py \
      --workdir workdirs/autoencoder_kl_disc \
      --config.autoencoder.disc_weight=0.5 --config.autoencoder.disc_start=500

(docs/latent.md, "The patch discriminator"; the formulas are in
genimg_jax/autoencoder_family.py).
"""

import ml_collections

from experiments import common


def get_config(arg=""):
  dataset, variant = common.parse_arg(arg)
  local = variant == "local"
  config = common.get_run_config(ml_collections.ConfigDict(), "autoencoder")
  # XLA's own CPU convolutions, as the other convolutional experiments.
  config.xla_cpu_ynn_fusions = False
  config.data = common.get_data_config(dataset, variant)

  config.autoencoder = ml_collections.ConfigDict()
  config.autoencoder.block_out_channels = (32, 64, 64) if local else (
      128, 256, 256)
  config.autoencoder.layers_per_block = 1 if local else 2
  config.autoencoder.latent_channels = 4
  config.autoencoder.norm_num_groups = 8 if local else 32
  config.autoencoder.mid_block_attention = True
  # The loss per image: sum of |x - x_rec| (or "l2": squares) over pixels in
  # [-1, 1] plus kl_weight x KL(q(z|x) || N(0, I)) (LDM's 1e-6).
  config.autoencoder.loss = "l1"
  config.autoencoder.kl_weight = 1e-6
  # The optional PatchGAN discriminator (LDM's / taming's, without LPIPS):
  # disc_weight > 0 adds disc_weight x the adaptive weight x the generator
  # loss from step disc_start on, and trains a discriminator of disc_layers
  # stride-2 convs from disc_channels (hinge or "vanilla" softplus loss),
  # with the autoencoder's optimizer config. 0: off.
  config.autoencoder.disc_weight = 0.0
  config.autoencoder.disc_start = 0
  config.autoencoder.disc_layers = 3
  config.autoencoder.disc_channels = 64
  config.autoencoder.disc_loss = "hinge"

  config.optimizer = common.get_optimizer_config(
      "adam", 1e-3 if local else 1e-4, "cosine" if local else "constant",
      200 if local else 0)

  # No FID: the evaluation measures reconstructions.
  config.feature_network = ""
  config.fid_stats = ""
  config.eval_samples = 0
  config.eval_reference_split = "test"
  config.batch_size = 64
  config.eval_batch_size = 500
  config.num_epochs = 0
  config.num_steps = 1000 if local else 100000
  config.eval_every = 1000 if local else 10000
  config.checkpoint_every = 500 if local else 5000
  return config
