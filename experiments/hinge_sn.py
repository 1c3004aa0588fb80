"""Hinge loss with a spectrally normalised discriminator, Adam(2e-4, 0, 0.9).

  genimg train --config experiments/hinge_sn.py --workdir workdirs/hinge_sn
  genimg train --config experiments/hinge_sn.py:celeb_a64,full --workdir workdirs/hinge_sn_celeba

Takes DATASET[,VARIANT] and trains as long as experiments/dcgan.py.
"""

from experiments import dcgan


def get_config(arg=""):
  config = dcgan.get_config(arg)
  config.gan.loss = "hinge"
  config.model.spectral_norm = True
  config.model.dropout_rate = 0.0
  config.optimizer.generator = dcgan.adam(2e-4, 0.0, 0.9)
  config.optimizer.discriminator = dcgan.adam(2e-4, 0.0, 0.9)
  return config
