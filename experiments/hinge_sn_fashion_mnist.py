"""Hinge loss with a spectrally normalised discriminator on Fashion-MNIST.

  genimg train --config experiments/hinge_sn_fashion_mnist.py --workdir workdirs/hinge_sn
"""

from experiments import dcgan_fashion_mnist


def get_config():
  config = dcgan_fashion_mnist.get_config()
  config.gan.loss = "hinge"
  config.model.spectral_norm = True
  config.model.dropout_rate = 0.0
  config.optimizer.generator = dcgan_fashion_mnist.adam(2e-4, 0.0, 0.9)
  config.optimizer.discriminator = dcgan_fashion_mnist.adam(2e-4, 0.0, 0.9)
  return config
