"""Class-conditional conv VAE. Needs labels: not CelebA.

  genimg train --config experiments/vae_cond.py --workdir workdirs/vae_cond
  genimg train --config experiments/vae_cond.py:cifar10,full --workdir workdirs/vae_cond_cifar10

Takes DATASET[,VARIANT] and trains as long as experiments/vae_conv.py.
"""

from experiments import vae_conv


def get_config(arg=""):
  vae_conv.common.parse_arg(arg, vae_conv.common.LABELLED)
  config = vae_conv.get_config(arg)
  config.vae.conditional = True
  return config
