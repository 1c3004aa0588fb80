"""The trainer: 1 vs 8 devices, determinism, resume, checkpoint checks, CLI."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genimg_jax import bench, checkpoint, classifier, cli, parallel, train
from conftest import REPO, assert_runs_agree, assert_trees_near, params_of
from conftest import tiny_config, train_runs


def _assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("experiment,overrides,params_rtol", [
    ("cnn.py", {}, 2e-5),
    ("resnet.py", {"model.width": 4, "model.blocks_per_stage": "(1, 1)"},
     3e-4),
])
def test_one_and_eight_devices_give_the_same_parameters(
    tmp_path, idx_dir, experiment, overrides, params_rtol):
  """The same run on 1 and 8 devices: same losses, parameters, statistics.

  Portable tolerances, about 25x the differences measured between 1, 2, 4
  and 8 devices and between CPUs (emulated with --xla_cpu_max_isa=SSE4_2,
  AVX and AVX2): the logged loss and norms <= 2e-7 (relative), a parameter
  leaf <= 8e-7 (CNN) and <= 9e-6 (ResNet), a BatchNorm statistic <= 3e-7.
  Leaves are compared relative to their norm but at least 1e-3: on an
  AVX-512 Intel Xeon a ResNet BatchNorm bias of norm 1.5e-5 differed by
  6e-9 (4e-4 of itself, 6e-6 of the floor). Planted sharding bugs move the
  first step's loss or gradient norm by 2e-3 to 7 (BatchNorm statistics per
  device, a loss and gradient over one device's share of the batch, a
  gradient times the device count) and the parameters by up to 2.
  """
  assert jax.device_count() == 8
  configs = {n: tiny_config(idx_dir, experiment, **{"mesh.num_devices": n},
                            **overrides) for n in (1, 8)}
  runs = train_runs(tmp_path, configs)
  # Per step: the batch's loss before the update, the gradient's norm and
  # the updated parameters' norm. (Not the accuracy: a near tie may flip.)
  assert_runs_agree(runs[1], runs[8], ("loss", "grad_norm", "param_norm"),
                    rtol=5e-6, params_rtol=params_rtol, params_floor=1e-3)
  if experiment.startswith("resnet"):
    assert_trees_near(jax.device_get(runs[1].state.batch_stats),
                      jax.device_get(runs[8].state.batch_stats), rtol=1e-5)
  # Training moved the parameters away from their initial values.
  config = tiny_config(idx_dir, experiment, **overrides)
  init = train.init_state(config, parallel.make_mesh(), jax.random.split(
      jax.random.key(config.seed))[0], 6)
  assert any(not np.allclose(a, b) for a, b in zip(
      jax.tree.leaves(params_of(init)),
      jax.tree.leaves(params_of(runs[8].state))))


def test_same_seed_same_run_other_seed_other_run(tmp_path, idx_dir):
  runs = {}
  for name, seed in (("a", 0), ("b", 0), ("c", 1)):
    config = tiny_config(idx_dir, seed=seed)
    state, metrics = train.train_and_evaluate(config, str(tmp_path / name))
    runs[name] = (params_of(state), metrics)
  _assert_trees_equal(runs["a"][0], runs["b"][0])
  assert runs["a"][1] == runs["b"][1]
  assert not np.array_equal(jax.tree.leaves(runs["a"][0])[0],
                            jax.tree.leaves(runs["c"][0])[0])


def _eval_rows(workdir):
  return [r for r in map(json.loads, open(os.path.join(
      workdir, "metrics.jsonl"))) if r["split"] == "eval"]


def test_stopped_and_resumed_equals_uninterrupted(tmp_path, idx_dir):
  """Stopped at step 4, an evaluation step: the stop saves without
  evaluating, and the resumed run evaluates step 4 before training on, so
  its evaluations equal the uninterrupted run's."""
  config = tiny_config(idx_dir, "resnet.py", **{
      "model.width": 4, "model.blocks_per_stage": "(1, 1)",
      "checkpoint_every": 100, "eval_every": 2})
  full, full_metrics = train.train_and_evaluate(config,
                                                str(tmp_path / "full"))
  workdir = str(tmp_path / "stopped")
  stopped, metrics = train.train_and_evaluate(config, workdir, stop_at_step=4)
  assert int(stopped.step) == 4 and metrics == {}
  resumed, resumed_metrics = train.train_and_evaluate(config, workdir)
  assert int(resumed.step) == 6
  _assert_trees_equal(params_of(full), params_of(resumed))
  _assert_trees_equal(jax.device_get(full.opt_state),
                      jax.device_get(resumed.opt_state))
  _assert_trees_equal(jax.device_get(full.batch_stats),
                      jax.device_get(resumed.batch_stats))
  assert full_metrics == resumed_metrics
  steps = [json.loads(l)["step"] for l in open(os.path.join(
      workdir, "metrics.jsonl")) if '"train"' in l]
  assert steps == [1, 2, 3, 4, 5, 6]
  assert [r["step"] for r in _eval_rows(workdir)] == [2, 4, 6]
  assert _eval_rows(workdir) == _eval_rows(str(tmp_path / "full"))
  # Resumed again with nothing left to do: no evaluation is repeated.
  train.train_and_evaluate(config, workdir)
  assert [r["step"] for r in _eval_rows(workdir)] == [2, 4, 6]


def test_checkpoint_of_another_model_is_refused(tmp_path, idx_dir):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config(idx_dir, num_steps=3), workdir)
  other = tiny_config(idx_dir, "resnet.py", num_steps=3)
  with pytest.raises(checkpoint.CheckpointError,
                     match="(?s)different experiment.*model.name: 'cnn' -> "
                           "'resnet'"):
    train.train_and_evaluate(other, workdir)


def test_speed_scalars_and_mfu_with_a_fake_peak():
  """MFU = step FLOPs / (step time x devices x peak per device)."""
  # 8 devices, 4e12 FLOPs a step in 0.5 s: 1e12 FLOP/s per device, half of
  # a 2e12 peak.
  scalars = train.speed_scalars(10, 5.0, 64, flops_per_step=4e12,
                                num_devices=8, peak_per_device=2e12)
  assert scalars == pytest.approx({
      "steps_per_s": 2.0, "images_per_s": 128.0, "step_ms": 500.0,
      "tflops_per_s_per_device": 1.0, "mfu": 0.5})
  assert train.model_flops_utilization(4e12, 0.5, 8, 2e12) == 0.5
  # No peak (CPUs): no MFU.
  assert set(train.speed_scalars(10, 5.0, 64, 4e12, 8, None)) == {
      "steps_per_s", "images_per_s", "step_ms"}
  assert train.speed_postfix(scalars) == {
      "img/s": "128", "ms/step": "500", "TFLOP/s/dev": "1", "MFU": "50.0%"}


def test_training_logs_throughput_and_mfu(tmp_path, idx_dir, monkeypatch):
  """metrics.jsonl's speed rows: images/s and step ms every log_every steps;
  with a (fake) peak, MFU from the lowered step's FLOPs over 2 devices."""
  counted = []

  def fake_flops_and_peak(config, mesh, lowered):
    del config, mesh
    counted.append(bench.flops_of(lowered))
    return counted[-1], 1e9

  monkeypatch.setattr(train, "step_flops_and_peak", fake_flops_and_peak)
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(
      tiny_config(idx_dir, **{"mesh.num_devices": 2}), workdir)
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  speed = [r for r in rows if r["split"] == "speed"]
  assert [r["step"] for r in speed] == [2, 4, 6]
  assert len(counted) == 1 and counted[0] > 0  # Counted once, not per step.
  for r in speed:
    assert 0 < r["step_ms"] < 60e3
    assert r["images_per_s"] == pytest.approx(16e3 / r["step_ms"])
    assert r["steps_per_s"] == pytest.approx(1e3 / r["step_ms"])
    per_device = counted[0] / (r["step_ms"] / 1e3) / 2
    assert r["tflops_per_s_per_device"] == pytest.approx(per_device / 1e12)
    assert r["mfu"] == pytest.approx(per_device / 1e9)


def test_cpu_runs_get_no_mfu(idx_dir):
  config = tiny_config(idx_dir)
  mesh = parallel.make_mesh(1)
  assert train.step_flops_and_peak(config, mesh, None) == (0.0, None)


def test_nan_stops_the_run_and_keeps_the_good_checkpoint(tmp_path, idx_dir,
                                                        monkeypatch):
  """A loss that turns NaN at step 4 stops the run there; the checkpoint of
  step 3 stays the latest."""
  bind = classifier.bind_train_step

  def bind_nan_after_step_3(config, mesh=None):
    step_fn = bind(config, mesh)

    def step(state, batch, rng):
      state, metrics = step_fn(state, batch, rng)
      return state, {**metrics, "loss": jnp.where(
          state.step > 3, jnp.nan, metrics["loss"])}
    return step

  monkeypatch.setattr(classifier, "bind_train_step", bind_nan_after_step_3)
  workdir = str(tmp_path / "run")
  with pytest.raises(FloatingPointError, match="'loss' is nan at step 4"):
    train.train_and_evaluate(tiny_config(idx_dir, num_steps=6), workdir)
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


def test_the_best_checkpoint_restarts_when_the_evaluation_protocol_changes(
    tmp_path, capsys):
  """FIDs of different protocols (feature network, reference statistics,
  sampler, ...) are not comparable: a best of another protocol is dropped."""
  workdir = str(tmp_path)
  state = {"w": np.zeros(3, np.float32)}
  inception = {"feature_network": "inception:x.msgpack", "eval_samples": 64}
  own = {"feature_network": "fashion_mnist_resnet", "eval_samples": 64}

  def save(step, fid, protocol):
    best = checkpoint.Checkpointer(workdir, {}, best=True, protocol=protocol)
    best.save(step, state, {"fid": fid})
    best.close()
    best = checkpoint.Checkpointer(workdir, {}, best=True, protocol=protocol)
    step = best.best_step()
    best.close()
    return step

  assert save(1, 5.0, own) == 1
  assert save(2, 9.0, own) == 1  # Same protocol: the lower FID stays.
  assert save(3, 20.0, inception) == 3  # Another scale: a new best.
  assert "evaluation protocol changed (feature_network: " in (
      capsys.readouterr().out)
  assert save(4, 30.0, inception) == 3
