"""Test set-up: 8 emulated CPU devices, and tiny data and configs."""

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

import numpy as np  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

from genimg_jax import config as config_lib  # pylint: disable=g-import-not-at-top
from genimg_jax import data  # pylint: disable=g-import-not-at-top

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
