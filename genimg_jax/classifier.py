"""CNN image classifiers: the seed CNN, a small ResNet, and their pure steps.

The networks are in `genimg_jax.nets` (`nets.cnn`, `nets.resnet`).

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

from genimg_jax import data, optim, parallel
from genimg_jax.nets.cnn import CNN  # pylint: disable=unused-import
from genimg_jax.nets.resnet import ResidualBlock, ResNet  # pylint: disable=unused-import


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
