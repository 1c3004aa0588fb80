"""SIGTERM handling: every host stops at the same step and saves; a hung
process still dies.

One process: SIGTERM sets a flag that the trainer checks after every step.
Several processes (`jax.distributed`): JAX's preemption service learns of a
SIGTERM on any host and `orbax`'s `CheckpointManager.reached_preemption(step)`
(JAX's preemption sync point) turns True on every host at the same step, so
all save the same checkpoint together and exit.

The first Ctrl-C (SIGINT) is the same notice as a SIGTERM.

Launchers deliver one notice more than once: GNU `timeout`, `kill -TERM
-PGID`, a scheduler's time limit or an init that forwards signals to the
process group send SIGTERM to the trainer and again to its group within
milliseconds. So a signal within `repeat_window_s` (default 5 s for SIGTERM,
0.5 s for SIGINT; GENIMG_SIGNAL_REPEAT_S overrides both) of the first is the
same notice and changes nothing. A SIGTERM after that window, or a second
Ctrl-C, means "exit now".

Either way a watchdog thread, woken through `signal.set_wakeup_fd` even while
the main thread is blocked inside XLA (a collective that never completes, a
hung host), ends the process `grace_s` seconds after the notice, and at once
on "exit now".
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

import jax

DEFAULT_GRACE_S = 120.0  # GENIMG_SIGTERM_GRACE_S overrides.
# Repeats within this many seconds of the notice are the same notice
# (GENIMG_SIGNAL_REPEAT_S overrides both).
DEFAULT_REPEAT_WINDOW_S = {signal.SIGTERM: 5.0, signal.SIGINT: 0.5}
EXIT_CODE = 128 + signal.SIGTERM


class _SigAction(ctypes.Structure):
  """Linux x86-64 `struct sigaction` (handler, mask, flags, restorer)."""
  _fields_ = [("handler", ctypes.c_void_p), ("mask", ctypes.c_ulong * 16),
              ("flags", ctypes.c_int), ("restorer", ctypes.c_void_p)]


def _native_sigterm_action() -> _SigAction | None:
  """The C-level SIGTERM action installed outside Python (JAX's preemption
  notifier), or None where there is none or it cannot be read."""
  if not sys.platform.startswith("linux") or callable(
      signal.getsignal(signal.SIGTERM)):  # Python's own handler is set.
    return None
  try:
    action = _SigAction()
    if ctypes.CDLL(None).sigaction(signal.SIGTERM, None,
                                   ctypes.byref(action)) != 0:
      return None
  except (OSError, AttributeError):
    return None
  # 0 and 1 are SIG_DFL and SIG_IGN: nobody outside Python is listening.
  return action if action.handler not in (None, 0, 1) else None


class Preemption:
  """Context manager; `requested(step)` says whether to save and stop now.

  `sync_point(step) -> bool`: the multi-host agreement (orbax's
  `CheckpointManager.reached_preemption`), used when several processes run.
  """

  def __init__(self, sync_point=None, grace_s: float | None = None,
               repeat_window_s: float | None = None):
    self._multihost = jax.process_count() > 1 and sync_point is not None
    self._sync_point = sync_point
    self.grace_s = float(os.environ.get("GENIMG_SIGTERM_GRACE_S",
                                        DEFAULT_GRACE_S)
                         if grace_s is None else grace_s)
    if repeat_window_s is None and "GENIMG_SIGNAL_REPEAT_S" in os.environ:
      repeat_window_s = float(os.environ["GENIMG_SIGNAL_REPEAT_S"])
    self.repeat_window_s = (dict(DEFAULT_REPEAT_WINDOW_S)
                            if repeat_window_s is None else
                            dict.fromkeys(DEFAULT_REPEAT_WINDOW_S,
                                          float(repeat_window_s)))
    self._flag = False
    self._notice_at = None  # time.monotonic() of the first signal.
    self._installed = False
    self._native = None
    self._timer = None

  def requested(self, step: int) -> bool:
    """True when this step is where every process saves and stops. Call it
    after every step, on every process."""
    if self._multihost:
      return bool(self._sync_point(step))
    return self._flag

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self._flag = True

  def _watch(self, read_fd: int):
    try:
      while data := os.read(read_fd, 64):  # b"": the trainer has finished.
        for signum in data:
          if signum in (signal.SIGTERM, signal.SIGINT):
            self._on_signal(signal.Signals(signum), time.monotonic())
    finally:
      os.close(read_fd)

  def _on_signal(self, signum: signal.Signals, now: float):
    """The watchdog's view of a SIGTERM or SIGINT delivered at `now`."""
    if self._notice_at is not None:
      after = now - self._notice_at
      if after <= self.repeat_window_s[signum]:
        return  # The same notice, delivered again (to the process group).
      self._exit(f"{'Ctrl-C' if signum == signal.SIGINT else 'SIGTERM'} "
                 f"again {after:.1f} s after the first signal",
                 128 + signum)
    self._notice_at = now
    sys.stderr.write(f"\ngenimg: {signum.name}: saving a checkpoint after "
                     "this step, then exiting (again: exit at once).\n")
    sys.stderr.flush()
    if self._native is not None:  # Tell JAX's preemption service.
      ctypes.CFUNCTYPE(None, ctypes.c_int)(self._native.handler)(
          signal.SIGTERM)
    self._timer = threading.Timer(
        self.grace_s, self._exit, (f"{self.grace_s:g} s after {signum.name}",))
    self._timer.daemon = True
    self._timer.start()

  @staticmethod
  def _exit(why: str, code: int = EXIT_CODE):
    sys.stderr.write(f"\ngenimg: exiting without a final checkpoint: {why} "
                     "and the run did not stop by itself (a hung step or "
                     "collective). Rerun the same command to resume from the "
                     "last checkpoint.\n")
    sys.stderr.flush()
    os._exit(code)  # pylint: disable=protected-access

  def __enter__(self):
    if threading.current_thread() is not threading.main_thread():
      return self  # Signals belong to the main thread: leave them alone.
    if self._multihost:
      self._native = _native_sigterm_action()
    self._previous = signal.signal(signal.SIGTERM, self._handle)
    self._previous_sigint = signal.signal(signal.SIGINT, self._handle)
    read_fd, self._write_fd = os.pipe()
    os.set_blocking(self._write_fd, False)
    self._previous_wakeup = signal.set_wakeup_fd(self._write_fd,
                                                 warn_on_full_buffer=False)
    threading.Thread(target=self._watch, args=(read_fd,), daemon=True,
                     name="genimg-sigterm-watchdog").start()
    self._installed = True
    return self

  def __exit__(self, *exc):
    if not self._installed:
      return
    if self._timer is not None:
      self._timer.cancel()
    signal.set_wakeup_fd(self._previous_wakeup)
    os.close(self._write_fd)  # Ends the watchdog thread.
    if self._native is not None:
      ctypes.CDLL(None).sigaction(signal.SIGTERM, ctypes.byref(self._native),
                                  None)
    elif self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    signal.signal(signal.SIGINT, self._previous_sigint)
    self._installed = False
