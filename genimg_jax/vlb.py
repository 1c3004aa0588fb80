"""The variational bound of a diffusion network that learns its variance
(Improved DDPM, Nichol & Dhariwal 2021; DiT's `learn_sigma`), with the
formulas of openai/guided-diffusion and facebookresearch/DiT
(`diffusion_utils.py`, `GaussianDiffusion._vb_terms_bpd`).

The reverse step is p(x_{t-1} | x_t) = N(mu, Sigma): mu the posterior mean
of q(x_{t-1} | x_t, x0_hat), log Sigma = `samplers.learned_log_variance`.
Its term of the bound at step t, per example in bits per dimension:
  t > 0: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t));
  t = 0: -log p(x_0 | x_1) under a Gaussian discretized to 256 bins of
         width 2/255 on [-1, 1] (the outer bins open), as for 8-bit images.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from genimg_jax import samplers


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in
  nats (arrays broadcast)."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
  """Phi(x) by guided-diffusion's tanh approximation (within 2e-4)."""
  return 0.5 * (1.0 + jnp.tanh(np.sqrt(2.0 / np.pi) *
                               (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
  """log P(x) elementwise, in nats, of x in [-1, 1] (8-bit values rescaled)
  under N(means, exp(log_scales)^2) integrated over x's bin [x - 1/255,
  x + 1/255]; the bin of x < -0.999 extends to -inf, that of x > 0.999 to
  +inf. Probabilities are floored at 1e-12."""
  inv_std = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_std * (x - means + 1.0 / 255.0))
  cdf_min = approx_standard_normal_cdf(inv_std * (x - means - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus,
                   jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def vlb_term_bits(x0, x_t, x0_hat, frac, t_B, alpha_bars):
  """L_t per example [B] in bits per dimension (float32): the KL for
  t > 0, the decoder's negative log-likelihood of x0 at t = 0.

  x0, x_t, x0_hat (the network's prediction of x0, not clipped), frac (the
  learned-range interpolation, `samplers.learned_log_variance`): [B, H, W,
  C]; t_B: int [B]; alpha_bars: [T] numpy (tables computed in float64).
  """
  f32 = lambda v: jnp.asarray(v, jnp.float32)[t_B][:, None, None, None]
  coef_x0, coef_xt, _ = samplers.ddpm_tables(alpha_bars)
  min_log, max_log = samplers.learned_log_variance_range(alpha_bars)
  coef_x0, coef_xt, min_log, max_log = map(f32, (coef_x0, coef_xt, min_log,
                                                 max_log))
  true_mean = coef_x0 * x0 + coef_xt * x_t
  mean = coef_x0 * x0_hat + coef_xt * x_t
  log_var = samplers.learned_log_variance(frac, min_log, max_log)
  kl = normal_kl(true_mean, min_log, mean, log_var)
  nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)
  per_dim = lambda v: jnp.mean(v, axis=tuple(range(1, v.ndim))) / np.log(2.0)
  return jnp.where(t_B == 0, per_dim(nll), per_dim(kl))
