"""`genimg compile`: the train step compiled ahead of time from abstract
inputs is the step the trainer runs, and its per-device costs are right."""

import importlib.util
import json

import jax
import numpy as np
import pytest

from genimg_jax import aot, cli, data, parallel, train
from conftest import tiny_config


def test_aot_lowering_is_the_trainers_step_on_real_inputs(idx_dir):
  """Abstract state, batch and key: the same shapes, dtypes and shardings as
  the trainer's real ones, so the same program (StableHLO text)."""
  config = tiny_config(idx_dir, "dcgan.py")
  mesh = parallel.make_mesh(0)
  lowered = aot.lower_train_step(config, jax.devices(), num_steps=6)
  source = data.load_split(config.data, "train")
  batch = data.to_global_array(source.take(np.arange(config.batch_size)), mesh)
  rng = parallel.replicate(jax.random.key(3), mesh)
  state = train.init_state(config, mesh, jax.random.key(0), 6)
  expected = train.compile_train_step(config, mesh).lower(state, batch, rng)
  assert "sharding" in lowered.as_text()
  assert lowered.as_text() == expected.as_text()


def test_costs_are_per_device(idx_dir):
  """Data parallel: each of 8 devices does 1/8 of one device's FLOPs and
  holds a full copy of the state plus its eighth of the batch."""
  config = tiny_config(idx_dir, "cnn.py", batch_size=64)
  one = aot.step_costs(aot.compile_train_step(config, jax.devices()[:1]))
  eight = aot.step_costs(aot.compile_train_step(config, jax.devices()))
  # Within 15%: the optimizer update (replicated) is done in full by every
  # device (measured: 8 x 8 devices' FLOPs = 1.06 x one device's); a batch
  # not split over the devices would give 8x.
  assert eight["flops"] * 8 == pytest.approx(one["flops"], rel=0.15)
  state_bytes = sum(
      x.size * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(
          lambda r: train.family_module(config).create_train_state(
              config, r, 6), jax.random.key(0))))
  batch_bytes = 64 * (28 * 28 + 4)  # uint8 images, int32 labels.
  # The state in full on each device, the batch split 8 ways (+ the key).
  assert one["argument"] - eight["argument"] == batch_bytes - batch_bytes // 8
  assert 0 <= eight["argument"] - (state_bytes + batch_bytes // 8) <= 8
  assert eight["alias"] == pytest.approx(state_bytes, rel=0.01)  # Donated.
  for costs in (one, eight):
    assert costs["peak_bytes"] == (costs["argument"] + costs["output"] -
                                   costs["alias"] + costs["temp"])


def test_a_batch_that_does_not_split_fails_before_compiling(idx_dir):
  config = tiny_config(idx_dir, "cnn.py", batch_size=12)
  with pytest.raises(ValueError, match="multiple of 8"):
    aot.compile_train_step(config, jax.devices())


def test_cli_prints_the_costs(idx_dir, capsys):
  assert cli.main(["compile", "--config", "cnn",
                   f"--config.data.idx_dir={idx_dir}",
                   "--config.batch_size=32"]) == 0
  out = capsys.readouterr().out
  record = json.loads(out.strip().splitlines()[-1])
  assert record["devices"] == len(jax.devices())
  assert record["batch_size"] == 32 and record["flops"] > 0
  assert "GFLOP a step" in out


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is not None,
                    reason="libtpu is installed: the topology builds")
def test_a_topology_without_libtpu_says_what_to_install(capsys):
  assert cli.main(["compile", "--config", "cnn", "--topology", "v5e:2x2"]) == 2
  assert "libtpu" in capsys.readouterr().err


def test_a_step_that_does_not_fit_is_a_clear_error(idx_dir, monkeypatch,
                                                    capsys):
  # XLA's TPU compiler's words for a step larger than HBM (as libtpu
  # 0.0.42.1 printed them for the CNN at batch 2**20 on v5e:2x2).
  message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory "
             "required for HLO temporaries (74.98G) exceeds available HBM "
             "(15.75G).")
  def compile_fails(*args, **kwargs):
    raise jax.errors.JaxRuntimeError(message)
  monkeypatch.setattr(aot, "compile_train_step", compile_fails)
  assert cli.main(["compile", "--config", "cnn",
                   f"--config.data.idx_dir={idx_dir}"]) == 2
  err = capsys.readouterr().err
  assert "does not fit" in err and "74.98G" in err and "batch_size" in err
