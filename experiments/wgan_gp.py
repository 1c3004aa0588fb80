"""WGAN-GP: 5 critic updates per generator update, gradient penalty 10,
Adam(1e-4, 0.0, 0.9), no dropout in the critic.

  genimg train --config experiments/wgan_gp.py --workdir workdirs/wgan_gp
  genimg train --config experiments/wgan_gp.py:cifar10,full --workdir workdirs/wgan_gp_cifar10

Takes DATASET[,VARIANT] like experiments/dcgan.py. local: 1,000 generator
steps (each with 5 critic batches of 64); full: 20,000 (critic batches of 128).
"""

from experiments import dcgan


def get_config(arg=""):
  config = dcgan.get_config(arg)
  _, variant = dcgan.common.parse_arg(arg)
  config.gan.loss = "wgan_gp"
  config.gan.n_critic = 5
  config.model.dropout_rate = 0.0
  config.optimizer.generator = dcgan.adam(1e-4, 0.0, 0.9)
  config.optimizer.discriminator = dcgan.adam(1e-4, 0.0, 0.9)
  # n_critic critic batches and one generator batch per step.
  config.batch_size = 5 * (64 if variant == "local" else 128)
  config.num_steps = 1000 if variant == "local" else 20000
  config.eval_every = config.num_steps // 2 if variant == "local" else 5000
  return config
