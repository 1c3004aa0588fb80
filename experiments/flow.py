"""Flow matching (rectified flow): the UNet predicts the velocity x - eps
on the straight path t x + (1 - t) eps, t uniform in [0, 1]; samples and FID
by Euler's method (50 steps) from the EMA parameters. Same network, data
and step counts as experiments/ddpm.py.

  genimg train --config experiments/flow.py --workdir workdirs/flow
  genimg train --config experiments/flow.py:cifar10,full --workdir workdirs/flow_cifar10
  genimg sample --workdir workdirs/flow --num 64 --sampler heun --steps 10 --output flow.png

Class-conditional with classifier-free guidance: experiments/flow_cond.py.
"""

from experiments import ddpm


def get_config(arg=""):
  config = ddpm.get_config(arg)
  config.diffusion.objective = "flow"
  config.diffusion.sampler = "euler"
  return config
