"""Process start-up: CPU devices per core, and multi-host through JAX's own
runtime (`jax.distributed`)."""

from __future__ import annotations

import os

import jax

MAX_CPU_DEVICES = 8
# Whether `use_cpu_cores` chose this process's CPU device count itself (no
# GENIMG_CPU_DEVICES, no forced XLA_FLAGS): configs may then use fewer.
_chose_cpu_devices = False


def default_cpu_device_count(num_cores: int) -> int:
  """The largest power of two <= min(num_cores, 8).

  A power of two divides every batch size the configs use; 8 is enough to
  keep a workstation's cores busy and keeps eval batches (1000) divisible.
  """
  count = 1
  while count * 2 <= min(num_cores, MAX_CPU_DEVICES):
    count *= 2
  return count


def use_cpu_cores() -> int | None:
  """Exposes each CPU core as an XLA CPU device; call before any JAX work.

  One XLA:CPU device does not keep all cores busy in these train steps; the
  same step split over one device per core measured up to 1.7x faster on 2
  cores (docs/performance.md). Accelerators are unaffected: the mesh is
  built over the default backend's devices. GENIMG_CPU_DEVICES=N picks N
  (1 turns this off); an XLA_FLAGS that already sets
  --xla_force_host_platform_device_count wins. Returns the count set, or None.
  """
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return None
  requested = os.environ.get("GENIMG_CPU_DEVICES")
  if requested:
    try:
      count = int(requested)
    except ValueError:
      raise ValueError(f"GENIMG_CPU_DEVICES={requested!r} must be a positive "
                       "integer (1: one CPU device).") from None
    if count < 1:
      raise ValueError(f"GENIMG_CPU_DEVICES={requested!r} must be >= 1.")
  else:
    count = default_cpu_device_count(len(os.sched_getaffinity(0)))
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError:  # Backends already initialised (e.g. in a notebook).
    return None
  global _chose_cpu_devices
  _chose_cpu_devices = not requested
  return count


def chose_cpu_devices() -> bool:
  """Whether `use_cpu_cores` set the CPU device count by its own default
  (the user set neither GENIMG_CPU_DEVICES nor a forced device count)."""
  return _chose_cpu_devices


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
