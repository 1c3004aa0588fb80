"""benchmarks/: the peer benchmark's models match genimg-jax's nets, and its
interleaving and summaries are right (no torch or tensorflow needed)."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import pytest

from conftest import REPO
from genimg_jax.nets import cnn, conv_vae, dcgan


def _load(name):
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(REPO, "benchmarks", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


harness, shapes = _load("harness"), _load("shapes")


def _flax_param_shapes(module, *args):
  key = jax.random.key(0)
  variables = jax.eval_shape(
      lambda: module.init({"params": key, "dropout": key}, *args))
  return sorted(x.shape for x in jax.tree_util.tree_leaves(
      variables["params"]))


def _peer_param_shapes(model, networks=None):
  return sorted(shape for name, layers in shapes.MODELS[model].items()
                if networks is None or name in networks
                for layer in layers for shape in shapes.param_shapes(layer))


def test_the_peer_models_have_genimgs_parameter_shapes():
  image = jnp.zeros((2, 28, 28, 1))
  assert _peer_param_shapes("cnn") == _flax_param_shapes(cnn.CNN(), image)
  assert _peer_param_shapes("dcgan", ["G"]) == _flax_param_shapes(
      dcgan.Generator(), jnp.zeros((2, 100)))
  assert _peer_param_shapes("dcgan", ["D"]) == _flax_param_shapes(
      dcgan.Discriminator(), image)
  assert _peer_param_shapes("vae") == _flax_param_shapes(
      conv_vae.VAE(latent_dim=32), image, jax.random.key(1))
  assert {m: shapes.param_count(m) for m in shapes.MODELS} == {
      "cnn": 688_138, "dcgan": 2_074_817, "vae": 997_505}


def test_the_declared_output_shapes_follow_from_the_layers():
  for model, networks in shapes.MODELS.items():
    for name, layers in networks.items():
      shape = shapes.INPUT_SHAPES[model][name]
      for layer in layers:
        shape = shapes.output_shape(layer, shape)
        assert shape == layer.out, (model, name, layer)


def test_the_schedule_interleaves_and_rotates_the_frameworks():
  fws = ("genimg-jax", "torch-eager", "tf-keras-graph")
  order = harness.schedule(["cnn", "vae"], fws, rounds=3)
  assert len(order) == len(set(order)) == 3 * 2 * 3
  firsts = [fw for i, (r, m, fw) in enumerate(order)
            if i == 0 or order[i - 1][1] != m or order[i - 1][0] != r]
  assert firsts == ["genimg-jax", "genimg-jax", "torch-eager", "torch-eager",
                    "tf-keras-graph", "tf-keras-graph"]
  # Within a round and model, every framework runs once, in rotated order.
  assert [fw for r, m, fw in order if (r, m) == (1, "vae")] == [
      "torch-eager", "tf-keras-graph", "genimg-jax"]


def test_the_summary_takes_medians_and_per_round_ratios():
  ms = {"genimg-jax": [100, 200, 110], "torch-eager": [150, 220, 330]}
  records = [{"round": r, "model": "cnn", "framework": fw,
              "step_ms_median": ms[fw][r], "other_load_cores": 0.5 * (r == 2)}
             for fw in ms for r in range(3)]
  records.append({"round": 0, "model": "cnn", "framework": "tf-keras-xla",
                  "error": "exit 1"})
  summary = harness.summarize(records)
  assert set(summary) == {("cnn", "genimg-jax"), ("cnn", "torch-eager")}
  peer = summary[("cnn", "torch-eager")]
  assert peer["ms"] == {"median": 220, "min": 150, "max": 330, "n": 3}
  # Per round: 1.5, 1.1, 3.0 (not the ratio of the medians, 220 / 110 = 2).
  assert peer["ratio"]["median"] == pytest.approx(1.5)
  assert (peer["ratio"]["min"], peer["ratio"]["max"]) == pytest.approx(
      (1.1, 3.0))
  assert peer["disturbed"] == 1
  table = harness.markdown_table(summary)
  assert "| cnn | 110 (100-200) | 220 (150-330) | 1.50x (1.10-3.00) |" in table
  assert "6 runs, 2 of them disturbed" in table
