"""The networks' package: every network importable from `genimg_jax.nets`
and from its old location (the same object), and parameter trees unchanged
by the move (so checkpoints written before it still restore)."""

import importlib
import json
import os

import jax
import pytest

from conftest import REPO, tiny_config
from genimg_jax import train

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
# (dit.py: recorded when it was added, with the official DiT's names).
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


@pytest.mark.parametrize("experiment", sorted(_RECORDED))
def test_parameter_paths_unchanged_by_the_move(experiment, tmp_path):
  config = tiny_config(str(tmp_path / "unused"), experiment)
  family = train.family_module(config)
  state = jax.eval_shape(
      lambda r: family.create_train_state(config, r, 10), jax.random.key(0))
  paths = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    key = jax.tree_util.keystr(path)
    if ("params" in key or "batch_stats" in key) and "opt_state" not in key:
      paths[key] = list(leaf.shape)
  assert paths == _RECORDED[experiment]
