"""Class-conditional DDPM with classifier-free guidance (Ho & Salimans
2022): labels dropped with probability 0.1 in training; sampled with
guidance scale 1 (the conditional model) unless
--config.diffusion.guidance_scale says otherwise. Needs labels: not CelebA.

  genimg train --config experiments/ddpm_cond.py --workdir workdirs/ddpm_cond
  genimg train --config experiments/ddpm_cond.py:cifar10,full --workdir workdirs/ddpm_cond_cifar10
  genimg sample --workdir workdirs/ddpm_cond --num 100 --guidance 2 --output ddpm_cond.png

Takes DATASET[,VARIANT] and trains as long as experiments/ddpm.py.
"""

from experiments import ddpm


def get_config(arg=""):
  ddpm.common.parse_arg(arg, ddpm.common.LABELLED)
  config = ddpm.get_config(arg)
  config.diffusion.conditional = True
  return config
