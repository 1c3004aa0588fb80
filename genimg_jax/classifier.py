"""CNN image classifiers: the seed CNN, a small ResNet, and their pure steps.

The ResNet is also the feature network of the sample-quality metrics: its
penultimate activations (`features`) and its class probabilities.

Steps:
  train_step(state, batch, rng) -> (state, metrics)   batch: image uint8
      [B, H, W, C], label int32 [B]; rng: augmentation (flip/crop) only.
  eval_step(state, batch) -> sums                       batch adds mask [B].
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state

from genimg_jax import data, layers, optim, parallel


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


def make_model(model_config: ml_collections.ConfigDict,
               num_classes: int) -> nn.Module:
  """The classifier that `model_config.name` names ("cnn" or "resnet")."""
  dtype = jnp.dtype(model_config.dtype)
  if model_config.name == "cnn":
    return CNN(num_classes, dtype)
  if model_config.name == "resnet":
    return ResNet(num_classes, model_config.width,
                  tuple(model_config.blocks_per_stage), dtype)
  raise ValueError(f"Unknown classifier model.name {model_config.name!r}; "
                   "use 'cnn' or 'resnet'.")


class TrainState(train_state.TrainState):
  """Parameters, optimizer state, step and BatchNorm statistics (or {})."""
  batch_stats: Any = None


def to_float(image_uint8: jax.Array) -> jax.Array:
  """uint8 pixels [0, 255] -> float32 [0, 1], on device."""
  return image_uint8.astype(jnp.float32) / 255.0


def augment(images_BHWC: jax.Array, rng: jax.Array, pad: int = 2,
            flip: bool = True) -> jax.Array:
  """Random horizontal flips and random crops after zero padding by `pad`.

  rng: draws one flip and one (dy, dx) shift per example.
  """
  b, h, w, _ = images_BHWC.shape
  flip_rng, shift_rng = jax.random.split(rng)
  if flip:
    flips = jax.random.bernoulli(flip_rng, 0.5, (b,))
    images_BHWC = jnp.where(flips[:, None, None, None],
                            images_BHWC[:, :, ::-1], images_BHWC)
  if pad:
    padded = jnp.pad(images_BHWC, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    shifts = jax.random.randint(shift_rng, (b, 2), 0, 2 * pad + 1)
    crop = lambda img, s: jax.lax.dynamic_slice(
        img, (s[0], s[1], 0), (h, w, img.shape[-1]))
    images_BHWC = jax.vmap(crop)(padded, shifts)
  return images_BHWC


def create_train_state(config: ml_collections.ConfigDict, rng: jax.Array,
                       num_steps: int) -> TrainState:
  """A fresh state for `config`. rng: parameter initialisation."""
  model = make_model(config.model, config.data.num_classes)
  dummy = jnp.zeros((1, *config.data.image_shape), jnp.float32)
  variables = model.init(rng, dummy, train=False)
  return TrainState.create(
      apply_fn=model.apply, params=variables["params"],
      batch_stats=variables.get("batch_stats", {}),
      tx=optim.make_optimizer(config.optimizer, num_steps))


def train_step(state: TrainState, batch: dict, rng: jax.Array, *,
               augment_images: bool = False,
               flip: bool = True) -> tuple[TrainState, dict]:
  """One optimizer step on the cross-entropy. rng: augmentation draws.

  augment_images: random crops, and horizontal flips if `flip` (not for
  digits, whose mirror images are not digits).

  Metrics (scalars): loss and accuracy of the batch before the update, the
  gradient's global norm, and the updated parameters' global norm.
  """
  rng = jax.random.fold_in(rng, state.step)
  images = to_float(batch["image"])
  if augment_images:
    images = augment(images, rng, flip=flip)

  def loss_fn(params):
    variables = {"params": params, "batch_stats": state.batch_stats}
    logits, updates = state.apply_fn(variables, images, train=True,
                                     mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["label"]).mean()
    return loss, (logits, updates.get("batch_stats", {}))

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
  return state, {"loss": loss, "accuracy": accuracy,
                 "grad_norm": optax.tree.norm(grads),
                 "param_norm": optax.tree.norm(state.params)}


def eval_step(state: TrainState, batch: dict) -> dict:
  """Sums over the real (mask 1) examples: loss_sum, correct, count."""
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  logits = state.apply_fn(variables, to_float(batch["image"]), train=False)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits,
                                                           batch["label"])
  mask = batch["mask"]
  return {"loss_sum": jnp.sum(losses * mask),
          "correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask),
          "count": jnp.sum(mask)}


def make_evaluator(config, mesh, eval_source, workdir):
  """evaluator(state, step) -> {"loss", "accuracy"} over all of eval_source."""
  del workdir  # Classifiers write no images.
  step_fn = jax.jit(eval_step, in_shardings=(parallel.replicated(mesh),
                                             parallel.data_sharding(mesh)),
                    out_shardings=parallel.replicated(mesh),
                    compiler_options=parallel.compiler_options(config, mesh))

  def evaluator(state, step):
    del step
    sums = data.sum_over_split(step_fn, state, eval_source,
                               config.eval_batch_size, mesh)
    return {"loss": float(sums["loss_sum"] / sums["count"]),
            "accuracy": float(sums["correct"] / sums["count"])}
  return evaluator


def bind_train_step(config: ml_collections.ConfigDict, mesh=None):
  """The train step with the config's static choices bound."""
  del mesh  # Every intermediate follows the sharded batch.
  return functools.partial(train_step, augment_images=config.augment,
                           flip=config.get("augment_flip", True))
