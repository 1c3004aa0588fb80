"""Multi-host start-up through JAX's own runtime (`jax.distributed`)."""

from __future__ import annotations

import os

import jax


def maybe_initialize() -> None:
  """Calls `jax.distributed.initialize()` when launched as several processes.

  On Cloud TPU VM slices JAX finds the coordinator itself: set
  GENIMG_DISTRIBUTED=1 on every worker. Elsewhere set JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES and JAX_PROCESS_ID (read here and passed on).
  """
  if not (os.environ.get("JAX_COORDINATOR_ADDRESS") or
          os.environ.get("GENIMG_DISTRIBUTED") == "1"):
    return
  # CPU processes need a collectives backend (GPUs and TPUs bring theirs).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]))
  else:
    jax.distributed.initialize()
