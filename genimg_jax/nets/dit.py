"""DiT (Peebles & Xie 2023), a transformer network of the diffusion family;
with the flow objective it is SiT (Ma et al. 2024).

As the official facebookresearch/DiT models.py: the image is cut into p x p
patches (a convolution with kernel = stride = p), each patch a token of
`hidden_size` features, plus a fixed 2-D sin-cos position embedding; `depth`
transformer blocks conditioned by adaLN-Zero (a per-example shift, scale and
gate of every LayerNorm and residual branch, regressed from time + class
embedding by a zero-initialised Dense, so every block starts as the
identity); a final adaLN LayerNorm and a linear map back to p x p x C per
token, both zero-initialised, so a new network predicts 0. The time enters
as a 256-dim frequency embedding through a two-layer MLP; with
`num_classes > 0` a class embedding of num_classes + 1 rows (the last is
"no label", for classifier-free guidance) is added to it.

Initialisation as the official code: Dense kernels Xavier-uniform, biases 0;
the patch convolution Xavier-uniform as a Dense over p * p * C inputs; time
MLP kernels and the class table normal(0.02). Parameters are float32;
activations in `dtype` (float32 or bfloat16), with attention logits and
softmax in float32 (`attention`). Parameter names follow the official
module names (x_embedder, t_embedder, y_embedder, blocks_i/attn/qkv, ...).

Sizes (`DIT_SIZES`, `dit_config("DiT-XL/2")`): S, B, L, XL with patch 2, 4
or 8. DiT-XL/2 on 32 x 32 x 4 latents with 1000 classes and learn_sigma has
674,834,720 trained parameters; the official count, 675,129,632, includes
its frozen position embedding (256 x 1152). `dit_forward_flops` counts a
forward pass's multiply-adds: 118.6 G for DiT-XL/2 at 32 x 32, the paper's
"Gflops" (XLA's cost analysis counts 2 flops per multiply-add).
"""

from __future__ import annotations

import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from genimg_jax.nets import layers

# name -> (hidden_size, depth, num_heads); mlp_ratio 4 for all.
DIT_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16),
             "XL": (1152, 28, 16)}
PATCH_SIZES = (2, 4, 8)
FREQUENCY_EMBEDDING_SIZE = 256

xavier_uniform = nn.initializers.xavier_uniform()
zeros_init = nn.initializers.zeros
# The patch convolution's kernel [p, p, C, D] initialised as a Dense from
# p * p * C inputs to D outputs (Xavier over those fans, as the official).
patch_kernel_init = nn.initializers.variance_scaling(
    1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=-1)


def dit_config(name: str) -> dict:
  """"DiT-XL/2" -> {hidden_size, depth, num_heads, patch_size, mlp_ratio}."""
  match = re.fullmatch(r"DiT-(S|B|L|XL)/(\d+)", name)
  if not match or int(match.group(2)) not in PATCH_SIZES:
    raise ValueError(f"Unknown DiT size {name!r}: DiT-{{S,B,L,XL}}/{{2,4,8}}"
                     ", e.g. DiT-XL/2.")
  hidden_size, depth, num_heads = DIT_SIZES[match.group(1)]
  return {"hidden_size": hidden_size, "depth": depth, "num_heads": num_heads,
          "patch_size": int(match.group(2)), "mlp_ratio": 4.0}


def timestep_embedding(time_B, dim: int = FREQUENCY_EMBEDDING_SIZE,
                       max_period: float = 10000.0):
  """GLIDE's/DiT's frequency embedding [B, dim] (float32) of times [B], the
  cosines first: cos(t f_i), sin(t f_i), f_i = max_period^(-i / (dim/2))."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
                  / half)
  args = time_B.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def sincos_position_embedding(height: int, width: int, dim: int) -> np.ndarray:
  """Fixed embedding [height * width, dim] float32 of a grid of tokens in
  row-major order (MAE's and DiT's): the first dim / 2 features encode the
  token's column, the last dim / 2 its row, each as sin(pos w_k) then
  cos(pos w_k), w_k = 10000^(-k / (dim / 4)), k < dim / 4 (float64)."""
  if dim % 4:
    raise ValueError(f"The position embedding needs dim % 4 == 0, not {dim}.")
  row, column = np.divmod(np.arange(height * width, dtype=np.float64), width)
  omega = 1.0 / 10000.0 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
  angles = lambda pos: pos[:, None] * omega[None]
  return np.concatenate([np.sin(angles(column)), np.cos(angles(column)),
                         np.sin(angles(row)), np.cos(angles(row))],
                        axis=1).astype(np.float32)


def modulate(x_BTD, shift_BD, scale_BD):
  """adaLN: x (1 + scale) + shift, per example."""
  return x_BTD * (1 + scale_BD[:, None]) + shift_BD[:, None]


def attention(q_BTNH, k_BTNH, v_BTNH):
  """softmax(q k^T / sqrt(H)) v per head [B, T, N, H], in q's dtype.

  `jax.nn.dot_product_attention` (XLA implementation): for bfloat16 inputs
  the logits q k^T come out of the matmul in float32 (bf16 x bf16 -> f32)
  and the softmax is computed in float32; only the probabilities that
  multiply v are rounded to bfloat16.
  """
  return jax.nn.dot_product_attention(q_BTNH, k_BTNH, v_BTNH).astype(
      q_BTNH.dtype)


def dense(features: int, dtype, name: str, zero: bool = False) -> nn.Dense:
  """A Dense as the official's nn.Linear: Xavier-uniform (or zero) kernel,
  zero bias, float32 parameters."""
  return nn.Dense(features, dtype=dtype, name=name,
                  kernel_init=zeros_init if zero else xavier_uniform,
                  bias_init=zeros_init)


def layer_norm(dtype) -> nn.LayerNorm:
  """LayerNorm without scale and bias, eps 1e-6 (statistics in float32)."""
  return nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False,
                      dtype=dtype)


class TimestepEmbedder(nn.Module):
  """time [B] -> [B, hidden_size]: frequency embedding, Dense, SiLU, Dense
  (kernels normal(0.02))."""
  hidden_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, time_B):
    init = nn.initializers.normal(0.02)
    h = timestep_embedding(time_B, FREQUENCY_EMBEDDING_SIZE)
    h = nn.Dense(self.hidden_size, kernel_init=init, dtype=self.dtype,
                 name="mlp_0")(h)
    return nn.Dense(self.hidden_size, kernel_init=init, dtype=self.dtype,
                    name="mlp_2")(nn.silu(h))


class Attention(nn.Module):
  """Multi-head self-attention over the tokens (timm's: one qkv Dense,
  heads of hidden_size / num_heads features, an output projection)."""
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BTD):
    b, t, d = x_BTD.shape
    qkv = dense(3 * d, self.dtype, "qkv")(x_BTD).reshape(
        b, t, 3, self.num_heads, d // self.num_heads)
    y = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]).reshape(b, t, d)
    return dense(d, self.dtype, "proj")(y)


class Mlp(nn.Module):
  """Dense(hidden), GELU (tanh approximation), Dense(back)."""
  hidden_features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BTD):
    h = nn.gelu(dense(self.hidden_features, self.dtype, "fc1")(x_BTD),
                approximate=True)
    return dense(x_BTD.shape[-1], self.dtype, "fc2")(h)


class DiTBlock(nn.Module):
  """x + gate * attn(modulate(LN(x))), then the same with the MLP; shift,
  scale and gate of both regressed from the conditioning c by a
  zero-initialised Dense (adaLN-Zero: the block starts as the identity)."""
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BTD, c_BD):
    d = x_BTD.shape[-1]
    (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp,
     gate_mlp) = jnp.split(dense(6 * d, self.dtype, "adaLN_modulation",
                                 zero=True)(nn.silu(c_BD)), 6, axis=-1)
    h = modulate(layer_norm(self.dtype)(x_BTD), shift_msa, scale_msa)
    x_BTD = x_BTD + gate_msa[:, None] * Attention(
        self.num_heads, self.dtype, name="attn")(h)
    h = modulate(layer_norm(self.dtype)(x_BTD), shift_mlp, scale_mlp)
    return x_BTD + gate_mlp[:, None] * Mlp(
        int(d * self.mlp_ratio), self.dtype, name="mlp")(h)


class FinalLayer(nn.Module):
  """modulate(LN(x)) by a zero-initialised adaLN, then a zero-initialised
  Dense to p * p * out_channels per token."""
  patch_size: int
  out_channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BTD, c_BD):
    shift, scale = jnp.split(dense(2 * x_BTD.shape[-1], self.dtype,
                                   "adaLN_modulation", zero=True)(
                                       nn.silu(c_BD)), 2, axis=-1)
    h = modulate(layer_norm(self.dtype)(x_BTD), shift, scale)
    return dense(self.patch_size ** 2 * self.out_channels, self.dtype,
                 "linear", zero=True)(h)


class DiT(nn.Module):
  """x_t [B, H, W, C] and time [B] (labels [B] int32 if conditional) ->
  the model output [B, H, W, C] (float32; 2C with learn_sigma, the noise's
  variance interpolation in the last C as the official DiT's): the noise,
  v or velocity, depending on the objective. H and W divisible by
  patch_size.

  Attributes:
    patch_size: the side p of the square patches; tokens = H W / p^2.
    hidden_size: features per token; divisible by num_heads and by 4.
    depth: transformer blocks.
    num_heads: attention heads.
    mlp_ratio: the MLP's hidden features / hidden_size.
    num_classes: > 0 adds a class embedding of num_classes + 1 rows (the
      last is "no label").
    learn_sigma: 2C output channels, the last C the variance's
      interpolation v (the official DiT's; config.model.learn_sigma,
      `diffusion.hybrid_loss_terms`).
    dtype: of the activations; parameters are float32.
    remat: "none", "blocks" (every transformer block recomputed in the
      backward pass, `layers.REMAT_POLICY`) or "full" (the whole network).
      The parameters and the gradients are the same.
  """
  patch_size: int = 2
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  num_classes: int = 0
  learn_sigma: bool = False
  dtype: Any = jnp.float32
  remat: str = "none"

  def __call__(self, x_BHWC, time_B, labels_B=None, train: bool = False):
    return layers.forward_maybe_remat(self, x_BHWC, time_B, labels_B, train)

  @nn.compact
  def forward(self, x_BHWC, time_B, labels_B=None, train: bool = False):
    """`__call__` without whole-network remat."""
    del train  # No dropout: labels are dropped by the family's step.
    b, height, width, channels = x_BHWC.shape
    p, d = self.patch_size, self.hidden_size
    if height % p or width % p:
      raise ValueError(f"DiT: image {height} x {width} is not divisible "
                       f"into patches of {p} x {p}.")
    if d % self.num_heads:
      raise ValueError(f"DiT: hidden_size {d} is not divisible by "
                       f"num_heads {self.num_heads}.")
    h, w = height // p, width // p
    x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID",
                kernel_init=patch_kernel_init, bias_init=zeros_init,
                dtype=self.dtype, name="x_embedder")(
                    x_BHWC.astype(self.dtype))
    x_BTD = x.reshape(b, h * w, d) + jnp.asarray(
        sincos_position_embedding(h, w, d), self.dtype)[None]

    c_BD = TimestepEmbedder(d, self.dtype, name="t_embedder")(time_B)
    if self.num_classes:
      if labels_B is None:
        raise ValueError("A conditional DiT needs labels (num_classes for "
                         "'no label').")
      c_BD = c_BD + nn.Embed(self.num_classes + 1, d, dtype=self.dtype,
                             embedding_init=nn.initializers.normal(0.02),
                             name="y_embedder")(labels_B)

    block_class = layers.remat_if(DiTBlock, self.remat == "blocks")
    for i in range(self.depth):
      x_BTD = block_class(self.num_heads, self.mlp_ratio, self.dtype,
                       name=f"blocks_{i}")(x_BTD, c_BD)
    out_channels = 2 * channels if self.learn_sigma else channels
    x_BTD = FinalLayer(p, out_channels, self.dtype, name="final_layer")(
        x_BTD, c_BD)
    # Unpatchify: token (i, j)'s p * p * C' features are the pixels of the
    # patch at rows i p .. i p + p - 1, columns j p .. (official 'nhwpqc').
    out = x_BTD.reshape(b, h, w, p, p, out_channels).transpose(
        0, 1, 3, 2, 4, 5).reshape(b, height, width, out_channels)
    return out.astype(jnp.float32)


def dit_forward_flops(height: int, width: int, channels: int,
                      patch_size: int, hidden_size: int, depth: int,
                      mlp_ratio: float = 4.0, learn_sigma: bool = False
                      ) -> int:
  """Multiply-adds of one example's forward pass through the matmuls and
  convolutions (the DiT paper's "Gflops"; XLA's cost analysis counts each
  as 2 flops, plus the elementwise work): patch embedding, time MLP, per
  block adaLN, qkv, q k^T, the weighted sum of v, the projection and the
  MLP, and the final adaLN and linear map (the class embedding is a
  lookup)."""
  t, d, p = (height // patch_size) * (width // patch_size), hidden_size, (
      patch_size)
  mlp = int(d * mlp_ratio)
  out_channels = 2 * channels if learn_sigma else channels
  patch_embed = t * p * p * channels * d
  time_mlp = FREQUENCY_EMBEDDING_SIZE * d + d * d
  block = (d * 6 * d  # adaLN modulation.
           + t * d * 3 * d + 2 * t * t * d + t * d * d  # qkv, attention, proj.
           + 2 * t * d * mlp)  # MLP.
  final = d * 2 * d + t * d * p * p * out_channels
  return patch_embed + time_mlp + depth * block + final
