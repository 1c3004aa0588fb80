"""The experiment configs, installed as `genimg_jax.experiments`.

A config file of your own, anywhere, builds on them:

  from genimg_jax.experiments import common, ddpm

  def get_config(arg=""):
    config = ddpm.get_config(arg)
    config.data.name = "folder:/data/faces"
    config.data.image_shape = (64, 64, 3)
    return config
"""

import sys

# The configs import each other as `experiments.X`; installed, that name is
# this package (unless a module of that name was imported first).
if __name__ != "experiments":
  sys.modules.setdefault("experiments", sys.modules[__name__])
