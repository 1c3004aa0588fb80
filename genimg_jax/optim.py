"""Optimizers from config: optax transformations with a learning-rate
schedule; the warm-up of parameter EMAs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def learning_rate_schedule(opt_config, num_steps: int):
  """The learning rate of `opt_config`, a float or an optax schedule of the
  0-based update count. Both schedules first rise linearly from 0 to
  `learning_rate` over `warmup_steps` (0: no warm-up; the update at step s <
  warmup_steps uses learning_rate * s / warmup_steps, DDPM's warm-up), then
  "constant" stays there (a float when there is no warm-up) and "cosine"
  decays to 0 at `num_steps`."""
  if opt_config.schedule == "constant":
    warmup_steps = opt_config.get("warmup_steps", 0)
    if warmup_steps <= 0:
      return opt_config.learning_rate
    return optax.warmup_constant_schedule(0.0, opt_config.learning_rate,
                                          warmup_steps)
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


def ema_decay_at(step, ema_decay: float, warmup: bool = True) -> jax.Array:
  """The EMA decay used by the update at `step` (0-based), float32 []:
  with `warmup`, min(ema_decay, (1 + step) / (10 + step)) (so the initial
  weights fade fast; 0.999 is reached at step 8,990, 0.9999 at 89,990);
  without, `ema_decay` from the first update (DDPM)."""
  if not warmup:
    return jnp.full((), ema_decay, jnp.float32)
  return jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))
