"""Class-conditional DCGAN (label embedding in G, projection D); writes a
per-class grid at each evaluation. Needs labels: not CelebA.

  genimg train --config experiments/cgan.py --workdir workdirs/cgan
  genimg train --config experiments/cgan.py:cifar10,full --workdir workdirs/cgan_cifar10

Takes DATASET[,VARIANT] and trains as long as experiments/dcgan.py.
"""

from experiments import dcgan


def get_config(arg=""):
  dcgan.common.parse_arg(arg, dcgan.common.LABELLED)
  config = dcgan.get_config(arg)
  config.gan.conditional = True
  return config
