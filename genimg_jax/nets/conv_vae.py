"""The convolutional encoder and decoder of the VAE family, and the `VAE`
module that pairs an encoder with a decoder (conv, or the MLP ones of
`mlp_vae`)."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from genimg_jax.nets import layers
from genimg_jax.nets.mlp_vae import MLPDecoder, MLPEncoder


class ConvEncoder(nn.Module):
  """Conv(32, 3x3, s2)-ReLU -> Conv(64, 3x3, s2)-ReLU -> Dense(256)-ReLU ->
  Dense(2 * latent): (mean, log-variance)."""
  latent_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC, cond_BK=None):
    conv = functools.partial(nn.Conv, kernel_size=(3, 3), strides=(2, 2),
                             padding="SAME", dtype=self.dtype)
    x = nn.relu(conv(32)(x_BHWC))
    x = nn.relu(conv(64)(x))
    x = x.reshape(x.shape[0], -1)
    if cond_BK is not None:
      x = jnp.concatenate([x, cond_BK.astype(x.dtype)], -1)
    x = nn.relu(nn.Dense(256, dtype=self.dtype)(x))
    out = nn.Dense(2 * self.latent_dim, dtype=self.dtype)(x)
    return jnp.split(out.astype(jnp.float32), 2, axis=-1)


class ConvDecoder(nn.Module):
  """Dense(h/4 * w/4 * 64)-ReLU -> ConvT(64, 3x3, s2)-ReLU ->
  ConvT(32, 3x3, s2)-ReLU -> ConvT(C * outputs, 3x3, s1)."""
  image_shape: tuple[int, int, int]
  outputs_per_pixel: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z_BZ, cond_BK=None):
    h, w, c = self.image_shape
    if cond_BK is not None:
      z_BZ = jnp.concatenate([z_BZ, cond_BK], -1)
    x = nn.relu(nn.Dense(h // 4 * w // 4 * 64, dtype=self.dtype)(z_BZ))
    x = x.reshape(-1, h // 4, w // 4, 64)
    x = nn.relu(layers.ConvTranspose2x(64, 3, dtype=self.dtype)(x))
    x = nn.relu(layers.ConvTranspose2x(32, 3, dtype=self.dtype)(x))
    # Named as the nn.ConvTranspose it replaces: same parameter tree.
    return layers.ConvTransposeTaps(c * self.outputs_per_pixel, 3,
                                    dtype=self.dtype, name="ConvTranspose_0")(
                                        x).astype(jnp.float32)


class VAE(nn.Module):
  """Encoder + decoder. `num_classes > 0`: both see a one-hot label."""
  architecture: str = "conv"
  latent_dim: int = 32
  image_shape: tuple[int, int, int] = (28, 28, 1)
  likelihood: str = "bernoulli"
  num_classes: int = 0
  hidden: int = 500
  dtype: Any = jnp.float32

  def setup(self):
    outputs = 1 if self.likelihood == "bernoulli" else 2
    if self.architecture == "mlp":
      self.encoder = MLPEncoder(self.latent_dim, self.hidden, self.dtype)
      self.decoder = MLPDecoder(self.image_shape, outputs, self.hidden,
                                self.dtype)
    elif self.architecture == "conv":
      if self.image_shape[0] % 4 or self.image_shape[1] % 4:
        raise ValueError("The conv VAE needs image sides divisible by 4.")
      self.encoder = ConvEncoder(self.latent_dim, self.dtype)
      self.decoder = ConvDecoder(self.image_shape, outputs, self.dtype)
    else:
      raise ValueError(f"Unknown vae architecture {self.architecture!r}; "
                       "use 'mlp' or 'conv'.")

  def _cond(self, labels_B):
    if not self.num_classes:
      return None
    return jax.nn.one_hot(labels_B, self.num_classes)

  def encode(self, x_BHWC, labels_B=None):
    """x in [0, 1] -> (mean [B, Z], log-variance [B, Z])."""
    return self.encoder(x_BHWC, self._cond(labels_B))

  def decode(self, z_BZ, labels_B=None):
    """z -> decoder outputs [B, H, W, C] (logits) or [B, H, W, 2C]."""
    return self.decoder(z_BZ, self._cond(labels_B))

  def __call__(self, x_BHWC, z_rng, labels_B=None):
    """(decoder outputs, mean, logvar); z_rng: the reparameterisation."""
    mean, logvar = self.encode(x_BHWC, labels_B)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(z_rng, mean.shape)
    return self.decode(z, labels_B), mean, logvar
