"""Class-conditional DCGAN (label embedding in G, projection D) on
Fashion-MNIST; writes a per-class grid at each evaluation.

  genimg train --config experiments/cgan_fashion_mnist.py --workdir workdirs/cgan
"""

from experiments import dcgan_fashion_mnist


def get_config():
  config = dcgan_fashion_mnist.get_config()
  config.gan.conditional = True
  return config
