"""Which signals are one preemption notice and which mean "exit now"."""

import signal

import pytest

from genimg_jax import preemption

TERM, INT = signal.SIGTERM, signal.SIGINT


@pytest.fixture
def exits(monkeypatch):
  calls = []
  monkeypatch.setattr(preemption.Preemption, "_exit", staticmethod(
      lambda why, code=preemption.EXIT_CODE: calls.append((why, code))))
  return calls


def _deliver(notice, signals):
  """`signals`: (signal, seconds) in order, as the watchdog reads them."""
  try:
    for signum, at in signals:
      notice._on_signal(signum, at)
  finally:
    if notice._timer is not None:
      notice._timer.cancel()


@pytest.mark.parametrize("signals", [
    [(TERM, 100.0), (TERM, 100.002)],  # `timeout`: the child, then its group.
    [(TERM, 100.0), (TERM, 100.001), (TERM, 100.003)],  # kill -TERM -PGID.
    [(TERM, 100.0), (TERM, 104.9)],
    [(INT, 100.0), (INT, 100.01)],  # Ctrl-C under `timeout`.
    [(INT, 100.0), (TERM, 100.2)],
])
def test_repeats_within_the_window_are_one_notice(exits, signals):
  _deliver(preemption.Preemption(grace_s=600), signals)
  assert exits == []


@pytest.mark.parametrize("signals,code", [
    ([(TERM, 100.0), (TERM, 105.1)], 128 + TERM),
    ([(INT, 100.0), (INT, 101.0)], 128 + INT),  # Ctrl-C twice.
    ([(TERM, 100.0), (INT, 101.0)], 128 + INT),
])
def test_a_signal_after_the_window_exits_at_once(exits, signals, code):
  _deliver(preemption.Preemption(grace_s=600), signals)
  assert len(exits) == 1 and exits[0][1] == code


def test_the_window_is_configurable(exits, monkeypatch):
  monkeypatch.setenv("GENIMG_SIGNAL_REPEAT_S", "0.001")
  _deliver(preemption.Preemption(grace_s=600), [(TERM, 100.0), (TERM, 100.1)])
  assert len(exits) == 1
