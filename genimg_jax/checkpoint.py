"""Orbax checkpoints of a run: the train state plus a JSON record of the run.

The data position needs no saving: batches are a function of (seed, step).
The JSON record holds the model fingerprint, so a workdir holding another
model's checkpoint fails with a clear error instead of starting afresh.
"""

from __future__ import annotations

import errno
import fcntl
import os

import jax
import orbax.checkpoint as ocp

from genimg_jax import config as config_lib


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used for this run, with what to do."""


# The best checkpoint by this evaluation metric (lower is better) is kept in
# WORKDIR/checkpoints_best, besides the latest ones.
BEST_METRIC = "fid"


class Checkpointer:
  """Saves the steps the trainer asks for; keeps the last `keep`.

  best=True: the manager of WORKDIR/checkpoints_best instead, which keeps the
  one checkpoint with the lowest `BEST_METRIC` (orbax's best_fn) among those
  saved with metrics.
  """

  def __init__(self, workdir: str, fingerprint: dict, keep: int = 3,
               best: bool = False):
    self.directory = os.path.abspath(os.path.join(
        workdir, "checkpoints_best" if best else "checkpoints"))
    self.fingerprint = fingerprint
    if best:
      options = ocp.CheckpointManagerOptions(
          max_to_keep=1, best_fn=lambda metrics: metrics[BEST_METRIC],
          best_mode="min", keep_checkpoints_without_metrics=False, create=True)
    else:
      options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    return self.manager.best_step()

  def restore_latest(self, target_state, step: int | None = None):
    """The latest checkpoint (or `step`) restored into `target_state`'s
    structure and shardings, or None when the workdir has none."""
    if step is None:
      step = self.manager.latest_step()
    if step is None:
      return None
    if step not in self.manager.all_steps():
      raise CheckpointError(
          f"{self.directory} has no checkpoint of step {step}; it has "
          f"{sorted(self.manager.all_steps())}.")
    meta = self.manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    changed = config_lib.fingerprint_mismatches(meta.get("fingerprint") or {},
                                                self.fingerprint)
    if changed:
      raise CheckpointError(
          f"The checkpoint at step {step} in {self.directory} is of a "
          "different experiment; these fields differ (checkpoint -> "
          "config):\n  " + "\n  ".join(changed) + "\nResume with the "
          "checkpoint's values, or use a new --workdir (run length, "
          "evaluation, logging and data location may change on resume).")
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target_state)))
    except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
      raise CheckpointError(
          f"The checkpoint at step {step} in {self.directory} cannot be "
          f"restored into this model's state ({type(e).__name__}: {e}). Use "
          "a new --workdir, or delete the bad step directory.") from e
    return restored["state"]

  def save(self, step: int, state, metrics: dict | None = None) -> bool:
    """Saves `state` as `step` (asynchronously), with its eval `metrics` (the
    best manager ranks by them)."""
    meta = {"fingerprint": self.fingerprint, "step": step}
    if metrics:
      metrics = {k: float(v) for k, v in metrics.items()}
      meta["metrics"] = metrics
    return self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(meta)),
        metrics=metrics, force=True)

  def close(self):
    """Waits for pending writes and releases the manager."""
    self.manager.wait_until_finished()
    self.manager.close()


class WorkdirLock:
  """An exclusive lock on a workdir, so two runs cannot both write to it.

  `fcntl.flock` on workdir/.lock: the kernel releases it when the process
  dies, even by SIGKILL, so a crashed run never leaves a stale lock. Only
  process 0 of a multi-host run takes it.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, ".lock")
    self._file = None

  def __enter__(self):
    if jax.process_index() != 0:
      return self
    self._file = open(self.path, "a+")
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      self._file.seek(0)
      owner = self._file.read().strip() or "unknown"
      self._file.close()
      self._file = None
      if e.errno in (errno.EAGAIN, errno.EACCES):
        raise CheckpointError(
            f"Another run (pid {owner}) is using the workdir "
            f"{os.path.dirname(self.path)!r}. Wait for it to finish, stop it, "
            "or pass a different --workdir.") from None
      raise
    self._file.seek(0)
    self._file.truncate()
    self._file.write(str(os.getpid()))
    self._file.flush()
    return self

  def __exit__(self, *exc):
    if self._file is not None:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None


def check_writable(workdir: str) -> None:
  """Raises CheckpointError if `workdir` cannot be created or written."""
  if "://" in workdir:
    raise CheckpointError(
        f"The workdir {workdir!r} is a URL; genimg writes its workdir through "
        "the local file system (the run lock needs flock). On several hosts "
        "pass a directory of a shared file system that every host mounts "
        "(e.g. Filestore/NFS at /mnt/shared/run).")
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test_{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise CheckpointError(
        f"Cannot write to the workdir {workdir!r} ({e.strerror}). Pass a "
        "writable --workdir with free space; nothing was trained.") from None
