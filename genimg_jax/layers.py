"""Moved to `genimg_jax.nets.layers`; this old name is an alias of that module.

`genimg_jax.layers` and `genimg_jax.nets.layers` are the same module object, so
code that imports (or patches) either name sees the same functions.
"""

import sys

from genimg_jax.nets import layers as _layers

sys.modules[__name__] = _layers
