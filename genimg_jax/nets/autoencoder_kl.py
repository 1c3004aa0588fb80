"""The Stable Diffusion VAE: diffusers' `AutoencoderKL` in Flax, NHWC.

The same network as `diffusers.AutoencoderKL` (`models/autoencoders/
autoencoder_kl.py`, `vae.py`, `resnet.py`, `unets/unet_2d_blocks.py`) with
only DownEncoderBlock2D / UpDecoderBlock2D blocks and SiLU, as every SD 1.x /
2.x / SDXL VAE uses:

  Encoder: conv_in 3x3 -> per level (block_out_channels) `layers_per_block`
    ResnetBlock2D, and a Downsample2D (pad right/bottom by 1, 3x3 conv stride
    2, no padding) except at the last level -> mid block (resnet, single-head
    self-attention, resnet) -> GroupNorm, SiLU, conv_out 3x3 to
    2 * latent_channels (mean, log-variance).
  Decoder: conv_in 3x3 -> mid block -> per level, reversed,
    `layers_per_block + 1` resnets and an Upsample2D (nearest x2, 3x3 conv)
    except at the last level -> GroupNorm, SiLU, conv_out 3x3.
  quant_conv / post_quant_conv: 1x1 convs around the latent.

Every GroupNorm has epsilon 1e-6 and computes its variance in two passes
(as torch). Submodule names are diffusers' with `.` before an index written
`_` (`encoder/down_blocks_0/resnets_1/norm1`), so the converter in
`genimg_jax.autoencoder` maps names by one rule. The defaults are SD 1.x's
VAE (83,653,863 parameters).
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

EPS = 1e-6
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # diffusers' DiagonalGaussianDistribution.

_conv3 = functools.partial(nn.Conv, kernel_size=(3, 3), padding=((1, 1),
                                                                 (1, 1)))
_norm = functools.partial(nn.GroupNorm, epsilon=EPS, use_fast_variance=False)


class ResnetBlock(nn.Module):
  """diffusers' ResnetBlock2D without a time embedding: GroupNorm, SiLU,
  conv1, GroupNorm, SiLU, conv2, plus the input (through a 1x1
  `conv_shortcut` when the channel count changes)."""
  features: int
  groups: int

  @nn.compact
  def __call__(self, x_BHWC):
    h = nn.silu(_norm(self.groups, name="norm1")(x_BHWC))
    h = _conv3(self.features, name="conv1")(h)
    h = nn.silu(_norm(self.groups, name="norm2")(h))
    h = _conv3(self.features, name="conv2")(h)
    if x_BHWC.shape[-1] != self.features:
      x_BHWC = nn.Conv(self.features, (1, 1), name="conv_shortcut")(x_BHWC)
    return x_BHWC + h


class Attention(nn.Module):
  """The mid block's attention (diffusers' `Attention` with
  `_from_deprecated_attn_block`): one head over all H*W positions,
  GroupNorm -> to_q/to_k/to_v -> softmax(q k^T / sqrt(C)) v -> to_out_0,
  plus the input."""
  groups: int

  @nn.compact
  def __call__(self, x_BHWC):
    b, h, w, c = x_BHWC.shape
    y = _norm(self.groups, name="group_norm")(x_BHWC).reshape(b, h * w, 1, c)
    q, k, v = (nn.Dense(c, name=n)(y) for n in ("to_q", "to_k", "to_v"))
    y = jax.nn.dot_product_attention(q, k, v, scale=c ** -0.5)
    y = nn.Dense(c, name="to_out_0")(y.reshape(b, h * w, c))
    return x_BHWC + y.reshape(b, h, w, c)


class MidBlock(nn.Module):
  """UNetMidBlock2D: resnet, attention (if `attention`), resnet."""
  groups: int
  attention: bool = True

  @nn.compact
  def __call__(self, x_BHWC):
    c = x_BHWC.shape[-1]
    x = ResnetBlock(c, self.groups, name="resnets_0")(x_BHWC)
    if self.attention:
      x = Attention(self.groups, name="attentions_0")(x)
    return ResnetBlock(c, self.groups, name="resnets_1")(x)


class Downsample(nn.Module):
  """Downsample2D(padding=0): zero-pad one row at the bottom and one column
  at the right, then a 3x3 conv with stride 2 and no padding."""
  features: int

  @nn.compact
  def __call__(self, x_BHWC):
    x = jnp.pad(x_BHWC, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return nn.Conv(self.features, (3, 3), (2, 2), padding="VALID",
                   name="conv")(x)


class Upsample(nn.Module):
  """Upsample2D: nearest-neighbour x2, then a 3x3 conv."""
  features: int

  @nn.compact
  def __call__(self, x_BHWC):
    x = jnp.repeat(jnp.repeat(x_BHWC, 2, axis=1), 2, axis=2)
    return _conv3(self.features, name="conv")(x)


class DownBlock(nn.Module):
  """DownEncoderBlock2D: `num_layers` resnets, then a Downsample2D unless
  this is the last level."""
  features: int
  num_layers: int
  groups: int
  downsample: bool

  @nn.compact
  def __call__(self, x_BHWC):
    for j in range(self.num_layers):
      x_BHWC = ResnetBlock(self.features, self.groups, name=f"resnets_{j}")(
          x_BHWC)
    if self.downsample:
      x_BHWC = Downsample(self.features, name="downsamplers_0")(x_BHWC)
    return x_BHWC


class UpBlock(nn.Module):
  """UpDecoderBlock2D: `num_layers` resnets, then an Upsample2D unless this
  is the last level."""
  features: int
  num_layers: int
  groups: int
  upsample: bool

  @nn.compact
  def __call__(self, x_BHWC):
    for j in range(self.num_layers):
      x_BHWC = ResnetBlock(self.features, self.groups, name=f"resnets_{j}")(
          x_BHWC)
    if self.upsample:
      x_BHWC = Upsample(self.features, name="upsamplers_0")(x_BHWC)
    return x_BHWC


class Encoder(nn.Module):
  """x [B, H, W, in] -> moments [B, H/f, W/f, 2 * latent] (f = 2^(levels-1)),
  before quant_conv."""
  block_out_channels: Sequence[int]
  layers_per_block: int
  latent_channels: int
  groups: int
  mid_block_attention: bool = True

  @nn.compact
  def __call__(self, x_BHWC):
    channels = tuple(self.block_out_channels)
    x = _conv3(channels[0], name="conv_in")(x_BHWC)
    for i, c in enumerate(channels):
      x = DownBlock(c, self.layers_per_block, self.groups,
                    i < len(channels) - 1, name=f"down_blocks_{i}")(x)
    x = MidBlock(self.groups, self.mid_block_attention, name="mid_block")(x)
    x = nn.silu(_norm(self.groups, name="conv_norm_out")(x))
    return _conv3(2 * self.latent_channels, name="conv_out")(x)


class Decoder(nn.Module):
  """z [B, h, w, latent] (after post_quant_conv) -> x [B, h*f, w*f, out]."""
  block_out_channels: Sequence[int]
  layers_per_block: int
  out_channels: int
  groups: int
  mid_block_attention: bool = True

  @nn.compact
  def __call__(self, z_BHWC):
    channels = tuple(reversed(tuple(self.block_out_channels)))
    x = _conv3(channels[0], name="conv_in")(z_BHWC)
    x = MidBlock(self.groups, self.mid_block_attention, name="mid_block")(x)
    for i, c in enumerate(channels):
      x = UpBlock(c, self.layers_per_block + 1, self.groups,
                  i < len(channels) - 1, name=f"up_blocks_{i}")(x)
    x = nn.silu(_norm(self.groups, name="conv_norm_out")(x))
    return _conv3(self.out_channels, name="conv_out")(x)


class AutoencoderKL(nn.Module):
  """diffusers' AutoencoderKL; the defaults are SD 1.x's VAE.

  Images are NHWC float32 in [-1, 1]; latents are NHWC with
  `latent_channels` channels at 1/2^(len(block_out_channels) - 1) of the
  resolution. `scaling_factor` (and `shift_factor`) are not applied here: a
  latent diffusion model sees (z - shift) * scaling_factor, as diffusers'
  pipelines do.
  """
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: Sequence[int] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  def setup(self):
    self.encoder = Encoder(self.block_out_channels, self.layers_per_block,
                           self.latent_channels, self.norm_num_groups,
                           self.mid_block_add_attention)
    self.decoder = Decoder(self.block_out_channels, self.layers_per_block,
                           self.out_channels, self.norm_num_groups,
                           self.mid_block_add_attention)
    if self.use_quant_conv:
      self.quant_conv = nn.Conv(2 * self.latent_channels, (1, 1))
    if self.use_post_quant_conv:
      self.post_quant_conv = nn.Conv(self.latent_channels, (1, 1))

  def encode(self, x_BHWC):
    """x [B, H, W, in] -> (mean, logvar), each [B, H/f, W/f, latent],
    float32: the diagonal Gaussian posterior; logvar clamped to [-30, 20]."""
    moments = self.encoder(x_BHWC)
    if self.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

  def decode(self, z_BHWC):
    """z [B, h, w, latent] -> x [B, h*f, w*f, out], float32."""
    if self.use_post_quant_conv:
      z_BHWC = self.post_quant_conv(z_BHWC)
    return self.decoder(z_BHWC)

  def __call__(self, x_BHWC, rng=None):
    """x -> (reconstruction, mean, logvar). rng: draws z = mean + std * eps
    from the posterior; None decodes the mean (diffusers' `mode()`)."""
    mean, logvar = self.encode(x_BHWC)
    z = mean
    if rng is not None:
      z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(
          rng, mean.shape, mean.dtype)
    return self.decode(z), mean, logvar
