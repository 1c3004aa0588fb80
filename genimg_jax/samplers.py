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
DDPM_VARIANCES = ("fixedsmall", "fixedlarge")  # See `ddpm_tables`.
LEARNED = "learned"  # ddpm_sample's variance of a learn_sigma network.
DDIM_SPACINGS = ("trailing", "leading", "uniform", "quadratic")


def ddpm_tables(alpha_bars, variance: str = "fixedsmall"):
  """(coef_x0, coef_xt, std), each [T] float64, of DDPM's step t -> t - 1:
  x_{t-1} = coef_x0[t] x0_hat + coef_xt[t] x_t + std[t] z, with

    coef_x0 = sqrt(ab_{t-1}) beta_t / (1 - ab_t),
    coef_xt = sqrt(1 - beta_t) (1 - ab_{t-1}) / (1 - ab_t)

  (the mean of the posterior q(x_{t-1} | x_t, x0_hat), ab_{-1} = 1) and
  std^2 = beta~_t = beta_t (1 - ab_{t-1}) / (1 - ab_t) ("fixedsmall") or
  beta_t ("fixedlarge", DDPM's CIFAR-10 setting). The last step (t = 0) adds
  no noise with either (std[0] = 0, DDPM's noise mask).
  """
  if variance not in DDPM_VARIANCES:
    raise ValueError(f"Unknown DDPM variance {variance!r}; choose from "
                     f"{DDPM_VARIANCES}.")
  ab = np.asarray(alpha_bars, np.float64)
  prev = np.concatenate([[1.0], ab[:-1]])
  beta = 1.0 - ab / prev
  coef_x0 = np.sqrt(prev) * beta / (1.0 - ab)
  coef_xt = np.sqrt(1.0 - beta) * (1.0 - prev) / (1.0 - ab)
  if variance == "fixedsmall":
    var = beta * (1.0 - prev) / (1.0 - ab)
  else:
    var = beta.copy()
  var[0] = 0.0
  return coef_x0, coef_xt, np.sqrt(var)


def learned_log_variance_range(alpha_bars):
  """(min_log, max_log), each [T] float64: the ends of Improved DDPM's
  learned-range variance (Nichol & Dhariwal 2021), log beta~_t and
  log beta_t. beta~_0 = 0, so min_log[0] is log beta~_1 (guided-diffusion's
  `posterior_log_variance_clipped`)."""
  ab = np.asarray(alpha_bars, np.float64)
  prev = np.concatenate([[1.0], ab[:-1]])
  beta = 1.0 - ab / prev
  posterior = beta * (1.0 - prev) / (1.0 - ab)
  return np.log(np.concatenate([posterior[1:2], posterior[1:]])), np.log(beta)


def learned_log_variance(frac, min_log_t, max_log_t):
  """log Sigma = frac log beta_t + (1 - frac) log beta~_t; frac = (v + 1) / 2
  of the network's variance output v (0: beta~_t, 1: beta_t)."""
  return frac * max_log_t + (1.0 - frac) * min_log_t


def ddpm_sample(denoise_fn, alpha_bars, x_T, rng,
                variance: str = "fixedsmall"):
  """DDPM ancestral sampling over all T steps (Ho et al. 2020, Alg. 2):
  x_{t-1} = posterior mean(x_t, x0_hat) + std_t z, see `ddpm_tables` for
  the coefficients and the two fixed variances ("fixedsmall": beta~_t, the
  default; "fixedlarge": beta_t). variance "learned" (`LEARNED`, a network
  with learn_sigma): denoise_fn returns (x0_hat, eps_hat, frac) and the
  step's variance is exp(`learned_log_variance`) per pixel, none at t = 0.

  alpha_bars: [T] numpy (the coefficients are computed in float64). x_T:
  N(0, I) noise [B, H, W, C]. rng: the noise of step t is drawn from
  fold_in(rng, t). Returns x_0 [B, H, W, C].
  """
  learned = variance == LEARNED
  coef_x0, coef_xt, std = (jnp.asarray(v, jnp.float32) for v in ddpm_tables(
      alpha_bars, "fixedsmall" if learned else variance))
  min_log, max_log = (jnp.asarray(v, jnp.float32)
                      for v in learned_log_variance_range(alpha_bars))

  def step(x, t):
    out = denoise_fn(x, t)
    x0 = out[0]
    noise = jax.random.normal(jax.random.fold_in(rng, t), x.shape, x.dtype)
    if learned:
      std_t = jnp.where(t > 0, jnp.exp(0.5 * learned_log_variance(
          out[2], min_log[t], max_log[t])), 0.0)
    else:
      std_t = std[t]
    return coef_x0[t] * x0 + coef_xt[t] * x + std_t * noise, None

  x, _ = jax.lax.scan(step, x_T, jnp.arange(len(std) - 1, -1, -1))
  return x


def ddim_timesteps(num_timesteps: int, num_steps: int,
                   spacing: str = "trailing") -> np.ndarray:
  """The steps a DDIM run visits, strictly decreasing, ending at -1 (the
  clean image, alpha-bar 1), int32. T = num_timesteps, S = num_steps:

    "trailing" (Lin et al. 2024; the default): round(T (S - i) / S) - 1 for
        i = 0 .. S-1 (ties to even, in integers), from T - 1 down, e.g.
        T = 1000, S = 10: 999, 899, ..., 99, -1.
    "leading" (diffusers' timestep_spacing="leading", steps_offset 0):
        (T // S) i for i = S-1 .. 0, e.g. 900, 800, ..., 0, -1.
    "uniform" (DDIM's skip_type="uniform"): range(0, T, T // S) reversed;
        the same as "leading" when S divides T, else more than S steps
        (T = 1000, S = 300: 334).
    "quadratic" (DDIM's CIFAR-10 table): int(c^2) for c in linspace(0,
        sqrt(0.8 T), S), from 0.8 T down; duplicates (DDIM's no-op steps,
        for S > sqrt(0.8 T) + 1) are dropped, so fewer than S steps then.

  "trailing" and "leading" take exactly S steps ([S + 1] entries).
  """
  if spacing not in DDIM_SPACINGS:
    raise ValueError(f"Unknown DDIM spacing {spacing!r}; choose from "
                     f"{DDIM_SPACINGS}.")
  T, S = int(num_timesteps), int(num_steps)
  if not 1 <= S <= T:
    raise ValueError(f"DDIM steps must be in 1..{T}, got {S}.")
  if spacing == "trailing":
    q, r = np.divmod((S - np.arange(S, dtype=np.int64)) * T, S)
    steps = q + ((2 * r > S) | ((2 * r == S) & (q % 2 == 1))) - 1
  elif spacing == "leading":
    steps = np.arange(S - 1, -1, -1, dtype=np.int64) * (T // S)
  elif spacing == "uniform":
    steps = np.arange(0, T, T // S, dtype=np.int64)[::-1]
  else:  # DDIM's expression, float64 as in its code.
    steps = np.unique((np.linspace(0, np.sqrt(T * 0.8), S) ** 2).astype(
        np.int64))[::-1]
  return np.append(steps, -1).astype(np.int32)


def check_ddim_timesteps(timesteps, num_timesteps: int,
                         eta: float = 0.0) -> np.ndarray:
  """`timesteps` as int32 [S + 1] if `ddim_sample` can run it, else
  ValueError: strictly decreasing and ending at -1 (sampling), or strictly
  increasing and starting at -1 with eta = 0 (inversion); every other entry
  in 0..T-1 (no network call at a step outside the schedule)."""
  ts = np.asarray(timesteps)
  if ts.ndim != 1 or len(ts) < 2 or not np.issubdtype(ts.dtype, np.integer):
    raise ValueError(f"DDIM timesteps must be >= 2 integers, got {ts!r}.")
  diffs = np.diff(ts)
  if np.all(diffs < 0):
    end, inner = ts[-1], ts[:-1]
  elif np.all(diffs > 0):
    if eta:
      raise ValueError("Increasing DDIM timesteps (inversion) need eta = 0, "
                       f"got eta = {eta}.")
    end, inner = ts[0], ts[1:]
  else:
    raise ValueError(f"DDIM timesteps must be strictly monotone, got {ts}.")
  if end != -1 or inner.min() < 0 or inner.max() >= num_timesteps:
    raise ValueError(
        f"DDIM timesteps must run from steps in 0..{num_timesteps - 1} down "
        f"to -1 (or up from -1, inverting), got {ts}.")
  return ts.astype(np.int32)


def ddim_sample(denoise_fn, alpha_bars, x, timesteps, eta: float = 0.0,
                rng=None):
  """DDIM (Song et al. 2021, eq. 12) through `timesteps` [S + 1] in order:
  x_next = sqrt(ab_next) x0_hat + sqrt(1 - ab_next - sigma^2) eps_hat
  + sigma z, sigma = eta sqrt((1 - ab_next) / (1 - ab)) sqrt(1 - ab / ab_next).

  alpha_bars [T] and timesteps are numpy (the coefficients are computed in
  float64); `check_ddim_timesteps` says which tables run. Step -1 has
  alpha-bar 1 (the clean image). Decreasing timesteps sample: the network
  is called at each step but the last. eta = 0 is deterministic (rng
  unused); eta = 1 over all T steps is DDPM's ancestral sampler. Increasing
  timesteps from -1 (eta = 0) invert the sampler (DDIM encoding, as
  diffusers' DDIMInverseScheduler): the step t -> t' takes eps_hat from the
  network at t' and x0_hat = (x - sqrt(1 - ab_t) eps_hat) / sqrt(ab_t).
  rng: the noise of step i is drawn from fold_in(rng, i).
  """
  ab = np.asarray(alpha_bars, np.float64)
  timesteps = check_ddim_timesteps(timesteps, len(ab), eta)
  inverse = bool(timesteps[1] > timesteps[0])
  ab_all = np.where(timesteps >= 0, ab[np.maximum(timesteps, 0)], 1.0)
  ab_now, ab_next = ab_all[:-1], ab_all[1:]
  sigma = np.zeros_like(ab_now)
  if eta:
    sigma = eta * np.sqrt((1.0 - ab_next) / (1.0 - ab_now) *
                          (1.0 - ab_now / ab_next))
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  coef_x0, coef_eps = f32(np.sqrt(ab_next)), f32(
      np.sqrt(np.maximum(1.0 - ab_next - sigma ** 2, 0.0)))
  sqrt_ab_now, sqrt_one_minus_ab_now = f32(np.sqrt(ab_now)), f32(
      np.sqrt(1.0 - ab_now))
  sigma = f32(sigma)
  steps = jnp.asarray(timesteps[1:] if inverse else timesteps[:-1])

  def step(x, i):
    x0, eps = denoise_fn(x, steps[i])
    if inverse:  # x is at the step it leaves, not at the network's step.
      x0 = (x - sqrt_one_minus_ab_now[i] * eps) / sqrt_ab_now[i]
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
