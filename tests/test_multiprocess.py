"""Two processes with jax.distributed on CPU equal one process."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np

from genimg_jax import checkpoint, config as config_lib, parallel, train
from conftest import REPO, tiny_config

GENIMG = os.path.join(os.path.dirname(sys.executable), "genimg")


def _command(workdir, idx_dir):
  return [GENIMG, "train", "--config",
          os.path.join(REPO, "experiments", "cnn.py"),
          "--workdir", workdir, f"--config.data.idx_dir={idx_dir}",
          "--config.batch_size=16", "--config.eval_batch_size=8",
          "--config.num_steps=4", "--config.checkpoint_every=2",
          "--config.optimizer.warmup_steps=2"]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _params(workdir, idx_dir):
  config = tiny_config(idx_dir, num_steps=4)
  state = train.init_state(config, parallel.make_mesh(4), jax.random.key(0), 4)
  ckpt = checkpoint.Checkpointer(workdir, config_lib.model_fingerprint(config))
  restored = ckpt.restore_latest(state)
  ckpt.close()
  return int(restored.step), jax.device_get(restored.params)


def test_two_processes_equal_one(tmp_path, idx_dir):
  base_env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  base_env["JAX_PLATFORMS"] = "cpu"
  single = str(tmp_path / "single")
  out = subprocess.run(
      _command(single, idx_dir), capture_output=True, text=True, timeout=300,
      env={**base_env, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  assert out.returncode == 0, out.stderr[-2000:]

  multi = str(tmp_path / "multi")
  port = _free_port()
  procs = [subprocess.Popen(
      _command(multi, idx_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True, env={**base_env,
                      "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
                      "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                      "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)})
           for i in range(2)]
  for proc in procs:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]

  step_one, params_one = _params(single, idx_dir)
  step_two, params_two = _params(multi, idx_dir)
  assert step_one == step_two == 4
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6),
               params_one, params_two)
