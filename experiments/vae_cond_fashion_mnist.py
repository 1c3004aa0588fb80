"""Class-conditional conv VAE on dynamically binarized Fashion-MNIST.

  genimg train --config experiments/vae_cond_fashion_mnist.py --workdir workdirs/vae_cond
"""

from experiments import vae_conv_fashion_mnist


def get_config():
  config = vae_conv_fashion_mnist.get_config()
  config.vae.conditional = True
  return config
