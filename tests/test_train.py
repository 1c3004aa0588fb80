"""The trainer: 1 vs 8 devices, determinism, resume, checkpoint checks, CLI."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from genimg_jax import checkpoint, cli, parallel, train
from conftest import REPO, tiny_config


def _params(state):
  return jax.tree.map(np.asarray, jax.device_get(state.params))


def _assert_trees_close(a, b, **tol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **tol), a, b)


def _assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("experiment,overrides", [
    ("cnn.py", {}),
    ("resnet.py", {"model.width": 4,
                                 "model.blocks_per_stage": "(1, 1)"}),
])
def test_one_and_eight_devices_give_the_same_parameters(
    tmp_path, idx_dir, experiment, overrides):
  assert jax.device_count() == 8
  states = {}
  for n in (1, 8):
    config = tiny_config(idx_dir, experiment, **{"mesh.num_devices": n},
                         **overrides)
    states[n], _ = train.train_and_evaluate(config, str(tmp_path / str(n)))
    assert int(states[n].step) == 6
  _assert_trees_close(_params(states[1]), _params(states[8]), rtol=2e-4,
                      atol=2e-6)
  if experiment.startswith("resnet"):
    _assert_trees_close(jax.device_get(states[1].batch_stats),
                        jax.device_get(states[8].batch_stats), rtol=2e-4,
                        atol=2e-6)
  # Training moved the parameters away from their initial values.
  config = tiny_config(idx_dir, experiment, **overrides)
  init = train.init_state(config, parallel.make_mesh(), jax.random.split(
      jax.random.key(config.seed))[0], 6)
  assert any(not np.allclose(a, b) for a, b in zip(
      jax.tree.leaves(_params(init)), jax.tree.leaves(_params(states[8]))))


def test_same_seed_same_run_other_seed_other_run(tmp_path, idx_dir):
  runs = {}
  for name, seed in (("a", 0), ("b", 0), ("c", 1)):
    config = tiny_config(idx_dir, seed=seed)
    state, metrics = train.train_and_evaluate(config, str(tmp_path / name))
    runs[name] = (_params(state), metrics)
  _assert_trees_equal(runs["a"][0], runs["b"][0])
  assert runs["a"][1] == runs["b"][1]
  assert not np.array_equal(jax.tree.leaves(runs["a"][0])[0],
                            jax.tree.leaves(runs["c"][0])[0])


def test_stopped_and_resumed_equals_uninterrupted(tmp_path, idx_dir):
  config = tiny_config(idx_dir, "resnet.py", **{
      "model.width": 4, "model.blocks_per_stage": "(1, 1)",
      "checkpoint_every": 100})
  full, full_metrics = train.train_and_evaluate(config,
                                                str(tmp_path / "full"))
  workdir = str(tmp_path / "stopped")
  stopped, metrics = train.train_and_evaluate(config, workdir, stop_at_step=4)
  assert int(stopped.step) == 4 and metrics == {}
  resumed, resumed_metrics = train.train_and_evaluate(config, workdir)
  assert int(resumed.step) == 6
  _assert_trees_equal(_params(full), _params(resumed))
  _assert_trees_equal(jax.device_get(full.opt_state),
                      jax.device_get(resumed.opt_state))
  _assert_trees_equal(jax.device_get(full.batch_stats),
                      jax.device_get(resumed.batch_stats))
  assert full_metrics == resumed_metrics
  steps = [json.loads(l)["step"] for l in open(os.path.join(
      workdir, "metrics.jsonl")) if '"train"' in l]
  assert steps == [1, 2, 3, 4, 5, 6]


def test_checkpoint_of_another_model_is_refused(tmp_path, idx_dir):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config(idx_dir, num_steps=3), workdir)
  other = tiny_config(idx_dir, "resnet.py", num_steps=3)
  with pytest.raises(checkpoint.CheckpointError, match="different model"):
    train.train_and_evaluate(other, workdir)


def test_nan_stops_the_run_and_keeps_the_good_checkpoint(tmp_path, idx_dir):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config(idx_dir, num_steps=3), workdir)
  exploding = tiny_config(idx_dir, num_steps=6,
                          **{"optimizer.learning_rate": 1e30})
  with pytest.raises(FloatingPointError, match="at step 4"):
    train.train_and_evaluate(exploding, workdir)
  ckpt = checkpoint.Checkpointer(workdir, {})
  assert ckpt.latest_step() == 3
  ckpt.close()


def test_cli_train_then_eval(tmp_path, idx_dir, capsys):
  workdir = str(tmp_path / "run")
  args = ["train", "--config", os.path.join(REPO, "experiments",
                                             "cnn.py"),
          "--workdir", workdir, f"--config.data.idx_dir={idx_dir}",
          "--config.batch_size=16", "--config.eval_batch_size", "8",
          "--config.num_steps=4", "--config.checkpoint_every=2"]
  assert cli.main(args) == 0
  trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert 0.0 <= trained["accuracy"] <= 1.0
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "4"))
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(workdir))
  assert cli.main(["eval", "--workdir", workdir]) == 0
  evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert evaluated["step"] == 4
  assert evaluated["accuracy"] == pytest.approx(trained["accuracy"])
  assert evaluated["loss"] == pytest.approx(trained["loss"], rel=1e-5)


def test_cli_bad_override_fails_fast(tmp_path, capsys):
  code = cli.main(["train", "--config", os.path.join(
      REPO, "experiments", "cnn.py"), "--workdir",
                   str(tmp_path), "--config.optimiser.lr=1"])
  assert code == 2
  err = capsys.readouterr().err
  assert "Unknown config key 'optimiser.lr'" in err
  assert "optimizer.learning_rate" in err


def test_installed_genimg_command(tmp_path, idx_dir):
  """The console script, in a fresh process, end to end."""
  workdir = str(tmp_path / "run")
  out = subprocess.run(
      [os.path.join(os.path.dirname(sys.executable), "genimg"), "train",
       "--config", os.path.join(REPO, "experiments", "cnn.py"),
       "--workdir", workdir, f"--config.data.idx_dir={idx_dir}",
       "--config.batch_size=16", "--config.num_steps=2"],
      capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr
  assert "accuracy" in json.loads(out.stdout.strip().splitlines()[-1])
