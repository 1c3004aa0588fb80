"""The MLP VAE (784-500-20, as in the flax VAE example, corrected) on
dynamically binarized Fashion-MNIST.

  genimg train --config experiments/vae_mlp_fashion_mnist.py --workdir workdirs/vae_mlp
"""

from experiments import vae_conv_fashion_mnist


def get_config():
  config = vae_conv_fashion_mnist.get_config()
  config.vae.architecture = "mlp"
  config.vae.latent_dim = 20
  config.vae.hidden = 500
  return config
