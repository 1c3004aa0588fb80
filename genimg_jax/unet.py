"""Moved to `genimg_jax.nets.unet`; this old name is an alias of that module.

`genimg_jax.unet` and `genimg_jax.nets.unet` are the same module object, so
code that imports (or patches) either name sees the same functions.
"""

import sys

from genimg_jax.nets import unet as _unet

sys.modules[__name__] = _unet
