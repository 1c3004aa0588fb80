"""Test set-up: 8 emulated CPU devices, tiny data and configs, and the
comparisons of runs on 1 and 8 devices (or other meshes)."""

import os
import re

# Most of the suite's time is XLA:CPU compiling tiny programs. LLVM at -O1
# instead of -O2 compiles them faster (DCGAN and UNet steps: 25-30% less
# compile time) and runs them 5-10% slower; XLA's HLO passes, and so what a
# program computes, are the same. Set --xla_backend_optimization_level in
# XLA_FLAGS yourself to test at another level.
_OPT_LEVEL = re.search(r"--xla_backend_optimization_level=\S+",
                       os.environ.get("XLA_FLAGS", ""))
OPT_LEVEL_FLAG = (_OPT_LEVEL.group(0) if _OPT_LEVEL else
                  "--xla_backend_optimization_level=1")


def xla_flags(device_count: int) -> str:
  """XLA_FLAGS for a test or its subprocess: `device_count` CPU devices,
  the suite's LLVM optimisation level."""
  return (f"--xla_force_host_platform_device_count={device_count} "
          f"{OPT_LEVEL_FLAG}")


os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", "").replace(OPT_LEVEL_FLAG, ""),
     xla_flags(8)])
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A compilation cache for this test session only: runs that compile the same
# step again (a resumed run, the same config on another test) read it back.
import tempfile  # pylint: disable=g-import-not-at-top
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      tempfile.mkdtemp(prefix="genimg-test-jax-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

import json  # pylint: disable=g-import-not-at-top
import math  # pylint: disable=g-import-not-at-top
from typing import NamedTuple  # pylint: disable=g-import-not-at-top

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

from genimg_jax import config as config_lib  # pylint: disable=g-import-not-at-top
from genimg_jax import data, parallel, train  # pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_idx_dir(directory, num_train=128, num_test=40, seed=0, hw=28):
  """Random MNIST-format IDX files; returns (train, test) ArraySources."""
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  splits = {}
  for prefix, n in (("train", num_train), ("t10k", num_test)):
    images = rng.integers(0, 256, (n, hw, hw), dtype=np.uint8)
    labels = rng.integers(0, 10, (n,), dtype=np.uint8)
    data.write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"),
                   images)
    data.write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"),
                   labels)
    splits[prefix] = data.ArraySource(images[..., None], labels.astype(np.int32))
  return splits["train"], splits["t10k"]


@pytest.fixture
def idx_dir(tmp_path):
  directory = str(tmp_path / "idx")
  write_idx_dir(directory)
  return directory


def tiny_config(idx_dir, experiment="cnn.py", **overrides):
  """The real experiment config, shrunk to a few steps on tiny data."""
  config = config_lib.load_config_file(os.path.join(REPO, "experiments",
                                                    experiment))
  base = {"data.idx_dir": idx_dir, "batch_size": "16", "eval_batch_size": "16",
          "num_steps": "6", "checkpoint_every": "3", "log_every": "2",
          "eval_every": "0", "optimizer.warmup_steps": "2",
          "eval_samples": "0"}
  valid = config_lib.flat_keys(config)
  base = {k: v for k, v in base.items() if k in valid}
  base.update({k: str(v) for k, v in overrides.items()})
  return config_lib.apply_overrides(config, [f"{k}={v}" for k, v in
                                             base.items()])


# --- Runs on several meshes, compared -----------------------------------------

def params_of(state):
  """The state's parameters as numpy arrays on the host."""
  return jax.tree.map(np.asarray, jax.device_get(state.params))


def train_metrics(workdir):
  """{name: [value at step 1, 2, ...]} from the run's metrics.jsonl."""
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  rows = [r for r in rows if r["split"] == "train"]
  assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
  return {k: np.array([r[k] for r in rows]) for k in rows[0]
          if k not in ("step", "split")}


class Run(NamedTuple):
  """A finished `train.train_and_evaluate`: its final state, final
  evaluation and logged train metrics ({name: value per step})."""
  state: object
  evaluation: dict
  metrics: dict


def train_runs(tmp_path, configs: dict) -> dict:
  """{name: Run} of `train.train_and_evaluate` on each of `configs`
  ({name: config}) in tmp_path/name; each ran and logged all its
  config.num_steps steps."""
  runs = {}
  for name, config in configs.items():
    workdir = str(tmp_path / str(name))
    state, evaluation = train.train_and_evaluate(config, workdir)
    runs[name] = Run(state, evaluation, train_metrics(workdir))
    assert int(state.step) == config.num_steps, name
    assert all(len(v) == config.num_steps for v in runs[name].metrics.values())
  return runs


def steps_on_mesh(config, num_devices: int, batches, num_train_steps: int):
  """(initial state, final state, metrics {name: value per step}), on the
  host, of the compiled train step run once on each of `batches` (host
  arrays, sharded on the mesh) on the first `num_devices` devices. The state
  is initialised from key 0 for a run of `num_train_steps`; key 1 drives
  the steps."""
  mesh = parallel.make_mesh(num_devices)
  state = train.init_state(config, mesh, jax.random.key(0), num_train_steps)
  initial = jax.device_get(state)
  step = train.compile_train_step(config, mesh)
  rng = parallel.replicate(jax.random.key(1), mesh)
  history = []
  for batch in batches:
    state, metrics = step(state, {k: parallel.shard_host_array(v, mesh)
                                  for k, v in batch.items()}, rng)
    history.append(jax.device_get(metrics))
  return initial, jax.device_get(state), {
      k: np.array([m[k] for m in history]) for k in history[0]}


def assert_metrics_agree(a: dict, b: dict, rtol: float, names=None,
                         atol: float = 0.0):
  """Per step, b's metric within atol + rtol * |a's| for each of `names`
  (default: all of a's); the same number of steps, no NaN."""
  for name in names or a:
    np.testing.assert_allclose(b[name], a[name], rtol=rtol, atol=atol,
                               equal_nan=False, err_msg=name)


def assert_trees_near(a, b, rtol: float, floor: float = 0.0,
                      atol: float = 0.0):
  """Each leaf's ||a - b|| (float64) is at most rtol * max(||a||, ||b||,
  floor) + atol * sqrt(leaf size); a and b have the same paths.

  A norm per leaf, not a bound per element: Adam turns a gradient element
  near 0 into a full-size step of either sign, so one element may differ a
  lot between two CPUs (their vector widths sum in other orders) while the
  leaf as a whole agrees to ~1e-6. `floor` keeps leaves at rounding level
  (biases behind zero-initialised layers) from asking for relative
  agreement of rounding noise.
  """
  paths_a, leaves_a = zip(*jax.tree_util.tree_leaves_with_path(a))
  paths_b, leaves_b = zip(*jax.tree_util.tree_leaves_with_path(b))
  assert paths_a == paths_b
  for path, x, y in zip(paths_a, leaves_a, leaves_b):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    scale = max(np.linalg.norm(x), np.linalg.norm(y), floor)
    diff = np.linalg.norm(x - y)
    bound = rtol * scale + atol * math.sqrt(x.size)
    assert diff <= bound, (f"{jax.tree_util.keystr(path)}: ||a - b|| = "
                           f"{diff:.3g} > {bound:.3g} (scale {scale:.3g})")


def assert_runs_agree(a: Run, b: Run, names, rtol: float, params_rtol: float,
                      params_floor: float = 0.0):
  """Two runs of the same training on different meshes agree: each step's
  logged `names` and the final evaluation's loss within `rtol` (relative),
  each parameter leaf within `params_rtol` (`assert_trees_near`)."""
  assert_metrics_agree(a.metrics, b.metrics, rtol, names)
  assert b.evaluation["loss"] == pytest.approx(a.evaluation["loss"], rel=rtol)
  assert_trees_near(params_of(a.state), params_of(b.state), params_rtol,
                    params_floor)


def pytest_xdist_auto_num_workers(config):
  """`-n auto` (pyproject's addopts): one worker per core, at most 4.

  Each worker holds 8 emulated devices and its own compiled programs (about
  1-3 GB); the two-process tests start two more processes each.
  """
  del config
  cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
           else os.cpu_count() or 1)  # macOS has no sched_getaffinity.
  return max(1, min(cores, 4))


def pytest_collection_modifyitems(items):
  """The two-process tests (the suite's longest, 1-4 min each) first, so
  that pytest-xdist's workers do not wait on one of them at the end."""
  items.sort(key=lambda item: item.path.name != "test_multihost.py")
