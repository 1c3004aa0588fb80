"""Orbax checkpoints of a run: the train state plus a JSON record of the run.

The data position needs no saving: batches are a function of (seed, step).
The JSON record holds the model fingerprint, so a workdir holding another
model's checkpoint fails with a clear error instead of starting afresh.

A workdir is a local directory or any URL `etils.epath` opens (gs://,
s3://: the bucket workdirs of TPU VMs; gs:// needs gcsfs, which the [tpu]
and [gcs] extras install). Orbax writes checkpoints to it itself.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
import uuid

import jax
import orbax.checkpoint as ocp
from etils import epath

from genimg_jax import config as config_lib


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used for this run, with what to do."""


# The best checkpoint by this evaluation metric (lower is better) is kept in
# WORKDIR/checkpoints_best, besides the latest ones.
BEST_METRIC = "fid"


def is_url(path: str) -> bool:
  return "://" in str(path)


def workdir_path(workdir: str, *names: str) -> str:
  """`names` joined under `workdir`: a URL stays a URL, a local path is made
  absolute."""
  if is_url(workdir):
    return "/".join([str(workdir).rstrip("/"), *names])
  return os.path.join(os.path.abspath(workdir), *names)


class Checkpointer:
  """Saves the steps the trainer asks for; keeps the last `keep`.

  best=True: the manager of WORKDIR/checkpoints_best instead, which keeps the
  one checkpoint with the lowest `BEST_METRIC` (orbax's best_fn) among those
  saved with metrics. Each is saved with `protocol`, the evaluation settings
  its metric was measured with (`config.evaluation_protocol`); opened with
  another protocol, the old best is dropped, since its FID is not comparable
  (a different feature network, reference set, sample count or sampler).
  """

  def __init__(self, workdir: str, fingerprint: dict, keep: int = 3,
               best: bool = False, protocol: dict | None = None):
    self.directory = workdir_path(
        workdir, "checkpoints_best" if best else "checkpoints")
    self.fingerprint = fingerprint
    if best:
      options = ocp.CheckpointManagerOptions(
          max_to_keep=1, best_fn=lambda metrics: metrics[BEST_METRIC],
          best_mode="min", keep_checkpoints_without_metrics=False, create=True)
    else:
      options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))
    self.protocol = protocol
    if best and protocol is not None:
      self._drop_other_protocols()

  def _drop_other_protocols(self):
    """Deletes best checkpoints measured under another protocol (one saved
    without a protocol, by an older version, is kept)."""
    for step in self.manager.all_steps():
      meta = self.manager.restore(
          step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      saved = meta.get("protocol")
      if saved is None or saved == self.protocol:
        continue
      changed = ", ".join(
          f"{k}: {saved.get(k)!r} -> {self.protocol.get(k)!r}"
          for k in sorted(saved.keys() | self.protocol.keys())
          if saved.get(k) != self.protocol.get(k))
      if jax.process_index() == 0:
        print(f"The evaluation protocol changed ({changed}): the best "
              f"checkpoint of step {step} ({BEST_METRIC} "
              f"{meta.get('metrics', {}).get(BEST_METRIC)}) is not comparable "
              "and is dropped; the best starts anew.", flush=True)
      self.manager.delete(step)

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
    if self.protocol is not None:
      meta["protocol"] = self.protocol
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

  Local workdirs: `fcntl.flock` on workdir/.lock; the kernel releases it when
  the process dies, even by SIGKILL, so a crashed run never leaves a stale
  lock. URL workdirs (a bucket has no flock): a lock object workdir/.lock
  holding the writer's host, pid, start time and a random token, deleted at
  exit. A run finding it held refuses to start unless the holder is a dead
  process of the same host (a run killed by SIGKILL) or has this process's
  own host and pid without this process holding it (a restarted container
  whose trainer is PID 1 again); a holder on another
  host cannot be checked, so the error says to delete the object once that
  run is known to be gone (e.g. a preempted VM's). Two runs starting within
  the same second can both pass (the object is written, then read back to
  check the token; object stores give no compare-and-swap through fsspec).
  Only process 0 of a multi-host run takes the lock.
  """

  def __init__(self, workdir: str):
    self.path = workdir_path(workdir, ".lock")
    self.workdir = workdir
    self._file = None
    self._token = None

  def __enter__(self):
    if jax.process_index() != 0:
      return self
    if is_url(self.path):
      self._take_lock_object()
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
            f"{self.workdir!r}. Wait for it to finish, stop it, "
            "or pass a different --workdir.") from None
      raise
    self._file.seek(0)
    self._file.truncate()
    self._file.write(str(os.getpid()))
    self._file.flush()
    return self

  def _take_lock_object(self):
    lock = epath.Path(self.path)
    if lock.exists():
      try:
        holder = json.loads(lock.read_text())
      except ValueError:
        holder = {}
      if not _is_stale(holder):
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC",
                              time.gmtime(holder.get("time", 0)))
        raise CheckpointError(
            f"Another run (host {holder.get('host', '?')}, pid "
            f"{holder.get('pid', '?')}, since {since}) holds the workdir "
            f"{self.workdir!r}: its lock object {self.path} exists. Wait for "
            "it to finish, stop it, or pass a different --workdir. If that "
            "run is gone (a preempted or deleted VM), delete the lock object "
            f"(gcloud storage rm {self.path}) and start again.")
    self._token = uuid.uuid4().hex
    lock.write_text(json.dumps({"host": socket.gethostname(),
                                "pid": os.getpid(), "time": time.time(),
                                "token": self._token}))
    if json.loads(lock.read_text()).get("token") != self._token:
      self._token = None
      raise CheckpointError(
          f"Another run took the lock object {self.path} at the same time; "
          "start only one run per --workdir.")
    _HELD_TOKENS.add(self._token)

  def __exit__(self, *exc):
    if self._file is not None:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None
    if self._token is not None:
      lock = epath.Path(self.path)
      try:
        if json.loads(lock.read_text()).get("token") == self._token:
          lock.unlink()
      except (OSError, ValueError):
        pass  # Gone or replaced: not ours to delete.
      _HELD_TOKENS.discard(self._token)
      self._token = None


# The tokens of the lock objects this process holds now.
_HELD_TOKENS: set[str] = set()


def _is_stale(holder: dict) -> bool:
  """Whether a lock object's holder {host, pid, token} is gone: a dead
  process of this host, or this very process (same host and pid) without the
  lock in hand, as after a SIGKILL or `os._exit` in a container whose trainer
  is PID 1 with a stable hostname, where the pid is reused by the restart."""
  if (holder.get("host") == socket.gethostname()
      and holder.get("pid") == os.getpid()):
    return holder.get("token") not in _HELD_TOKENS
  return _is_dead_local_process(holder)


def _is_dead_local_process(holder: dict) -> bool:
  """Whether a lock holder {host, pid} is a process of this host that no
  longer runs."""
  if holder.get("host") != socket.gethostname() or "pid" not in holder:
    return False
  try:
    os.kill(int(holder["pid"]), 0)
  except ProcessLookupError:
    return True
  except PermissionError:
    return False
  return False


def check_writable(workdir: str) -> None:
  """Raises CheckpointError if `workdir` cannot be created or written."""
  try:
    directory = epath.Path(workdir)
    directory.mkdir(parents=True, exist_ok=True)
    # Every process probes; host and pid keep their probes apart.
    probe = directory / f".write_test_{socket.gethostname()}_{os.getpid()}"
    probe.write_text("ok")
    probe.unlink()
  except Exception as e:  # pylint: disable=broad-except
    reason = getattr(e, "strerror", None) or f"{type(e).__name__}: {e}"
    if isinstance(e, KeyError) and is_url(workdir):  # No epath class for it.
      reason = ("etils.epath opens gs://, s3://, az:// and hf:// URLs and "
                "local paths only")
    hint = (" For gs:// install gcsfs (pip install 'genimg-jax[gcs]') and "
            "check the VM's service account can write the bucket."
            if is_url(workdir) else "")
    raise CheckpointError(
        f"Cannot write to the workdir {workdir!r} ({reason}). Pass a "
        f"writable --workdir with free space; nothing was trained.{hint}"
        ) from None
