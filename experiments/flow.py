"""Flow matching (rectified flow): the UNet predicts the velocity x - eps
on the straight path t x + (1 - t) eps, t uniform in [0, 1]; samples and FID
by Euler's method (50 steps; local: Heun's, 5 steps = 9 network
evaluations) from the EMA parameters. Same network, data and step counts as
experiments/ddpm.py.

  genimg train --config experiments/flow.py --workdir workdirs/flow
  genimg train --config experiments/flow.py:cifar10,full --workdir workdirs/flow_cifar10
  genimg sample --workdir workdirs/flow --num 64 --sampler heun --steps 10 --output flow.png

Class-conditional with classifier-free guidance: experiments/flow_cond.py.
"""

from experiments import common, ddpm


def get_config(arg=""):
  config = ddpm.get_config(arg)
  config.diffusion.objective = "flow"
  local = common.parse_arg(arg)[1] == "local"
  config.diffusion.sampler = "heun" if local else "euler"
  config.diffusion.sample_steps = 5 if local else 50
  return config
