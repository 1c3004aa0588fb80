"""Faults with real processes and signals: SIGKILL, SIGTERM, locks, bad dirs."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from genimg_jax import checkpoint, config as config_lib, train
from conftest import REPO, tiny_config, xla_flags

GENIMG = os.path.join(os.path.dirname(sys.executable), "genimg")


def _command(workdir, idx_dir, experiment="cnn.py", steps=12):
  return [GENIMG, "train", "--config",
          os.path.join(REPO, "experiments", experiment), "--workdir", workdir,
          f"--config.data.idx_dir={idx_dir}", "--config.batch_size=16",
          "--config.eval_batch_size=8", f"--config.num_steps={steps}",
          "--config.checkpoint_every=2", "--config.log_every=2",
          "--config.optimizer.warmup_steps=2"]


def _env():
  env = dict(os.environ)
  env["XLA_FLAGS"] = xla_flags(2)
  return env


def _start(workdir, idx_dir, **kw):
  return subprocess.Popen(_command(workdir, idx_dir, **kw), env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def _wait_for_checkpoint(workdir, min_step, proc, timeout=240):
  """Waits until a finished checkpoint >= min_step exists in workdir."""
  directory = os.path.join(workdir, "checkpoints")
  deadline = time.time() + timeout
  while time.time() < deadline:
    if os.path.isdir(directory):
      steps = [int(n) for n in os.listdir(directory) if n.isdigit()]
      if steps and max(steps) >= min_step:
        return max(steps)
    if proc.poll() is not None:
      raise AssertionError(f"run ended early: {proc.communicate()[1][-2000:]}")
    time.sleep(0.05)
  raise AssertionError("no checkpoint appeared")


def _final_params(workdir, idx_dir):
  config = tiny_config(idx_dir, num_steps=12)
  mesh = train.parallel.make_mesh(2)
  state = train.init_state(config, mesh, jax.random.key(0), 12)
  ckpt = checkpoint.Checkpointer(workdir, config_lib.model_fingerprint(config))
  restored = ckpt.restore_latest(state)
  ckpt.close()
  return int(restored.step), jax.device_get(restored.params)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  from conftest import write_idx_dir  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("faults")
  idx_dir = str(root / "idx")
  write_idx_dir(idx_dir)
  workdir = str(root / "uninterrupted")
  out = subprocess.run(_command(workdir, idx_dir), env=_env(),
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  return idx_dir, _final_params(workdir, idx_dir)


@pytest.mark.parametrize("kill_after_checkpoint", [2, 6])
def test_sigkill_then_resume_is_bit_identical(tmp_path, uninterrupted,
                                              kill_after_checkpoint):
  idx_dir, (want_step, want_params) = uninterrupted
  workdir = str(tmp_path / "run")
  proc = _start(workdir, idx_dir)
  _wait_for_checkpoint(workdir, kill_after_checkpoint, proc)
  proc.send_signal(signal.SIGKILL)  # Possibly in the middle of a write.
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  out = subprocess.run(_command(workdir, idx_dir), env=_env(),
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  step, params = _final_params(workdir, idx_dir)
  assert step == want_step == 12
  jax.tree.map(np.testing.assert_array_equal, params, want_params)


def test_sigterm_saves_and_exits_cleanly_then_resumes(tmp_path, uninterrupted):
  idx_dir, (_, want_params) = uninterrupted
  workdir = str(tmp_path / "run")
  proc = _start(workdir, idx_dir, steps=12)
  _wait_for_checkpoint(workdir, 2, proc)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  if "Stopping at step" in err:  # It may have finished first on a fast box.
    step, _ = _final_params(workdir, idx_dir)
    assert step < 12
  out = subprocess.run(_command(workdir, idx_dir), env=_env(),
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  step, params = _final_params(workdir, idx_dir)
  assert step == 12
  jax.tree.map(np.testing.assert_array_equal, params, want_params)


def test_two_runs_cannot_share_a_workdir(tmp_path, idx_dir):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  with checkpoint.WorkdirLock(workdir):
    with pytest.raises(checkpoint.CheckpointError, match="Another run"):
      train.train_and_evaluate(tiny_config(idx_dir), workdir)
  # Released: the same run now goes through.
  state, _ = train.train_and_evaluate(tiny_config(idx_dir, num_steps=2),
                                      workdir)
  assert int(state.step) == 2


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permissions "
                    "(test_read_only_workdir covers root)")
def test_read_only_workdir_as_user(tmp_path, idx_dir):
  workdir = tmp_path / "ro"
  workdir.mkdir()
  workdir.chmod(0o500)
  with pytest.raises(checkpoint.CheckpointError, match="Cannot write"):
    train.train_and_evaluate(tiny_config(idx_dir), str(workdir))


# Makes "$1" a read-only bind mount of itself, then runs the rest of argv.
_READ_ONLY = ('mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && '
              'shift && exec "$@"')


def _read_only_namespace(directory):
  """The argv prefix (the command follows it) that runs a command in a
  private mount namespace where `directory` is a read-only bind mount. Unlike
  permission bits, a read-only mount stops root too (EROFS). The mount ends
  with the process. `unshare --mount` needs CAP_SYS_ADMIN (root), `unshare
  --map-root-user --mount` unprivileged user namespaces; skips, giving both
  reasons, where neither is permitted (e.g. a container without them)."""
  reasons = []
  for unshare in (["unshare", "--mount"],
                  ["unshare", "--map-root-user", "--mount"]):
    prefix = [*unshare, "sh", "-c", _READ_ONLY, "sh", str(directory)]
    try:
      probe = subprocess.run(
          [*prefix, "sh", "-c", '! touch "$0/probe" 2>/dev/null',
           str(directory)], capture_output=True, text=True, timeout=60)
    except OSError as e:
      pytest.skip(f"cannot run unshare: {e}")
    if probe.returncode == 0 and not os.listdir(directory):
      return prefix
    if os.path.exists(os.path.join(directory, "probe")):
      os.remove(os.path.join(directory, "probe"))  # Mounted, but writable.
    reasons.append(f"{' '.join(unshare)}: {probe.stderr.strip()!r}")
  pytest.skip("a read-only bind mount is not permitted here: "
              + "; ".join(reasons))


def test_read_only_workdir(tmp_path, idx_dir):
  """`genimg train` on a workdir that is a read-only mount (any user, root
  included) fails at once with the workdir error, writing nothing."""
  workdir = tmp_path / "ro"
  workdir.mkdir()
  prefix = _read_only_namespace(workdir)
  out = subprocess.run([*prefix, *_command(str(workdir), idx_dir, steps=2)],
                       env=_env(), capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  assert "Cannot write to the workdir" in out.stderr, out.stderr[-2000:]
  assert "Read-only file system" in out.stderr, out.stderr[-2000:]
  assert not os.listdir(workdir)


def test_unwritable_workdir(tmp_path, idx_dir):
  blocker = tmp_path / "file"
  blocker.write_text("a file where a directory should be")
  with pytest.raises(checkpoint.CheckpointError, match="Cannot write"):
    train.train_and_evaluate(tiny_config(idx_dir), str(blocker / "run"))


def test_a_url_epath_cannot_open_is_refused_before_training(idx_dir):
  # (gs:// workdirs work: tests/test_bucket.py.)
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"Cannot write to the workdir 'hdfs://.*opens gs://"):
    train.train_and_evaluate(tiny_config(idx_dir), "hdfs://cluster/run")


def test_full_disk_is_reported(tmp_path, idx_dir):
  if not os.path.exists("/dev/full"):
    pytest.skip("no /dev/full")
  workdir = tmp_path / "run"
  workdir.mkdir()
  real_open = open

  def full_open(path, *args, **kwargs):
    if str(path).startswith(str(workdir)) and ".write_test" in str(path):
      return real_open("/dev/full", *args, **kwargs)
    return real_open(path, *args, **kwargs)

  import builtins  # pylint: disable=g-import-not-at-top
  builtins.open, saved = full_open, builtins.open
  try:
    with pytest.raises(checkpoint.CheckpointError, match="free space"):
      checkpoint.check_writable(str(workdir))
  finally:
    builtins.open = saved
