"""The DDPM UNet (Ho et al. 2020), the network of the diffusion family.

Residual blocks with GroupNorm, SiLU and dropout; a sinusoidal time embedding
through a two-layer MLP, added to every residual block; self-attention at the
chosen resolutions and in the middle; down-sampling by stride-2 convolutions
and up-sampling by nearest-neighbour resize + convolution, with a skip
connection from every down-path block to the up path. The output layer and
the last convolution of every residual block start at zero, so a new network
predicts 0. With `num_classes > 0` a learned class embedding (index
`num_classes` is the "no label" of classifier-free guidance) is added to the
time embedding.

DDPM's CIFAR-10 network (channels 128, multipliers (1, 2, 2, 2), 2 blocks per
resolution, attention at 16 x 16, dropout 0.1) has 35,746,307 parameters.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from genimg_jax.nets import layers

zeros_init = nn.initializers.zeros


def timestep_embedding(time_B, dim: int, max_period: float = 10000.0):
  """Sinusoidal embedding [B, dim] (float32) of times [B] (DDPM's, with the
  sines first): sin(t f_i), cos(t f_i), f_i = max_period^(-i / (dim/2 - 1))."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
                  / (half - 1))
  args = time_B.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


def group_norm(channels: int, dtype) -> nn.GroupNorm:
  """GroupNorm with min(32, channels // 4) groups (score_sde's DDPM)."""
  return nn.GroupNorm(num_groups=min(32, channels // 4), dtype=dtype)


class ResidualBlock(nn.Module):
  """GN-SiLU-conv, + Dense(temb), GN-SiLU-dropout-conv(zero init), + x
  (through a 1x1 projection when the channel count changes)."""
  features: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC, temb_BD, train: bool):
    h = nn.silu(group_norm(x_BHWC.shape[-1], self.dtype)(x_BHWC))
    h = nn.Conv(self.features, (3, 3), dtype=self.dtype)(h)
    h = h + nn.Dense(self.features, dtype=self.dtype)(nn.silu(temb_BD))[
        :, None, None, :]
    h = nn.silu(group_norm(self.features, self.dtype)(h))
    h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    h = nn.Conv(self.features, (3, 3), kernel_init=zeros_init,
                dtype=self.dtype)(h)
    if x_BHWC.shape[-1] != self.features:
      x_BHWC = nn.Dense(self.features, dtype=self.dtype)(x_BHWC)
    return x_BHWC + h


class AttentionBlock(nn.Module):
  """Single-head self-attention over the H * W positions, residual."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC):
    b, h, w, c = x_BHWC.shape
    y = group_norm(c, self.dtype)(x_BHWC).reshape(b, h * w, c)
    q, k, v = (nn.Dense(c, dtype=self.dtype, name=name)(y)
               for name in ("query", "key", "value"))
    weights = jax.nn.softmax(
        (jnp.einsum("bqc,bkc->bqk", q, k) / math.sqrt(c)).astype(jnp.float32),
        axis=-1).astype(self.dtype)
    y = jnp.einsum("bqk,bkc->bqc", weights, v)
    y = nn.Dense(c, kernel_init=zeros_init, dtype=self.dtype, name="out")(y)
    return x_BHWC + y.reshape(b, h, w, c)


class UNet(nn.Module):
  """x_t [B, H, W, C] and time [B] (labels [B] int32 if conditional) ->
  the model output [B, H, W, C] (float32): the noise, v or velocity,
  depending on the objective.

  Attributes:
    channels: base channel count; level i has channels * multipliers[i].
    multipliers: one per resolution; each level but the last halves H, W.
    num_res_blocks: residual blocks per level on the down path (+1 up).
    attention_resolutions: the image sides (e.g. (16,)) with self-attention.
    dropout_rate: in every residual block, when `train`.
    num_classes: > 0 adds a class embedding of num_classes + 1 rows (the
      last is "no label").
    remat: "none", "blocks" (every residual and attention block recomputed
      in the backward pass, `layers.REMAT_POLICY`) or "full" (the whole
      network). The parameters and the gradients are the same.
  """
  channels: int = 128
  multipliers: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attention_resolutions: Sequence[int] = (16,)
  dropout_rate: float = 0.1
  num_classes: int = 0
  dtype: Any = jnp.float32
  remat: str = "none"

  def __call__(self, x_BHWC, time_B, labels_B=None, train: bool = False):
    return layers.forward_maybe_remat(self, x_BHWC, time_B, labels_B, train)

  @nn.compact
  def forward(self, x_BHWC, time_B, labels_B=None, train: bool = False):
    """`__call__` without whole-network remat."""
    blocks = self.remat == "blocks"
    residual_class = layers.remat_if(ResidualBlock, blocks,
                                     static_argnums=(3,))
    attention_class = layers.remat_if(AttentionBlock, blocks)
    counts = {"res": 0, "attn": 0}

    def block(features):
      # Named as Flax names the plain classes, with or without remat.
      counts["res"] += 1
      return residual_class(features, self.dropout_rate, self.dtype,
                            name=f"ResidualBlock_{counts['res'] - 1}")

    def attention_block():
      counts["attn"] += 1
      return attention_class(self.dtype,
                             name=f"AttentionBlock_{counts['attn'] - 1}")

    temb = timestep_embedding(time_B, self.channels)
    temb = nn.Dense(4 * self.channels, dtype=self.dtype)(temb)
    temb = nn.Dense(4 * self.channels, dtype=self.dtype)(nn.silu(temb))
    if self.num_classes:
      if labels_B is None:
        raise ValueError("A conditional UNet needs labels (num_classes for "
                         "'no label').")
      temb = temb + nn.Embed(self.num_classes + 1, 4 * self.channels,
                             dtype=self.dtype)(labels_B)

    h = nn.Conv(self.channels, (3, 3), dtype=self.dtype)(
        x_BHWC.astype(self.dtype))
    skips = [h]
    for level, multiplier in enumerate(self.multipliers):
      for _ in range(self.num_res_blocks):
        h = block(self.channels * multiplier)(h, temb, train)
        if h.shape[1] in self.attention_resolutions:
          h = attention_block()(h)
        skips.append(h)
      if level != len(self.multipliers) - 1:
        h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2), dtype=self.dtype)(h)
        skips.append(h)

    h = block(h.shape[-1])(h, temb, train)
    h = attention_block()(h)
    h = block(h.shape[-1])(h, temb, train)

    for level, multiplier in reversed(list(enumerate(self.multipliers))):
      for _ in range(self.num_res_blocks + 1):
        h = block(self.channels * multiplier)(
            jnp.concatenate([h, skips.pop()], axis=-1), temb, train)
        if h.shape[1] in self.attention_resolutions:
          h = attention_block()(h)
      if level != 0:
        skip_hw = skips[-1].shape[1:3]  # 7 -> 4 -> 7 on 28 x 28 images.
        h = jax.image.resize(h, (h.shape[0], *skip_hw, h.shape[-1]),
                             "nearest")
        h = nn.Conv(h.shape[-1], (3, 3), dtype=self.dtype)(h)
    assert not skips

    h = nn.silu(group_norm(h.shape[-1], self.dtype)(h))
    out = nn.Conv(x_BHWC.shape[-1], (3, 3), kernel_init=zeros_init,
                  dtype=self.dtype)(h)
    return out.astype(jnp.float32)
