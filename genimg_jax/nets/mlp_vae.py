"""The MLP encoder and decoder of the VAE family (`vae.architecture="mlp"`)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np


class MLPEncoder(nn.Module):
  latent_dim: int
  hidden: int = 500
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC, cond_BK=None):
    x = x_BHWC.reshape(x_BHWC.shape[0], -1)
    if cond_BK is not None:
      x = jnp.concatenate([x, cond_BK], -1)
    x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype)(x))
    out = nn.Dense(2 * self.latent_dim, dtype=self.dtype)(x)
    return jnp.split(out.astype(jnp.float32), 2, axis=-1)


class MLPDecoder(nn.Module):
  image_shape: tuple[int, int, int]
  outputs_per_pixel: int
  hidden: int = 500
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z_BZ, cond_BK=None):
    if cond_BK is not None:
      z_BZ = jnp.concatenate([z_BZ, cond_BK], -1)
    x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype)(z_BZ))
    x = nn.Dense(int(np.prod(self.image_shape)) * self.outputs_per_pixel,
                 dtype=self.dtype)(x)
    h, w, c = self.image_shape
    return x.reshape(-1, h, w, c * self.outputs_per_pixel).astype(jnp.float32)
