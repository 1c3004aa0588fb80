"""WGAN-GP on Fashion-MNIST: 5 critic updates per generator update, gradient
penalty 10, Adam(1e-4, 0.0, 0.9), no dropout in the critic.

  genimg train --config experiments/wgan_gp_fashion_mnist.py --workdir workdirs/wgan_gp
"""

from experiments import dcgan_fashion_mnist


def get_config():
  config = dcgan_fashion_mnist.get_config()
  config.gan.loss = "wgan_gp"
  config.gan.n_critic = 5
  config.model.dropout_rate = 0.0
  config.optimizer.generator = dcgan_fashion_mnist.adam(1e-4, 0.0, 0.9)
  config.optimizer.discriminator = dcgan_fashion_mnist.adam(1e-4, 0.0, 0.9)
  config.batch_size = 320  # 5 critic batches of 64, one generator batch.
  config.num_steps = 1000
  config.eval_every = 500
  return config
