"""The default DCGAN on Fashion-MNIST: non-saturating loss, Adam 2e-4.

The README's main job: 3,000 steps of batch 64 (216 ms each on 2 idle CPU
cores by `genimg bench`), 20 minutes measured with the test suite sharing the
cores; prints its FID and score and writes sample grids.

  genimg train --config experiments/dcgan_fashion_mnist.py --workdir workdirs/dcgan

On a GPU/TPU train longer: --config.num_steps=20000.
"""

import ml_collections

from experiments import cnn_fashion_mnist


def adam(learning_rate=2e-4, b1=0.5, b2=0.999):
  """Adam at a constant learning rate, as GANs use it."""
  return cnn_fashion_mnist.get_optimizer_config(
      "adam", learning_rate, "constant", 0, b1, b2)


def get_config():
  config = ml_collections.ConfigDict()
  config.family = "gan"
  config.seed = 0
  config.data = cnn_fashion_mnist.get_data_config()

  config.model = ml_collections.ConfigDict()
  config.model.dtype = "float32"
  config.model.dropout_rate = 0.3
  config.model.spectral_norm = False

  config.gan = ml_collections.ConfigDict()
  config.gan.loss = "non_saturating"
  config.gan.n_critic = 1
  config.gan.gp_weight = 10.0
  config.gan.ema_decay = 0.999
  config.gan.z_dim = 100
  config.gan.conditional = False
  config.gan.skip_nonfinite = False

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.generator = adam()
  config.optimizer.discriminator = adam()

  config.batch_size = 64
  config.eval_batch_size = 512
  config.eval_samples = 10000  # FID / score samples; 0 for none.
  config.num_epochs = 0
  config.num_steps = 3000

  config.mesh = ml_collections.ConfigDict()
  config.mesh.num_devices = 0

  config.log_every = 100
  config.eval_every = 1000
  config.checkpoint_every = 500
  config.keep_checkpoints = 3
  return config
