"""The PatchGAN discriminator: pix2pix's and taming-transformers'
`NLayerDiscriminator` in Flax, NHWC.

  conv_0 4x4 stride 2 (channels) -> LeakyReLU(0.2)
  for n = 1 .. num_layers - 1: conv_n 4x4 stride 2
      (channels * min(2^n, 8), no bias) -> norm_n -> LeakyReLU(0.2)
  conv_L 4x4 stride 1 (channels * min(2^L, 8), no bias), L = num_layers
      -> norm_L -> LeakyReLU(0.2)
  conv_{L+1} 4x4 stride 1 -> 1 channel: one logit per patch.

Every conv pads by 1 on each side (PyTorch's padding=1), so a side s
becomes floor(s / 2) + 1 - 1 = floor((s - 2) / 2) + 1 at stride 2 and s - 1
at stride 1: 256 x 256 -> 30 x 30 logits, 28 x 28 -> 1 x 1 with the default
3 layers (taming's). The norms are BatchNorm as taming's (momentum 0.9 in
Flax's convention = PyTorch's 0.1, epsilon 1e-5). Initialisation as taming's
`weights_init`: conv kernels N(0, 0.02), BatchNorm scales N(1, 0.02) and
offsets 0; the two conv biases start at 0 (PyTorch's default there is
uniform). Taming's default (3 input channels, 64, 3 layers) has 2,765,633
parameters.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


def _scale_init(key, shape, dtype=jnp.float32):
  """BatchNorm scales N(1, 0.02) (taming's `weights_init`)."""
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


class NLayerDiscriminator(nn.Module):
  """Patch logits [B, h, w, 1] of images [B, H, W, C] (float, any range the
  caller trains it on; here [-1, 1]).

  train: BatchNorm normalises by the batch's statistics and, when the
  caller makes `batch_stats` mutable, updates its running averages; else
  the running averages are used.
  """
  channels: int = 64
  num_layers: int = 3
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x_BHWC, train: bool = True):
    conv = functools.partial(nn.Conv, kernel_size=(4, 4),
                             padding=((1, 1), (1, 1)),
                             kernel_init=nn.initializers.normal(0.02))
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=self.bn_momentum, epsilon=1e-5,
                             scale_init=_scale_init)
    x = conv(self.channels, strides=(2, 2), name="conv_0")(x_BHWC)
    x = nn.leaky_relu(x, 0.2)
    for n in range(1, self.num_layers + 1):
      stride = 2 if n < self.num_layers else 1
      x = conv(self.channels * min(2 ** n, 8), strides=(stride, stride),
               use_bias=False, name=f"conv_{n}")(x)
      x = norm(name=f"norm_{n}")(x)
      x = nn.leaky_relu(x, 0.2)
    return conv(1, strides=(1, 1), name=f"conv_{self.num_layers + 1}")(x)
