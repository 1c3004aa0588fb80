"""The autoencoder family (experiments/autoencoder_kl.py): the loss by hand,
a few training steps, and `genimg export-autoencoder` read back by
`autoencoder.load` with the scaling factor."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genimg_jax import autoencoder, autoencoder_family, data, parallel, train
from conftest import tiny_config

# Two levels (one halving: 28 x 28 -> 14 x 14 x 2), 4 groups.
MINI_AE = {"autoencoder.block_out_channels": "(8, 16)",
           "autoencoder.norm_num_groups": 4,
           "autoencoder.latent_channels": 2}


def test_loss_terms_by_hand():
  rng = np.random.default_rng(0)
  mean, logvar = rng.normal(size=(2, 3, 3, 2)), rng.normal(size=(2, 3, 3, 2))
  kl = np.asarray(autoencoder_family.kl_to_standard_normal(
      jnp.asarray(mean), jnp.asarray(logvar)))
  # KL(N(m, s^2) || N(0, 1)) = log(1/s) + (s^2 + m^2) / 2 - 1/2 per element.
  s2 = np.exp(logvar)
  want = np.sum(-0.5 * logvar + 0.5 * (s2 + mean ** 2) - 0.5, axis=(1, 2, 3))
  np.testing.assert_allclose(kl, want, rtol=1e-5)
  x, y = rng.normal(size=(2, 4, 4, 1)), rng.normal(size=(2, 4, 4, 1))
  np.testing.assert_allclose(autoencoder_family.reconstruction_error(
      "l1", jnp.asarray(x), jnp.asarray(y)), np.abs(x - y).sum((1, 2, 3)),
                             rtol=1e-5)
  np.testing.assert_allclose(autoencoder_family.reconstruction_error(
      "l2", jnp.asarray(x), jnp.asarray(y)), ((x - y) ** 2).sum((1, 2, 3)),
                             rtol=1e-5)


def test_trains_evaluates_and_exports(tmp_path, idx_dir):
  config = tiny_config(idx_dir, "autoencoder_kl.py", **MINI_AE,
                       **{"mesh.num_devices": 2, "num_steps": 4})
  workdir = str(tmp_path / "run")
  state, metrics = train.train_and_evaluate(config, workdir)
  assert set(metrics) == {"l1", "mse", "psnr", "kl"}
  assert all(np.isfinite(v) for v in metrics.values())
  # psnr is that of the mse, peak-to-peak 2 ([-1, 1]).
  assert metrics["psnr"] == pytest.approx(10 * np.log10(4 / metrics["mse"]))
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  steps = [r for r in rows if r["split"] == "train"]
  assert [r["step"] for r in steps] == [1, 2, 3, 4]
  assert all(np.isfinite(r[k]) for r in steps for k in ("loss", "rec", "kl"))
  assert os.path.isfile(os.path.join(workdir, "samples", "recon_000004.png"))

  output = str(tmp_path / "ae.msgpack")
  meta = train.export_autoencoder(workdir, output)
  model, variables = autoencoder.load(output)
  assert model.block_out_channels == (8, 16) and model.in_channels == 1
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params),
               variables["params"])
  # The scaling factor by hand: 1 / std of z over the first training batch.
  source = data.load_split(config.data, "train")
  indices = np.sort(data.global_batch_indices(len(source), 16, 0, 0))
  x = source.take(indices)["image"].astype(np.float32) / 127.5 - 1
  mean, logvar = model.apply(variables, x, method="encode")
  eps = np.random.default_rng(0).standard_normal(mean.shape)
  z = np.asarray(mean) + np.exp(0.5 * np.asarray(logvar)) * eps
  assert model.scaling_factor == pytest.approx(1 / np.std(z), rel=1e-4)
  assert meta["config"]["scaling_factor"] == model.scaling_factor
  assert meta["step"] == 4 and meta["scaling_factor_images"] == 16


def test_export_refuses_another_family(tmp_path, idx_dir):
  config = tiny_config(idx_dir, "vae_mlp.py", num_steps=1,
                       **{"vae.iw_samples": 0, "vae.hidden": 8})
  train.train_and_evaluate(config, str(tmp_path / "vae"))
  with pytest.raises(train.config_lib.ConfigError, match="not an autoencoder"):
    train.export_autoencoder(str(tmp_path / "vae"), str(tmp_path / "x"))
