"""The seed CNN classifier (the `cnn` experiment's network)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from genimg_jax.nets import layers


class CNN(nn.Module):
  """The seed CNN: 3 valid 3x3 convs (32, 64, 128), 2 max-pools, Dense 512.

  688,138 parameters on 28x28x1 with 10 classes.
  """
  num_classes: int = 10
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC, train: bool = False, features: bool = False,
               with_logits: bool = False):
    x = x_BHWC.astype(self.dtype)
    x = layers.max_pool_2x2(nn.relu(nn.Conv(32, (3, 3), padding="VALID",
                                     dtype=self.dtype)(x)))
    x = layers.max_pool_2x2(nn.relu(nn.Conv(64, (3, 3), padding="VALID",
                                     dtype=self.dtype)(x)))
    x = nn.relu(nn.Conv(128, (3, 3), padding="VALID", dtype=self.dtype)(x))
    x = nn.relu(nn.Dense(512, dtype=self.dtype)(x.reshape(x.shape[0], -1)))
    if features:
      return x.astype(jnp.float32)
    return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)
