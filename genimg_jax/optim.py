"""Optimizers from config: optax transformations with a learning-rate
schedule; the warm-up of parameter EMAs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def learning_rate_schedule(opt_config, num_steps: int):
  """The learning rate of `opt_config`: a float ("constant") or an optax
  schedule ("cosine": linear warm-up over `warmup_steps`, then cosine decay
  to 0 at `num_steps`)."""
  if opt_config.schedule == "constant":
    return opt_config.learning_rate
  if opt_config.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, opt_config.learning_rate, opt_config.warmup_steps,
        max(num_steps, opt_config.warmup_steps + 1))
  raise ValueError(f"Unknown optimizer.schedule {opt_config.schedule!r}; "
                   "use 'constant' or 'cosine'.")


def learning_rates(optimizer_config, num_steps: int, step: int) -> dict:
  """{name: learning rate} used by the update at `step`: "learning_rate" for
  one optimizer, "learning_rate_NAME" for each of several (GANs' generator
  and discriminator)."""
  if "schedule" in optimizer_config:
    named = {"": optimizer_config}
  else:
    named = {f"_{k}": v for k, v in optimizer_config.items()}
  rates = {}
  for suffix, opt_config in named.items():
    lr = learning_rate_schedule(opt_config, num_steps)
    rates["learning_rate" + suffix] = float(lr(step) if callable(lr) else lr)
  return rates


def make_optimizer(opt_config, num_steps: int) -> optax.GradientTransformation:
  """An optax optimizer from `opt_config` (name, learning_rate, schedule:
  see `learning_rate_schedule`, b1, b2, momentum, weight_decay, grad_clip)."""
  lr = learning_rate_schedule(opt_config, num_steps)
  if opt_config.name == "adam":
    tx = optax.adamw(lr, b1=opt_config.b1, b2=opt_config.b2,
                     weight_decay=opt_config.weight_decay)
  elif opt_config.name == "sgd":
    tx = optax.chain(optax.add_decayed_weights(opt_config.weight_decay),
                     optax.sgd(lr, momentum=opt_config.momentum,
                               nesterov=True))
  else:
    raise ValueError(f"Unknown optimizer.name {opt_config.name!r}; use "
                     "'adam' or 'sgd'.")
  grad_clip = opt_config.get("grad_clip", 0.0)
  if grad_clip:
    tx = optax.chain(optax.clip_by_global_norm(grad_clip), tx)
  return tx


def ema_decay_at(step, ema_decay: float) -> jax.Array:
  """The EMA decay used by the update at `step` (0-based): min(ema_decay,
  (1 + step) / (10 + step)), a warm-up so the initial weights fade fast."""
  return jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))
