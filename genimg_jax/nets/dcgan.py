"""The DCGAN generator and discriminator (the GAN family's networks)."""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from genimg_jax.nets import layers


class Generator(nn.Module):
  """DCGAN generator: Dense -> BN-LeakyReLU -> ConvTranspose stack -> tanh.

  28x28: Dense(7*7*256, no bias) -> ConvT(128, 4x4, s1) -> ConvT(64, 4x4, s2)
  -> ConvT(C, 4x4, s2). 32x32 and 64x64 start from 4x4 and use only stride-2
  ConvTs. `num_classes > 0`: a learned label embedding is concatenated to z.
  """
  image_shape: tuple[int, int, int] = (28, 28, 1)
  num_classes: int = 0
  dtype: Any = jnp.float32
  bn_momentum: float = 0.9  # 0.0: running stats := this batch's (standing).

  @nn.compact
  def __call__(self, z_BZ, labels_B=None, train: bool = True):
    h, w, c = self.image_shape
    if h != w or h not in (28, 32, 64):
      raise ValueError(f"The DCGAN generator makes 28x28, 32x32 or 64x64 "
                       f"images, not {h}x{w}.")
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=self.bn_momentum, dtype=self.dtype)
    act = functools.partial(nn.leaky_relu, negative_slope=0.3)
    x = z_BZ.astype(self.dtype)
    if self.num_classes:
      x = jnp.concatenate([x, nn.Embed(self.num_classes, 50)(labels_B).astype(
          self.dtype)], axis=-1)
    base = 7 if h == 28 else 4
    x = nn.Dense(base * base * 256, use_bias=False, dtype=self.dtype)(x)
    x = act(norm()(x)).reshape(-1, base, base, 256)
    if h == 28:
      plan = [(128, 1), (64, 2)]
    else:
      n = int(math.log2(h // base)) - 1
      plan = [(64 * 2 ** (n - 1 - i), 2) for i in range(n)]
    for features, stride in plan:
      if stride == 1:
        # Named as the nn.ConvTranspose it replaces: same parameter tree.
        x = layers.ConvTranspose1x(features, 4, use_bias=False,
                                   dtype=self.dtype, name="ConvTranspose_0")(x)
      else:
        x = layers.ConvTranspose2x(features, 4, use_bias=False,
                                   dtype=self.dtype)(x)
      x = act(norm()(x))
    x = layers.ConvTranspose2x(c, 4, use_bias=False, dtype=self.dtype)(x)
    return jnp.tanh(x.astype(jnp.float32))


class Discriminator(nn.Module):
  """DCGAN discriminator: Conv(64, 4x4, s2) and Conv(128, 4x4, s2), each
  LeakyReLU(0.2)-Dropout, then Dense(1) logits [B]. The convolutions are
  `layers.ConvStride2` (nn.Conv's parameters; a faster input gradient on
  CPU), the dropout `layers.Dropout` (16 random bits per value, four per hash).

  `spectral_norm`: every layer, the class embedding included, wrapped in
  `nn.SpectralNorm` (power-iteration vectors in "batch_stats"; updated only
  when `train and update_stats`). `num_classes > 0`: a projection
  discriminator (logit += <embed(y), features>).
  """
  num_classes: int = 0
  dropout_rate: float = 0.3
  spectral_norm: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC, labels_B=None, train: bool = True,
               update_stats: bool = True):
    def layer(module, x):
      if self.spectral_norm:
        return nn.SpectralNorm(module)(x, update_stats=update_stats and train)
      return module(x)

    x = x_BHWC.astype(self.dtype)
    widths = (64, 128) if x.shape[1] <= 32 else (64, 128, 256)
    for i, features in enumerate(widths):
      # nn.Conv(features, (4, 4), (2, 2), "SAME")'s parameters and names.
      x = layer(layers.ConvStride2(features, 4, dtype=self.dtype,
                                   name=f"Conv_{i}"), x)
      x = nn.leaky_relu(x, 0.2)
      x = layers.Dropout(self.dropout_rate, deterministic=not train)(x)
    h = x.reshape(x.shape[0], -1)
    logits = layer(nn.Dense(1, dtype=self.dtype), h)[:, 0]
    if self.num_classes:  # Spectrally normalised too (Miyato & Koyama).
      embedding = layer(nn.Embed(self.num_classes, h.shape[-1]), labels_B)
      logits = logits + jnp.sum(embedding * h, axis=-1)
    return logits.astype(jnp.float32)
