"""Orbax checkpoints of a run: the train state plus a JSON record of the run.

The data position needs no saving: batches are a function of (seed, step).
The JSON record holds the model fingerprint, so a workdir holding another
model's checkpoint fails with a clear error instead of starting afresh.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used for this run, with what to do."""


class Checkpointer:
  """Saves every `save_every` steps (and when forced), keeps the last `keep`."""

  def __init__(self, workdir: str, fingerprint: dict, save_every: int,
               keep: int = 3):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.fingerprint = fingerprint
    self.save_every = save_every
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore_latest(self, target_state):
    """The latest checkpoint restored into `target_state`'s structure and
    shardings, or None when the workdir has none."""
    step = self.manager.latest_step()
    if step is None:
      return None
    meta = self.manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if meta.get("fingerprint") != self.fingerprint:
      raise CheckpointError(
          f"The checkpoint at step {step} in {self.directory} is of a "
          f"different model:\n  saved: {meta.get('fingerprint')}\n  config: "
          f"{self.fingerprint}\nUse a new --workdir, or delete that directory "
          "to start afresh.")
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target_state)))
    except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
      raise CheckpointError(
          f"The checkpoint at step {step} in {self.directory} cannot be "
          f"restored into this model's state ({type(e).__name__}: {e}). Use "
          "a new --workdir, or delete the bad step directory.") from e
    return restored["state"]

  def save(self, step: int, state, extra: dict | None = None,
           force: bool = False) -> bool:
    """Saves at multiples of `save_every` (any step if `force`). Async."""
    if not force and step % self.save_every:
      return False
    meta = {"fingerprint": self.fingerprint, "step": step, **(extra or {})}
    return self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(meta)),
        force=True)

  def close(self):
    """Waits for pending writes and releases the manager."""
    self.manager.wait_until_finished()
    self.manager.close()


def replicated_abstract(state, sharding):
  """`state` as ShapeDtypeStructs carrying `sharding` (restore target)."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      state)
