"""Samplers of the diffusion family: pure functions over a whole trajectory.

Every sampler runs its steps in one `jax.lax.scan` (one compiled loop, no
Python dispatch per step) and is sharded like its input: x [B, H, W, C]
sharded on the batch gives sharded model calls and a sharded result.

Diffusion (objectives "eps" and "v") takes `denoise_fn(x_t, t) ->
(x0_hat, eps_hat)` at an integer step t of the schedule `alpha_bars` [T]
(see `diffusion.make_denoise_fn`); flow matching takes `velocity_fn(x_t, t)
-> v` at a time t in [0, 1] (t = 0 noise, t = 1 data).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

DIFFUSION_SAMPLERS = ("ddpm", "ddim")
FLOW_SAMPLERS = ("euler", "heun")


def ddpm_sample(denoise_fn, alpha_bars, x_T, rng):
  """DDPM ancestral sampling over all T steps (Ho et al. 2020, Alg. 2 with
  the posterior variance beta~_t): x_{t-1} ~ q(x_{t-1} | x_t, x0_hat),

    mean = sqrt(ab_{t-1}) beta_t / (1 - ab_t) x0_hat
           + sqrt(1 - beta_t) (1 - ab_{t-1}) / (1 - ab_t) x_t,
    variance = beta_t (1 - ab_{t-1}) / (1 - ab_t)   (0 at t = 0).

  alpha_bars: [T] numpy (the coefficients are computed in float64). x_T:
  N(0, I) noise [B, H, W, C]. rng: the noise of step t is drawn from
  fold_in(rng, t). Returns x_0 [B, H, W, C].
  """
  ab = np.asarray(alpha_bars, np.float64)
  prev = np.concatenate([[1.0], ab[:-1]])
  beta = 1.0 - ab / prev
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  coef_x0 = f32(np.sqrt(prev) * beta / (1.0 - ab))
  coef_xt = f32(np.sqrt(1.0 - beta) * (1.0 - prev) / (1.0 - ab))
  std = f32(np.sqrt(beta * (1.0 - prev) / (1.0 - ab)))

  def step(x, t):
    x0, _ = denoise_fn(x, t)
    noise = jax.random.normal(jax.random.fold_in(rng, t), x.shape, x.dtype)
    return coef_x0[t] * x0 + coef_xt[t] * x + std[t] * noise, None

  x, _ = jax.lax.scan(step, x_T, jnp.arange(len(ab) - 1, -1, -1))
  return x


def ddim_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
  """The steps a DDIM run visits, [num_steps + 1] int32: "trailing" spacing
  (Lin et al. 2024) from T - 1 down, e.g. T = 1000, 10 steps: 999, 899, ...,
  99, then -1 (the clean image, alpha-bar 1)."""
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"DDIM steps must be in 1..{num_timesteps}, got "
                     f"{num_steps}.")
  steps = np.round(np.arange(num_timesteps, 0, -num_timesteps / num_steps))
  return np.append(steps.astype(np.int32) - 1, -1).astype(np.int32)


def ddim_sample(denoise_fn, alpha_bars, x, timesteps, eta: float = 0.0,
                rng=None):
  """DDIM (Song et al. 2021, eq. 12) through `timesteps` [S + 1] in order:
  x_next = sqrt(ab_next) x0_hat + sqrt(1 - ab_next - sigma^2) eps_hat
  + sigma z, sigma = eta sqrt((1 - ab_next) / (1 - ab)) sqrt(1 - ab / ab_next).

  alpha_bars [T] and timesteps are numpy (the coefficients are computed in
  float64). Step -1 has alpha-bar 1 (the clean image). eta = 0 is
  deterministic (rng unused) and may run either way: increasing timesteps
  invert the sampler (DDIM encoding). eta = 1 over all T steps is DDPM's
  ancestral sampler. rng: the noise of step i is drawn from fold_in(rng, i).
  """
  ab = np.asarray(alpha_bars, np.float64)
  timesteps = np.asarray(timesteps)
  ab_all = np.where(timesteps >= 0, ab[np.maximum(timesteps, 0)], 1.0)
  ab_now, ab_next = ab_all[:-1], ab_all[1:]
  sigma = np.zeros_like(ab_now)
  if eta:
    sigma = eta * np.sqrt((1.0 - ab_next) / (1.0 - ab_now) *
                          (1.0 - ab_now / ab_next))
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  coef_x0, coef_eps = f32(np.sqrt(ab_next)), f32(
      np.sqrt(np.maximum(1.0 - ab_next - sigma ** 2, 0.0)))
  sigma, steps = f32(sigma), jnp.asarray(timesteps[:-1], jnp.int32)

  def step(x, i):
    x0, eps = denoise_fn(x, steps[i])
    x_next = coef_x0[i] * x0 + coef_eps[i] * eps
    if eta:
      x_next += sigma[i] * jax.random.normal(jax.random.fold_in(rng, i),
                                             x.shape, x.dtype)
    return x_next, None

  x, _ = jax.lax.scan(step, x, jnp.arange(len(timesteps) - 1))
  return x


def euler_sample(velocity_fn, x, num_steps: int):
  """Euler's method for dx/dt = v(x, t) from t = 0 (x: noise) to t = 1
  in `num_steps` equal steps. Exact when the trajectories are straight
  lines travelled at constant speed."""
  dt = 1.0 / num_steps

  def step(x, i):
    return x + dt * velocity_fn(x, i * dt), None

  x, _ = jax.lax.scan(step, x, jnp.arange(num_steps, dtype=jnp.float32))
  return x


def heun_sample(velocity_fn, x, num_steps: int):
  """Heun's second-order method for dx/dt = v(x, t) from t = 0 to t = 1 in
  `num_steps` equal steps, the last one Euler's as in EDM (Karras et al.
  2022, Alg. 1): v is never evaluated at t = 1, where a flow model's target
  x - eps cannot be predicted from clean data. 2 num_steps - 1 evaluations;
  still second order (one first-order step of size 1 / num_steps)."""
  dt = 1.0 / num_steps

  def step(x, i):
    t = i * dt
    v = velocity_fn(x, t)
    v_next = velocity_fn(x + dt * v, t + dt)
    return x + 0.5 * dt * (v + v_next), None

  x, _ = jax.lax.scan(step, x, jnp.arange(num_steps - 1, dtype=jnp.float32))
  return x + dt * velocity_fn(x, (num_steps - 1) * dt)
