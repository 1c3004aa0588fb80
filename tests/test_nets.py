"""The networks' package: every network importable from `genimg_jax.nets`
and from its old location (the same object), and parameter trees unchanged
by the move (so checkpoints written before it still restore)."""

import importlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, tiny_config
from genimg_jax import config as config_lib, train
from genimg_jax.nets import dit, unet

# (nets module, name, old module): every network and where it used to be.
NETWORKS = [
    ("cnn", "CNN", "classifier"),
    ("resnet", "ResidualBlock", "classifier"),
    ("resnet", "ResNet", "classifier"),
    ("dcgan", "Generator", "gan"),
    ("dcgan", "Discriminator", "gan"),
    ("mlp_vae", "MLPEncoder", "vae"),
    ("mlp_vae", "MLPDecoder", "vae"),
    ("conv_vae", "ConvEncoder", "vae"),
    ("conv_vae", "ConvDecoder", "vae"),
    ("conv_vae", "VAE", "vae"),
    ("unet", "UNet", "unet"),
    ("unet", "ResidualBlock", "unet"),
    ("unet", "AttentionBlock", "unet"),
    ("layers", "ConvStride2", "layers"),
    ("layers", "ConvTranspose2x", "layers"),
    ("layers", "Dropout", "layers"),
]

# Flattened parameter (and batch_stats) paths and shapes of every
# experiment's initial state, recorded with the code before the move
# (dit.py: recorded when it was added, with the official DiT's names;
# latent_dit.py: when its entry was added, on the local autoencoder's
# 7 x 7 x 4 latents).
PARAM_PATHS = os.path.join(REPO, "tests", "data", "param_paths.json")


@pytest.mark.parametrize("net_module,name,old_module", NETWORKS)
def test_network_importable_from_nets_and_old_location(net_module, name,
                                                       old_module):
  new = getattr(importlib.import_module(f"genimg_jax.nets.{net_module}"), name)
  old = getattr(importlib.import_module(f"genimg_jax.{old_module}"), name)
  assert new is old
  assert new.__module__ == f"genimg_jax.nets.{net_module}"


@pytest.mark.parametrize("name", ["unet", "layers"])
def test_old_modules_are_aliases(name):
  old = importlib.import_module(f"genimg_jax.{name}")
  assert old is importlib.import_module(f"genimg_jax.nets.{name}")
  from genimg_jax import nets  # pylint: disable=import-outside-toplevel
  assert getattr(nets, name) is old


with open(PARAM_PATHS) as f:
  _RECORDED = json.load(f)


def _experiments():
  return sorted(f for f in os.listdir(os.path.join(REPO, "experiments"))
                if f.endswith(".py") and f not in ("__init__.py",
                                                   "common.py"))


def test_every_experiment_has_recorded_parameter_paths():
  assert sorted(_RECORDED) == _experiments()


def _latent_stub(directory) -> dict:
  """Overrides pointing latent_dit.py at latents.json and autoencoder
  files (no arrays) for the latents experiments/autoencoder_kl.py's local
  network writes: 28 x 28 x 1 -> 7 x 7 x 4."""
  ae_config = config_lib.load_config_file(os.path.join(
      REPO, "experiments", "autoencoder_kl.py"))
  side = ae_config.data.image_shape[0] // 2 ** (
      len(ae_config.autoencoder.block_out_channels) - 1)
  ae, latents_dir = os.path.join(directory, "ae.msgpack"), os.path.join(
      directory, "latents")
  os.makedirs(latents_dir)
  with open(ae + ".json", "w") as f:
    json.dump({"sha256": "0" * 64}, f)
  with open(os.path.join(latents_dir, "latents.json"), "w") as f:
    json.dump({"autoencoder_sha256": "0" * 64, "scaling_factor": 1.0,
               "shift_factor": 0.0,
               "image_shape": list(ae_config.data.image_shape),
               "latent_shape": [side, side,
                                ae_config.autoencoder.latent_channels]}, f)
  return {"diffusion.autoencoder": ae, "diffusion.latents": latents_dir}


def _experiment_config(experiment, tmp_path, **overrides):
  """tiny_config of `experiment` (latent_dit.py: on `_latent_stub`)."""
  if experiment == "latent_dit.py":
    overrides = {**_latent_stub(str(tmp_path)), **overrides}
  return tiny_config(str(tmp_path / "unused"), experiment, **overrides)


@pytest.mark.parametrize("experiment", sorted(_RECORDED))
def test_parameter_paths_unchanged_by_the_move(experiment, tmp_path):
  config = _experiment_config(experiment, tmp_path)
  assert _param_paths(config) == _RECORDED[experiment]


@pytest.mark.parametrize("experiment", ["dit.py", "latent_dit.py"])
def test_learn_sigma_doubles_only_the_final_layers_outputs(experiment,
                                                          tmp_path):
  """The full DiT configs learn sigma: their parameters are the recorded
  ones but for the final linear map's p * p * 2C outputs."""
  config = _experiment_config(experiment, tmp_path,
                              **{"model.learn_sigma": True})
  want = dict(_RECORDED[experiment])
  for tree in ("params", "ema_params"):
    for leaf in ("kernel", "bias"):
      key = f".{tree}['final_layer']['linear']['{leaf}']"
      want[key] = want[key][:-1] + [2 * want[key][-1]]
  assert _param_paths(config) == want


@pytest.mark.parametrize("experiment", ["ddpm.py", "dit.py"])
@pytest.mark.parametrize("remat", ["blocks", "full"])
def test_parameter_paths_unchanged_by_remat(experiment, remat, tmp_path):
  """Checkpoints restore with or without rematerialisation."""
  config = tiny_config(str(tmp_path / "unused"), experiment,
                       **{"model.remat": remat})
  assert _param_paths(config) == _RECORDED[experiment]


def _remat_nets(remat):
  """A tiny conditional UNet (dropout on) and DiT with `remat`."""
  return {"unet": unet.UNet(4, (1, 2), 1, (4,), 0.3, 3, remat=remat),
          "dit": dit.DiT(2, 16, 2, 2, 2.0, 3, remat=remat)}


@pytest.mark.parametrize("name", ["unet", "dit"])
@pytest.mark.parametrize("remat", ["blocks", "full"])
def test_remat_gives_the_same_parameters_and_gradients(name, remat):
  """Same initial parameters, same gradient of a train-mode loss (same
  dropout masks) as without remat, each leaf to within 1e-5 of its norm
  (float32 sums in another order; the attention key biases, whose gradient
  is 0 in exact arithmetic, to within 1e-8)."""
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
  time, labels = jnp.array([3, 700]), jnp.array([1, 2])
  grads = {}
  for r in ("none", remat):
    net = _remat_nets(r)[name]
    params = net.init(jax.random.key(0), x, time, labels)
    if r == "none":
      # Off the zero-initialised start, so that every gradient flows.
      keys = iter(jax.random.split(jax.random.key(5), 1000))
      start = jax.tree.map(
          lambda p: p + 0.05 * jax.random.normal(next(keys), p.shape),
          params)
    else:
      _assert_trees_equal(params, init_none)
    init_none = params

    def loss(p, net=net):
      out = net.apply(p, x, time, labels, train=True,
                      rngs={"dropout": jax.random.key(2)})
      return jnp.mean(out ** 2)

    grads[r] = jax.jit(jax.grad(loss))(start)
  paths, none = zip(*jax.tree_util.tree_leaves_with_path(grads["none"]))
  for path, a, b in zip(paths, none, jax.tree.leaves(grads[remat])):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(a) + 1e-8, (
        jax.tree_util.keystr(path))
  assert sum(np.linalg.norm(a) for a in none) > 0.1


def _assert_trees_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def _param_paths(config):
  family = train.family_module(config)
  state = jax.eval_shape(
      lambda r: family.create_train_state(config, r, 10), jax.random.key(0))
  paths = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    key = jax.tree_util.keystr(path)
    if ("params" in key or "batch_stats" in key) and "opt_state" not in key:
      paths[key] = list(leaf.shape)
  return paths
