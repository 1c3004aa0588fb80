"""What a run logs: learning rates, TensorBoard images and hyperparameters,
parameter counts, and the persistent compilation cache across restarts."""

import importlib.util
import os
import struct
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2

from genimg_jax import checkpoint, optim, parallel, train
from conftest import tiny_config


def read_events(workdir):
  """Every Event in the TensorBoard event files directly under `workdir`."""
  events = []
  for name in sorted(os.listdir(workdir)):
    if not name.startswith("events.out.tfevents"):
      continue
    with open(os.path.join(workdir, name), "rb") as f:
      raw = f.read()
    offset = 0
    while offset < len(raw):  # TFRecords: length, crc, data, crc.
      (length,) = struct.unpack("<Q", raw[offset:offset + 8])
      event = event_pb2.Event()
      event.ParseFromString(raw[offset + 12:offset + 12 + length])
      events.append(event)
      offset += 12 + length + 4
  return events


def test_learning_rates_follow_the_schedule():
  opt = ml_collections.ConfigDict({"learning_rate": 1e-3, "schedule": "cosine",
                                   "warmup_steps": 200})
  at = lambda step: optim.learning_rates(opt, 2000, step)["learning_rate"]
  assert at(0) == 0.0
  assert at(100) == pytest.approx(5e-4)
  assert at(200) == pytest.approx(1e-3)
  assert at(1100) == pytest.approx(5e-4)  # Half way down the cosine.
  assert at(2000) == pytest.approx(0.0, abs=1e-12)
  constant = ml_collections.ConfigDict({"learning_rate": 2e-4,
                                        "schedule": "constant"})
  gan = ml_collections.ConfigDict({"generator": constant,
                                   "discriminator": opt})
  assert optim.learning_rates(gan, 2000, 100) == pytest.approx(
      {"learning_rate_generator": 2e-4, "learning_rate_discriminator": 5e-4})


def test_tensorboard_gets_learning_rate_hparams_and_sample_grids(tmp_path,
                                                                 idx_dir):
  config = tiny_config(idx_dir, "dcgan.py", **{
      "num_steps": 4, "log_every": 1, "eval_every": 4,
      "optimizer.discriminator.schedule": "cosine",
      "optimizer.discriminator.warmup_steps": 2})
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  events = read_events(workdir)
  scalars = {(v.tag, e.step): v.simple_value for e in events
             for v in e.summary.value if v.HasField("simple_value")}
  for step in (1, 2, 3, 4):  # Logged at the step count after the update.
    assert scalars[("optimizer/learning_rate_discriminator", step)] == (
        pytest.approx(min(1.0, (step - 1) / 2) * 2e-4 if step <= 3 else
                      optim.learning_rates(config.optimizer, 4, step - 1)[
                          "learning_rate_discriminator"]))
    assert scalars[("optimizer/learning_rate_generator", step)] == (
        pytest.approx(2e-4))
  hparams = [v for e in events for v in e.summary.value
             if v.tag == "_hparams_/session_start_info"]
  assert len(hparams) == 1
  assert b"optimizer.generator.learning_rate" in hparams[0].metadata.\
      plugin_data.content
  images = {v.tag: v.image for e in events for v in e.summary.value
            if v.HasField("image") and e.step == 4}
  assert set(images) == {"samples/step", "samples/interp"}
  png = np.asarray(Image.open(os.path.join(workdir, "samples",
                                           "step_000004.png")))
  assert (images["samples/step"].height, images["samples/step"].width) == (
      png.shape[:2])


def test_the_writer_does_not_import_torch(tmp_path):
  """tensorboardX would import PyTorch (seconds of start-up) where it is
  installed; the writer hides it, and torch still imports afterwards."""
  if importlib.util.find_spec("torch") is None:
    pytest.skip("torch is not installed: nothing to hide")
  code = ("import sys\n"
          "from genimg_jax import metrics_writer\n"
          "writer = metrics_writer.MetricWriter(sys.argv[1])\n"
          "writer.write(1, {'loss': 0.5})\n"
          "writer.close()\n"
          "print('torch' in sys.modules)\n"
          "import torch\n"
          "print(torch.zeros(2).shape[0])\n")
  out = subprocess.run([sys.executable, "-c", code, str(tmp_path)],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split() == ["False", "2"]
  assert [e.summary.value[0].simple_value for e in read_events(str(tmp_path))
          if e.summary.value] == [0.5]


def test_parameter_counts_cover_every_trained_parameter(idx_dir):
  mesh = parallel.make_mesh(1)
  state = train.init_state(tiny_config(idx_dir, "dcgan.py"), mesh,
                           jax.random.key(0), 4)
  counts = train.parameter_counts(state)
  assert {name.split("/")[0] for name in counts} == {"g", "d"}
  expected = sum(x.size for x in jax.tree.leaves(state.g.params)
                 + jax.tree.leaves(state.d.params))
  assert sum(counts.values()) == expected


def test_a_restarted_run_loads_its_steps_from_the_compilation_cache(
    tmp_path, idx_dir, capsys):
  session_dir = jax.config.jax_compilation_cache_dir
  min_time = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  cache = str(tmp_path / "cache")
  config = tiny_config(idx_dir, num_steps=2, compilation_cache_dir=cache)
  try:
    train.train_and_evaluate(config, str(tmp_path / "a"))
    first = capsys.readouterr().out
    assert jax.config.jax_compilation_cache_dir == cache
    train.train_and_evaluate(config, str(tmp_path / "b"))
    second = capsys.readouterr().out
  finally:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)
    jax.config.update("jax_compilation_cache_dir", session_dir)
    from jax.experimental import compilation_cache
    compilation_cache.compilation_cache.reset_cache()
  assert f"Compilation cache {cache}: 0 hits" in first
  assert f"Compilation cache {cache}: 0 hits" not in second
  assert " 0 misses" in second
  assert os.listdir(cache)


def test_the_best_checkpoint_is_the_lowest_fid(tmp_path):
  saved = {1: 5.0, 2: 3.0, 3: 4.0, 4: 6.0}
  best = checkpoint.Checkpointer(str(tmp_path), {}, best=True)
  for step, fid in saved.items():
    best.save(step, {"w": np.full(2, step, np.float32)}, {"fid": fid})
  best.close()
  best = checkpoint.Checkpointer(str(tmp_path), {}, best=True)
  assert best.best_step() == 2 and best.manager.all_steps() == [2]
  restored = best.restore_latest({"w": np.zeros(2, np.float32)}, 2)
  np.testing.assert_array_equal(restored["w"], [2, 2])
  with pytest.raises(checkpoint.CheckpointError, match="no checkpoint of step 3"):
    best.restore_latest({"w": np.zeros(2, np.float32)}, 3)
  best.close()
