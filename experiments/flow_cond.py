"""Class-conditional flow matching with classifier-free guidance (labels
dropped with probability 0.1 in training). Needs labels: not CelebA.

  genimg train --config experiments/flow_cond.py --workdir workdirs/flow_cond
  genimg train --config experiments/flow_cond.py:cifar10,full --workdir workdirs/flow_cond_cifar10
  genimg sample --workdir workdirs/flow_cond --num 100 --guidance 2 --output flow_cond.png

Takes DATASET[,VARIANT] and trains as long as experiments/flow.py.
"""

from experiments import flow


def get_config(arg=""):
  flow.ddpm.common.parse_arg(arg, flow.ddpm.common.LABELLED)
  config = flow.get_config(arg)
  config.diffusion.conditional = True
  return config
