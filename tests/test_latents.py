"""Latent diffusion: `genimg encode-latents`, the latent draws, and a DiT
trained on latents (experiments/latent_dit.py): 1 vs 8 devices, resume,
FID and `genimg sample` of decoded samples."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genimg_jax import autoencoder, cli, config as config_lib, data
from genimg_jax import diffusion, latents
from genimg_jax import parallel, train
from genimg_jax.nets.autoencoder_kl import AutoencoderKL
from conftest import assert_runs_agree, tiny_config, train_runs

SCALE = 0.7


def _autoencoder_file(directory, seed=3) -> str:
  """A tiny untrained AutoencoderKL (28 x 28 x 1 -> 14 x 14 x 2) saved as
  `genimg export-autoencoder` saves one, with scaling factor SCALE."""
  model = AutoencoderKL(1, 1, (8, 16), 1, 2, 4, scaling_factor=SCALE)
  variables = model.init(jax.random.key(seed), jnp.zeros((1, 28, 28, 1)))
  path = os.path.join(directory, "ae.msgpack")
  autoencoder.save(model, variables, path, source="test")
  return path


def _config(tmp_path, idx_dir, **overrides):
  ae = str(tmp_path / "ae.msgpack")
  if not os.path.isfile(ae):
    _autoencoder_file(str(tmp_path))
  base = {"diffusion.autoencoder": ae,
          "diffusion.latents": str(tmp_path / "latents"),
          "model.depth": 1, "model.hidden_size": 32, "model.num_heads": 2,
          "diffusion.sample_steps": 2}
  base.update(overrides)
  return tiny_config(idx_dir, "latent_dit.py", **base)


def test_encode_latents_shapes_and_decode_consistency(tmp_path, idx_dir):
  config = _config(tmp_path, idx_dir, **{"mesh.num_devices": 8,
                                         "data.random_flip": True})
  meta = latents.encode_latents(config, config.diffusion.autoencoder,
                                config.diffusion.latents)
  assert meta["latent_shape"] == [14, 14, 2] and meta["flips"]
  assert meta["scaling_factor"] == SCALE
  assert meta["splits"] == {"train": 128, "test": 40}
  with open(os.path.join(config.diffusion.latents, "latents.json")) as f:
    assert json.load(f) == meta
  model, variables = autoencoder.load(config.diffusion.autoencoder)
  for split, n in (("train", 128), ("test", 40)):
    source = data.load_split(config.data, split)
    images = source.take(np.arange(n))
    with np.load(os.path.join(config.diffusion.latents,
                              f"{split}.npz")) as f:
      arrays = dict(f)
    assert set(arrays) == ({"mean", "logvar", "label", "flip_mean",
                            "flip_logvar"} if split == "train"
                           else {"mean", "logvar", "label"})
    np.testing.assert_array_equal(arrays["label"], images["label"])
    x = images["image"].astype(np.float32) / 127.5 - 1
    mean, logvar = model.apply(variables, x, method="encode")
    assert arrays["mean"].shape == (n, 14, 14, 2)
    assert arrays["mean"].dtype == np.float32
    np.testing.assert_allclose(arrays["mean"], mean, atol=2e-5)
    np.testing.assert_allclose(arrays["logvar"], logvar, atol=2e-5)
    if split == "train":
      flip_mean, _ = model.apply(variables, x[:, :, ::-1], method="encode")
      np.testing.assert_allclose(arrays["flip_mean"], flip_mean, atol=2e-5)
  # The run's decoder of z = SCALE * mean is the network's own decode(mean).
  mesh = parallel.make_mesh(8)
  decode, ae_variables = latents.make_decoder(model, variables, mesh, SCALE)
  z = SCALE * arrays["mean"][:8]
  got = jax.jit(decode)(ae_variables, parallel.shard_host_array(z, mesh))
  want = np.clip(model.apply(variables, arrays["mean"][:8], method="decode"),
                 -1, 1)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)
  # The latent source of a run: moments [N, h, w, 4c] with flips.
  train_source = latents.load_split(config, "train")
  assert train_source.take(np.arange(3))["image"].shape == (3, 14, 14, 8)
  assert latents.load_split(config, "test").images.shape == (40, 14, 14, 4)


def test_draw_latents_formula_and_flips():
  rng = np.random.default_rng(0)
  mean, logvar = rng.normal(size=(2, 6, 3, 3, 2)).astype(np.float32)
  flip_mean, flip_logvar = mean + 10, logvar - 1
  key = jax.random.key(5)
  z = latents.draw_latents(jnp.concatenate([mean, logvar], -1), key, 0.5,
                           0.25)
  eps = jax.random.normal(jax.random.fold_in(key, latents.LATENT_STREAM),
                          mean.shape)
  np.testing.assert_allclose(
      z, 0.5 * (mean + np.exp(0.5 * logvar) * eps - 0.25), rtol=1e-5,
      atol=1e-6)
  moments = jnp.concatenate([mean, logvar, flip_mean, flip_logvar], -1)
  z = latents.draw_latents(moments, key, 1.0, 0.0, flip=True)
  # The rows data.random_flip mirrors take the mirrored image's moments.
  columns = jnp.broadcast_to(jnp.array([0.0, 1.0])[None, None, :, None],
                             (6, 1, 2, 1))
  mirrored = np.asarray(data.random_flip(columns, key))[:, 0, 0, 0] == 1
  assert 0 < mirrored.sum() < 6
  want_mean = np.where(mirrored[:, None, None, None], flip_mean, mean)
  want_logvar = np.where(mirrored[:, None, None, None], flip_logvar, logvar)
  np.testing.assert_allclose(
      z, want_mean + np.exp(0.5 * want_logvar) * eps, rtol=1e-5, atol=1e-5)


def test_latent_config_checks(tmp_path, idx_dir):
  with pytest.raises(config_lib.ConfigError, match="a latent run needs both"):
    _config(tmp_path, idx_dir, **{"diffusion.autoencoder": ""})
  with pytest.raises(config_lib.ConfigError, match="latents are not in"):
    _config(tmp_path, idx_dir, **{"diffusion.clip_denoised": True})
  config = _config(tmp_path, idx_dir)
  with pytest.raises(data.DataError, match="encode-latents"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  latents.encode_latents(config, config.diffusion.autoencoder,
                         config.diffusion.latents)
  # What the train step sees: SCALE * (a posterior draw).
  settings = diffusion.settings_from_config(config)
  assert settings.latent and settings.scaling_factor == SCALE
  assert diffusion.model_shape(config) == (14, 14, 2)
  moments = latents.load_split(config, "test").images[:4]
  key = jax.random.key(1)
  eps = jax.random.normal(jax.random.fold_in(key, latents.LATENT_STREAM),
                          (4, 14, 14, 2))
  mean, logvar = np.split(moments, 2, -1)
  np.testing.assert_allclose(
      diffusion.clean_input(settings, jnp.asarray(moments), key, train=True),
      SCALE * (mean + np.exp(0.5 * logvar) * eps), rtol=1e-5, atol=1e-6)
  # Latents of another autoencoder are refused.
  other = str(tmp_path / "other")
  os.makedirs(other)
  other = _autoencoder_file(other, seed=4)
  with pytest.raises(data.DataError, match="encode them again"):
    latents.info(_config(tmp_path, idx_dir,
                         **{"diffusion.autoencoder": other}))


def _encoded_config(tmp_path, idx_dir, **overrides):
  config = _config(tmp_path, idx_dir, **overrides)
  if not os.path.isdir(config.diffusion.latents):
    latents.encode_latents(config, config.diffusion.autoencoder,
                           config.diffusion.latents)
  return config


def test_latent_one_and_eight_devices_agree(tmp_path, idx_dir):
  """4 steps of the latent DiT on 1 and 8 devices, labels dropped half the
  time and flips on: same losses, gradient norms, parameters and test
  loss (per-device posterior draws or flips would differ)."""
  configs = {n: _encoded_config(
      tmp_path, idx_dir, **{"mesh.num_devices": n, "num_steps": 4,
                            "log_every": 1, "diffusion.label_dropout": 0.5,
                            "data.random_flip": True}) for n in (1, 8)}
  runs = train_runs(tmp_path, configs)
  assert_runs_agree(runs[1], runs[8], ("loss", "grad_norm"), rtol=1e-4,
                    params_rtol=1e-4, params_floor=1e-4)


def test_latent_stopped_and_resumed_equals_uninterrupted(tmp_path, idx_dir):
  config = _encoded_config(tmp_path, idx_dir, **{"mesh.num_devices": 2})
  straight, _ = train.train_and_evaluate(config, str(tmp_path / "a"))
  train.train_and_evaluate(config, str(tmp_path / "b"), stop_at_step=4)
  resumed, _ = train.train_and_evaluate(config, str(tmp_path / "b"))
  for a, b in ((straight.params, resumed.params),
               (straight.ema_params, resumed.ema_params),
               (straight.opt_state, resumed.opt_state)):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a),
                 jax.device_get(b))


def test_latent_fid_grids_and_sample_command(tmp_path, idx_dir, capsys):
  config = _encoded_config(tmp_path, idx_dir,
                           **{"mesh.num_devices": 2, "num_steps": 2,
                              "eval_samples": 16,
                              "diffusion.objective": "flow",
                              "diffusion.sampler": "euler"})
  workdir = str(tmp_path / "run")
  _, metrics = train.train_and_evaluate(config, workdir)
  assert np.isfinite(metrics["fid"]) and np.isfinite(metrics["loss"])
  assert os.path.isfile(os.path.join(workdir, "samples", "step_000002.png"))
  output = str(tmp_path / "s.npz")
  assert cli.main(["sample", "--workdir", workdir, "--num", "5", "--output",
                   output]) == 0
  with np.load(output) as f:
    assert f["arr_0"].shape == (5, 28, 28, 1) and f["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(f["labels"], np.arange(5))


def test_compile_lowers_the_latent_step(tmp_path, idx_dir):
  from genimg_jax import aot  # pylint: disable=g-import-not-at-top
  config = _encoded_config(tmp_path, idx_dir, **{"data.random_flip": True})
  _, batch, _ = aot.abstract_inputs(config, parallel.make_mesh(8), 10)
  assert batch["image"].shape == (16, 14, 14, 8)
  assert batch["image"].dtype == jnp.float32
  lowered = aot.lower_train_step(config, jax.devices()[:2], 10)
  assert lowered is not None
