"""The MLP VAE (784-500-20 on 28 x 28 x 1, as in the flax VAE example,
corrected).

  genimg train --config experiments/vae_mlp.py --workdir workdirs/vae_mlp
  genimg train --config experiments/vae_mlp.py:mnist,full --workdir workdirs/vae_mlp_mnist

Takes DATASET[,VARIANT] and trains as long as experiments/vae_conv.py.
"""

from experiments import vae_conv


def get_config(arg=""):
  config = vae_conv.get_config(arg)
  config.vae.architecture = "mlp"
  config.vae.latent_dim = 20
  config.vae.hidden = 500
  return config
