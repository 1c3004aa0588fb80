"""The conv VAE (latent 32, 997,505 parameters on 28 x 28 x 1). Test ELBO and
the importance-weighted bound (IWAE) at the end.

  genimg train --config experiments/vae_conv.py --workdir workdirs/vae_conv
  genimg train --config experiments/vae_conv.py:mnist --workdir workdirs/vae_conv_mnist
  genimg train --config experiments/vae_conv.py:cifar10,full --workdir workdirs/vae_conv_cifar10
  genimg train --config experiments/vae_conv.py:celeb_a64,full --workdir workdirs/vae_conv_celeba

Grayscale data is dynamically binarized (Bernoulli likelihood); colour data
keeps its 8 bits (discretized logistic likelihood, latent 128), so the bound
is in bits/dim of 8-bit images. local: 10 epochs (1,000 steps on CelebA);
full: 100 epochs (20 on CelebA), training images flipped left-right at random
on CIFAR-10 and CelebA. beta-VAE: --config.vae.beta=4.
Other MNIST-format data: --config.data.idx_dir=/path/to/idx/files.
"""

import ml_collections

from experiments import common


def get_config(arg=""):
  dataset, variant = common.parse_arg(arg)
  grayscale = dataset in common.GRAYSCALE
  config = common.get_run_config(ml_collections.ConfigDict(), "vae")
  # XLA's own CPU convolutions, not YNNPACK fusions: faster on CPU
  # (conv VAE step 1.4x, MLP VAE 1.05-1.1x, K = 1,000 bound 1.2x;
  # docs/performance.md), with YNNPACK's reductions (conv VAE step another
  # 1.10x). No effect on GPU or TPU.
  config.xla_cpu_ynn_fusions = False
  config.xla_cpu_ynn_fusions_kept = "reduce"
  config.data = common.get_data_config(dataset, variant)

  config.model = ml_collections.ConfigDict()
  config.model.dtype = "float32"

  config.vae = ml_collections.ConfigDict()
  config.vae.architecture = "conv"
  config.vae.latent_dim = 32 if grayscale else 128
  config.vae.hidden = 500  # MLP only.
  config.vae.likelihood = "bernoulli" if grayscale else "logistic"
  config.vae.beta = 1.0
  config.vae.conditional = False
  # Samples of the importance-weighted bound; 0: none.
  config.vae.iw_samples = 1000 if grayscale or variant == "full" else 100

  config.optimizer = common.get_optimizer_config()

  common.set_sample_quality(config, dataset)
  config.batch_size = 128
  config.eval_batch_size = 200
  config.num_steps = 0  # If > 0, overrides num_epochs.
  if dataset == "celeb_a64":
    config.num_epochs = 0 if variant == "local" else 20
    config.num_steps = 1000 if variant == "local" else 0
  else:
    config.num_epochs = 10 if variant == "local" else 100
  config.eval_every = 0  # 0: only at the end.
  config.checkpoint_every = 1000
  return config
