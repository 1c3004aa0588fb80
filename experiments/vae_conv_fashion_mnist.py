"""The conv VAE (latent 32, 997,505 parameters) on dynamically binarized
Fashion-MNIST, Bernoulli likelihood; test ELBO and IWAE (K = 1000) at the end.

  genimg train --config experiments/vae_conv_fashion_mnist.py --workdir workdirs/vae_conv

Other data in MNIST format: --config.data.idx_dir=/path/to/mnist.
beta-VAE: --config.vae.beta=4. 8-bit likelihood: --config.vae.likelihood=logistic.
"""

import ml_collections

from experiments import cnn_fashion_mnist


def get_config():
  config = ml_collections.ConfigDict()
  config.family = "vae"
  config.seed = 0
  config.data = cnn_fashion_mnist.get_data_config()

  config.model = ml_collections.ConfigDict()
  config.model.dtype = "float32"

  config.vae = ml_collections.ConfigDict()
  config.vae.architecture = "conv"
  config.vae.latent_dim = 32
  config.vae.hidden = 500  # MLP only.
  config.vae.likelihood = "bernoulli"
  config.vae.beta = 1.0
  config.vae.conditional = False
  config.vae.iw_samples = 1000  # 0: no importance-weighted bound.

  config.optimizer = cnn_fashion_mnist.get_optimizer_config()

  config.batch_size = 128
  config.eval_batch_size = 200
  config.eval_samples = 10000  # FID / score of prior samples; 0 for none.
  config.num_epochs = 10
  config.num_steps = 0

  config.mesh = ml_collections.ConfigDict()
  config.mesh.num_devices = 0

  config.log_every = 100
  config.eval_every = 0
  config.checkpoint_every = 1000
  config.keep_checkpoints = 3
  return config
