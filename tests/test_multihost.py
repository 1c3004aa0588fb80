"""Two processes (jax.distributed on CPU, gloo) train, resume and evaluate
every family exactly as one process with the same global batch does; SIGTERM
to one host stops both at the same step."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from genimg_jax import data
from conftest import REPO, xla_flags

GENIMG = os.path.join(os.path.dirname(sys.executable), "genimg")

# experiment -> overrides: tiny, constant learning rates (a run resumed with
# a longer num_steps then follows the same schedule), the full evaluation.
# One entry per family; the conditional forms cover the unconditional code
# paths too (cgan: G and projection D; vae_cond: encoder and decoder).
FAMILIES = {
    "cnn": ("cnn.py", ["--config.optimizer.schedule=constant"]),
    "cgan": ("cgan.py", ["--config.eval_samples=64"]),
    "wgan_gp": ("wgan_gp.py", ["--config.eval_samples=64",
                               "--config.gan.n_critic=2"]),
    "vae_cond": ("vae_cond.py", ["--config.optimizer.schedule=constant",
                                 "--config.vae.iw_samples=2",
                                 "--config.eval_samples=64"]),
    "ddpm_cond": ("ddpm_cond.py", [
        "--config.optimizer.schedule=constant", "--config.eval_samples=64",
        "--config.model.channels=8", "--config.model.multipliers=(1,)",
        "--config.model.num_res_blocks=1",
        "--config.model.attention_resolutions=(28,)",
        "--config.diffusion.sample_steps=3", "--config.diffusion.eta=1.0",
        "--config.diffusion.guidance_scale=2.0"]),
    "autoencoder": ("autoencoder_kl.py", [
        "--config.optimizer.schedule=constant",
        "--config.autoencoder.block_out_channels=(8,16)",
        "--config.autoencoder.norm_num_groups=4"]),
}


def _base_env():
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("XLA_FLAGS", None)
  return env


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _command(experiment, workdir, idx_dir, steps, extra=()):
  return [GENIMG, "train", "--config",
          os.path.join(REPO, "experiments", experiment), "--workdir", workdir,
          f"--config.data.idx_dir={idx_dir}", "--config.batch_size=16",
          "--config.eval_batch_size=16", f"--config.num_steps={steps}",
          "--config.checkpoint_every=2", "--config.log_every=1",
          *extra]


def run_one_process(command, timeout=300):
  """The command on one process with 4 CPU devices."""
  out = subprocess.run(
      command, capture_output=True, text=True, timeout=timeout,
      env={**_base_env(),
           "XLA_FLAGS": xla_flags(4)})
  assert out.returncode == 0, out.stderr[-3000:]
  return out


def start_two_processes(command, compilation_cache_dir=None):
  """The command on two processes with 2 CPU devices each; with a
  compilation cache directory, process 0 writes it and both read it."""
  port = _free_port()
  cache = ({"JAX_COMPILATION_CACHE_DIR": compilation_cache_dir}
           if compilation_cache_dir else {})
  return [subprocess.Popen(
      command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env={**_base_env(), **cache,
           "XLA_FLAGS": xla_flags(2),
           "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
           "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)})
          for i in range(2)]


def finish(procs, timeout=300):
  """stdout + stderr of each process; fails on a non-zero exit or a
  timeout."""
  outputs = []
  for proc in procs:
    try:
      out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      raise AssertionError("a process hung: " + proc.communicate()[1][-3000:])
    assert proc.returncode == 0, err[-3000:]
    outputs.append(out + err)
  return outputs


def _eval_json(workdir):
  with open(os.path.join(workdir, "eval.json")) as f:
    return json.load(f)


def _train_losses(workdir):
  losses = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if record["split"] == "train":
        losses[record["step"]] = {k: v for k, v in record.items()
                                  if "loss" in k or "grad_norm" in k}
  return losses


# Precision and recall are fractions of images inside k-NN radii: a
# rounding-level change of one sample (1 vs 2 devices sum convolutions in
# another order) can move one image across a radius. At most one may move:
# 1 / eval_samples (64) and 1 / test images (40, conftest.write_idx_dir).
ONE_IMAGE = {"precision": 1 / 64, "recall": 1 / 40}


def _assert_close(a: dict, b: dict, rel=1e-3, abs_=1e-5):
  assert sorted(a) == sorted(b)
  for k in a:
    if isinstance(a[k], dict):
      _assert_close(a[k], b[k], rel, abs_)
    elif k == "kid_std":  # The spread of KID over subsets, a difference of
      # differences of features: ~10x FID's sensitivity to rounding.
      assert b[k] == pytest.approx(a[k], rel=10 * rel), k
    elif k in ONE_IMAGE:
      assert abs(b[k] - a[k]) <= ONE_IMAGE[k] + 1e-9, (k, a[k], b[k])
    else:
      assert b[k] == pytest.approx(a[k], rel=rel, abs=abs_), k


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_two_processes_train_resume_and_evaluate_like_one(
    tmp_path, idx_dir, family):
  """One process runs 4 steps; two processes run 2 steps (evaluate, save),
  then resume to 4 (evaluate). Same losses, metrics and sample grids."""
  experiment, extra = FAMILIES[family]
  single = str(tmp_path / "single")
  run_one_process(_command(experiment, single, idx_dir, 4, extra))
  multi = str(tmp_path / "multi")
  # The resumed run loads the first run's compiled programs (as a restarted
  # job on a pod would with a cache directory set) instead of recompiling.
  cache = str(tmp_path / "jax_cache")
  finish(start_two_processes(_command(experiment, multi, idx_dir, 2, extra),
                             cache))
  assert _eval_json(multi)["step"] == 2
  outputs = finish(start_two_processes(
      _command(experiment, multi, idx_dir, 4, extra), cache))
  # Process 0 reports the cache (process 1 writes no progress).
  assert re.search(r"Compilation cache \S+: [1-9]\d* hits", outputs[0]), (
      outputs[0][-2000:])

  want, got = _eval_json(single), _eval_json(multi)
  assert got["step"] == want["step"] == 4
  _assert_close(want, got)
  _assert_close(_train_losses(single), _train_losses(multi))
  if family == "cnn":
    return  # No samples.
  grids = sorted(n for n in os.listdir(os.path.join(single, "samples"))
                 if "000004" in n)
  assert grids and grids == sorted(
      n for n in os.listdir(os.path.join(multi, "samples")) if "000004" in n)
  for name in grids:
    a, b = (np.asarray(Image.open(os.path.join(w, "samples", name)),
                       np.float32) for w in (single, multi))
    assert np.mean(np.abs(a - b)) < 0.5, name  # uint8: rounding at most.


def test_two_processes_encode_latents_and_train_on_them_like_one(
    tmp_path, idx_dir):
  """`genimg encode-latents` on two processes writes what one process
  writes; a latent DiT (flips on, FID of decoded samples) trained on two
  processes for 2 steps and resumed to 4 matches one process's 4 steps."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from genimg_jax import autoencoder  # pylint: disable=g-import-not-at-top
  from genimg_jax.nets.autoencoder_kl import AutoencoderKL  # pylint: disable=g-import-not-at-top
  model = AutoencoderKL(1, 1, (8, 16), 1, 2, 4, scaling_factor=0.7)
  ae = str(tmp_path / "ae.msgpack")
  autoencoder.save(model, model.init(jax.random.key(3), jnp.zeros(
      (1, 28, 28, 1))), ae, source="test")
  config = os.path.join(REPO, "experiments", "latent_dit.py")
  flags = [f"--config.data.idx_dir={idx_dir}", "--config.eval_batch_size=16",
           "--config.data.random_flip=true"]
  encode = lambda out: [GENIMG, "encode-latents", "--config", config,
                        "--autoencoder", ae, "--output", out, *flags]
  one, two = str(tmp_path / "latents1"), str(tmp_path / "latents2")
  run_one_process(encode(one))
  finish(start_two_processes(encode(two)))
  for name in ("train.npz", "test.npz"):
    with np.load(os.path.join(one, name)) as a, np.load(
        os.path.join(two, name)) as b:
      assert sorted(a) == sorted(b)
      for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5)
  extra = ["--config.optimizer.schedule=constant", "--config.eval_samples=64",
           f"--config.diffusion.autoencoder={ae}",
           f"--config.diffusion.latents={one}", "--config.model.depth=1",
           "--config.model.hidden_size=32", "--config.model.num_heads=2",
           "--config.diffusion.sample_steps=2",
           "--config.data.random_flip=true"]
  single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
  run_one_process(_command("latent_dit.py", single, idx_dir, 4, extra))
  finish(start_two_processes(_command("latent_dit.py", multi, idx_dir, 2,
                                      extra)))
  finish(start_two_processes(_command("latent_dit.py", multi, idx_dir, 4,
                                      extra)))
  want, got = _eval_json(single), _eval_json(multi)
  assert got["step"] == want["step"] == 4 and "fid" in want
  _assert_close(want, got)
  _assert_close(_train_losses(single), _train_losses(multi))


def test_full_test_split_evaluation_does_not_hang(tmp_path):
  """The classifier's evaluation over 10,000 images in 625 batches: with
  independent evaluation steps in flight at once, the two processes'
  cross-process reductions could interleave differently and hang."""
  if not os.path.isdir(data.DEBIAN_FASHION_MNIST):
    pytest.skip("needs the dataset-fashion-mnist package")
  command = [GENIMG, "train", "--config",
             os.path.join(REPO, "experiments", "cnn.py"), "--workdir",
             str(tmp_path / "run"), "--config.batch_size=16",
             "--config.eval_batch_size=16", "--config.num_steps=2"]
  finish(start_two_processes(command), timeout=600)
  metrics = _eval_json(str(tmp_path / "run"))
  assert metrics["step"] == 2 and 0.0 < metrics["accuracy"] <= 1.0


def _wait_for(path, proc, timeout=300):
  deadline = time.time() + timeout
  while not os.path.exists(path):
    if proc.poll() is not None:
      raise AssertionError("ended early: " + proc.communicate()[1][-3000:])
    if time.time() > deadline:
      raise AssertionError(f"{path} did not appear")
    time.sleep(0.1)


def _stopped_together_at(outputs, workdir, num_steps) -> int:
  """The step at which both processes said they stopped, checked to be the
  same on both and the latest checkpoint."""
  stops = [[line for line in out.splitlines() if "Stopping at step" in line]
           for out in outputs]
  assert all(len(s) == 1 for s in stops), outputs[0][-2000:] + outputs[1][
      -2000:]
  step = int(stops[0][0].split("Stopping at step ")[1].split(":")[0])
  assert stops[0] == stops[1] and 2 <= step < num_steps
  saved = [int(n) for n in os.listdir(os.path.join(workdir, "checkpoints"))
           if n.isdigit()]
  assert max(saved) == step
  return step


def test_sigterm_to_one_host_stops_both_at_the_same_step(tmp_path, idx_dir):
  workdir = str(tmp_path / "run")
  command = _command("cnn.py", workdir, idx_dir, 400,
                     ["--config.optimizer.schedule=constant"])
  procs = start_two_processes(command)
  _wait_for(os.path.join(workdir, "checkpoints", "2"), procs[0])
  procs[1].send_signal(signal.SIGTERM)  # Process 0 is not told.
  step = _stopped_together_at(finish(procs), workdir, 400)
  # The same command resumes from there on both hosts.
  finish(start_two_processes(_command(
      "cnn.py", workdir, idx_dir, step + 2,
      ["--config.optimizer.schedule=constant"])))
  assert _eval_json(workdir)["step"] == step + 2


@pytest.mark.parametrize("how", ["to timeout", "to the process group"])
def test_a_notice_delivered_twice_keeps_the_preemption_checkpoint(
    tmp_path, idx_dir, how):
  """Each process under GNU `timeout`: a SIGTERM to `timeout`, or to its
  process group (a scheduler's `kill -TERM -PGID`), reaches the trainer two
  or three times within milliseconds. That is one notice: both processes
  still save the same step, exit 0 and resume."""
  workdir = str(tmp_path / "run")
  extra = ["--config.optimizer.schedule=constant"]
  procs = start_two_processes(
      ["timeout", "600", *_command("cnn.py", workdir, idx_dir, 400, extra)])
  _wait_for(os.path.join(workdir, "checkpoints", "2"), procs[0])
  if how == "to timeout":  # It forwards to the trainer, then to its group.
    procs[1].send_signal(signal.SIGTERM)
  else:  # `timeout` leads its own process group.
    os.killpg(os.getpgid(procs[1].pid), signal.SIGTERM)
  outputs = finish(procs)
  assert not any("exiting without a final checkpoint" in o for o in outputs)
  step = _stopped_together_at(outputs, workdir, 400)
  finish(start_two_processes(_command("cnn.py", workdir, idx_dir, step + 2,
                                      extra)))
  assert _eval_json(workdir)["step"] == step + 2


def test_a_hung_process_dies_after_the_grace_period():
  """The main thread blocked where Python cannot run a signal handler: the
  watchdog still ends the process after the grace period, or at once on a
  SIGTERM after the repeat window (1 s here)."""
  code = ("import threading, sys\n"
          "from genimg_jax import preemption\n"
          "with preemption.Preemption(grace_s=float(sys.argv[1])):\n"
          "  print('ready', flush=True)\n"
          "  threading.Event().wait()\n")
  for grace, signals in ((3.0, 1), (600.0, 2)):
    proc = subprocess.Popen([sys.executable, "-c", code, str(grace)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**_base_env(),
                                            "GENIMG_SIGNAL_REPEAT_S": "1"})
    assert proc.stdout.readline().strip() == "ready"
    start = time.time()
    for _ in range(signals):
      proc.send_signal(signal.SIGTERM)
      time.sleep(1.5)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "exiting without a final checkpoint" in err
    assert time.time() - start < 30


def test_two_processes_train_on_an_image_folder_like_one(tmp_path):
  """A DCGAN on a folder of PNGs and JPEGs of mixed sizes (read through
  Grain, each process its own rows): two processes (2 steps, then resumed
  to 4) give one process's losses, FID and sample grids."""
  from test_image_files import make_folder  # pylint: disable=g-import-not-at-top
  root = make_folder(str(tmp_path / "images"), classes=(), per_class=40,
                     sizes=((28, 28), (36, 30), (40, 52)))
  extra = [f"--config.data.name=folder:{root}", "--config.data.num_classes=0",
           "--config.data.eval_fraction=0.25", "--config.eval_samples=64",
           "--config.data.crop=random", "--config.data.num_workers=2"]
  single = str(tmp_path / "single")
  run_one_process(_command("dcgan.py", single, "", 4, extra))
  multi = str(tmp_path / "multi")
  cache = str(tmp_path / "jax_cache")
  for steps in (2, 4):
    finish(start_two_processes(_command("dcgan.py", multi, "", steps, extra),
                               cache))
  want, got = _eval_json(single), _eval_json(multi)
  assert got["step"] == want["step"] == 4
  # One image across a k-NN radius: 1 / 64 samples, 1 / 10 test images.
  for key, one_image in (("precision", 1 / 64), ("recall", 1 / 10)):
    assert abs(want.pop(key) - got.pop(key)) <= one_image + 1e-9, key
  _assert_close(want, got)
  # The GAN's two-player steps amplify rounding (tests/test_gan.py's 1 vs 8
  # device tolerance); other rows each step would move the losses by more.
  _assert_close(_train_losses(single), _train_losses(multi), rel=1e-2)
  with open(os.path.join(multi, "data_files.json")) as f:
    assert len(json.load(f)["list"]["splits"]["test"]) == 10


def test_two_processes_with_the_state_split_across_them(tmp_path, idx_dir):
  """mesh.fsdp=4 over two processes of 2 devices each (every parameter split
  across both hosts): the run, stopped at 2 and resumed to 4, equals one
  process's plain data-parallel run, evaluation included."""
  extra = ["--config.optimizer.schedule=constant"]
  single = str(tmp_path / "single")
  run_one_process(_command("cnn.py", single, idx_dir, 4, extra))
  multi = str(tmp_path / "multi")
  cache = str(tmp_path / "jax_cache")
  for steps in (2, 4):
    finish(start_two_processes(_command(
        "cnn.py", multi, idx_dir, steps, [*extra, "--config.mesh.fsdp=4"]),
        cache))
  want, got = _eval_json(single), _eval_json(multi)
  assert got["step"] == want["step"] == 4
  _assert_close(want, got)
  _assert_close(_train_losses(single), _train_losses(multi))
