"""Optimizers from config: the learning-rate warm-up of both schedules, as
logged and as applied, and the two EMA decay settings."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from genimg_jax import optim
from experiments import common


def _constant(warmup_steps):
  opt = common.get_optimizer_config("sgd", 2e-4, "constant", warmup_steps)
  opt.grad_clip = 0.0
  return opt


def test_constant_schedule_warms_up_linearly():
  """lr(s) = 2e-4 min(1, s / 5000): DDPM's warm-up, then constant."""
  lr = optim.learning_rate_schedule(_constant(5000), 800000)
  assert callable(lr)
  for step, want in ((0, 0.0), (1, 4e-8), (2500, 1e-4), (4999, 1.9996e-4),
                     (5000, 2e-4), (5001, 2e-4), (800000, 2e-4)):
    # float32: (2e-4 - 2e-4 (1 - s / 5000)) cancels near s = 0.
    assert float(lr(step)) == pytest.approx(want, rel=1e-5, abs=1e-10), step
  rates = lambda step: optim.learning_rates(_constant(5000), 800000, step)
  assert rates(2500) == pytest.approx({"learning_rate": 1e-4})


def test_constant_schedule_without_warmup_is_the_bare_rate():
  """warmup_steps 0 (the GANs' common.adam()): the float itself, as before."""
  assert optim.learning_rate_schedule(common.adam(), 30000) == 2e-4
  assert optim.learning_rates(common.adam(), 30000, 0) == {
      "learning_rate": 2e-4}
  bare = ml_collections.ConfigDict({"learning_rate": 2e-4,
                                    "schedule": "constant"})
  assert optim.learning_rate_schedule(bare, 100) == 2e-4


def test_the_optimizer_applies_the_warmup():
  """SGD (no momentum): the update at step s is -lr(s) * grad, so the rate
  reaches the parameters, not only the log."""
  tx = optim.make_optimizer(_constant(4), 100)
  params = {"w": jnp.zeros(())}
  state = tx.init(params)
  applied = []
  for _ in range(6):
    updates, state = tx.update({"w": jnp.ones(())}, state, params)
    applied.append(-float(updates["w"]))
  np.testing.assert_allclose(applied, [0.0, 5e-5, 1e-4, 1.5e-4, 2e-4, 2e-4],
                             rtol=1e-6, atol=1e-12)


def test_ema_decay_with_and_without_warmup():
  at = lambda step, warmup: float(optim.ema_decay_at(step, 0.9999, warmup))
  # The warm-up: min(0.9999, (1 + t) / (10 + t)).
  assert at(0, True) == pytest.approx(0.1)
  assert at(1, True) == pytest.approx(2 / 11)
  assert at(890, True) == pytest.approx(0.99, rel=1e-6)
  assert at(89990, True) == pytest.approx(0.9999, rel=1e-6)
  assert at(200000, True) == pytest.approx(0.9999, rel=1e-6)
  # Without: the decay from the first update (DDPM).
  for step in (0, 1, 890, 200000):
    assert at(step, False) == pytest.approx(0.9999, rel=1e-7)
  assert optim.ema_decay_at(jnp.int32(3), 0.9, False).dtype == jnp.float32
  assert float(optim.ema_decay_at(jnp.int32(3), 0.999)) == pytest.approx(
      4 / 13)
