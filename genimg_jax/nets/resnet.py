"""A small ResNet classifier: the `resnet` experiment's network and the
feature network of the sample-quality metrics (its penultimate activations
and class probabilities)."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class ResidualBlock(nn.Module):
  """Pre-activation-free basic block: conv-BN-ReLU-conv-BN + shortcut, ReLU."""
  features: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=0.9, dtype=self.dtype)
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
    y = conv(self.features, (3, 3), self.strides)(x)
    y = nn.relu(norm()(y))
    y = conv(self.features, (3, 3))(y)
    y = norm(scale_init=nn.initializers.zeros)(y)
    if x.shape != y.shape:
      x = norm()(conv(self.features, (1, 1), self.strides)(x))
    return nn.relu(x + y)


class ResNet(nn.Module):
  """A small ResNet for 28x28 / 32x32 images: stem, 3 stages, global pool.

  `features=True` returns the pooled penultimate activations [B, 4 * width],
  the FID features of the sample-quality metrics; with `with_logits=True`
  too, (features, logits) from one pass.
  """
  num_classes: int = 10
  width: int = 32
  blocks_per_stage: tuple[int, ...] = (2, 2, 2)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC, train: bool = False, features: bool = False,
               with_logits: bool = False):
    x = x_BHWC.astype(self.dtype)
    x = nn.Conv(self.width, (3, 3), use_bias=False, dtype=self.dtype)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9,
                             dtype=self.dtype)(x))
    for stage, num_blocks in enumerate(self.blocks_per_stage):
      for block in range(num_blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = ResidualBlock(self.width * 2**stage, strides, self.dtype)(x, train)
    x = jnp.mean(x, axis=(1, 2)).astype(jnp.float32)
    if features and not with_logits:
      return x
    logits = nn.Dense(self.num_classes)(x)
    return (x, logits) if features else logits
