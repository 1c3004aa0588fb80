"""The device mesh and the shardings of data-parallel training.

The trainer builds one `Mesh` over the devices and passes it down. By default
the mesh has one "data" axis: batches are sharded along it, the train state
replicated. With `config.mesh.fsdp = k > 1` it has the axes ("data", "fsdp")
of sizes (devices / k, k): batches are sharded over both, and every leaf of
the train state (parameters, EMA, optimizer state) over "fsdp" along its
largest dimension divisible by k (`state_sharding`; FSDP / ZeRO-3 style).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
# XLA:CPU's list of YNNPACK fusion types; empty sends convolutions, dots and
# reductions to XLA's own CPU emitters (see `compiler_options`).
YNN_FUSION_OPTION = "xla_cpu_experimental_ynn_fusion_type"
# The types that list takes (jaxlib 0.10), by their config names.
YNN_FUSION_TYPES = ("dot", "eltwise", "reduce", "individual_dot",
                    "individual_convolution")


def make_mesh(num_devices: int = 0, fsdp: int = 1) -> Mesh:
  """A mesh over the first `num_devices` devices (0: all, every host): 1-D
  ("data") for fsdp 1, else ("data", "fsdp") of shape (devices / fsdp,
  fsdp)."""
  devices = jax.devices()
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(
          f"mesh.num_devices={num_devices} but only {len(devices)} devices "
          f"are visible ({devices[0].platform}). Use mesh.num_devices=0 for "
          "all of them.")
    if jax.process_count() > 1 and num_devices != len(devices):
      raise ValueError("With several processes the mesh must span all "
                       "devices: set mesh.num_devices=0.")
    devices = devices[:num_devices]
  return mesh_of(devices, fsdp)


def mesh_of(devices, fsdp: int = 1) -> Mesh:
  """`devices` as a "data" mesh, or a ("data", "fsdp") one for fsdp > 1."""
  if fsdp <= 1:
    return Mesh(np.asarray(devices), (DATA_AXIS,))
  if len(devices) % fsdp:
    raise ValueError(f"mesh.fsdp={fsdp} does not divide the {len(devices)} "
                     "devices of the mesh; use a divisor of the device count.")
  return Mesh(np.asarray(devices).reshape(-1, fsdp), (DATA_AXIS, FSDP_AXIS))


def compiler_options(config, mesh: Mesh) -> dict[str, str]:
  """XLA options for the programs a run compiles for `mesh` (the train step
  and the evaluation programs), per program (no process-wide XLA_FLAGS).

  When the mesh's devices are CPUs and `config.xla_cpu_ynn_fusions` is
  False: `{YNN_FUSION_OPTION: types}`, XLA's own convolution, dot and
  reduction emitters instead of YNNPACK fusions, except the fusion types
  named in `config.xla_cpu_ynn_fusions_kept` (comma-separated
  `YNN_FUSION_TYPES`, e.g. "reduce": "" keeps none). Else {} (other
  backends, or a config without the field: XLA's defaults).
  """
  if (mesh.devices.flat[0].platform != "cpu" or
      config.get("xla_cpu_ynn_fusions", True)):
    return {}
  kept = [t.strip().lower() for t in
          config.get("xla_cpu_ynn_fusions_kept", "").split(",") if t.strip()]
  unknown = sorted(set(kept) - set(YNN_FUSION_TYPES))
  if unknown:
    raise ValueError(
        f"xla_cpu_ynn_fusions_kept names unknown YNNPACK fusion types "
        f"{unknown}; use a comma-separated subset of {list(YNN_FUSION_TYPES)} "
        "or '' for none.")
  return {YNN_FUSION_OPTION: ",".join(
      "LIBRARY_FUSION_TYPE_" + t.upper() for t in kept)}


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data axis (over "data" and
  "fsdp" together on an FSDP mesh: every device its own rows)."""
  if FSDP_AXIS in mesh.axis_names:
    return NamedSharding(mesh, P((DATA_AXIS, FSDP_AXIS)))
  return NamedSharding(mesh, P(DATA_AXIS))


def state_sharding(mesh: Mesh, abstract_state):
  """The shardings of a train state (a pytree of arrays or
  `jax.ShapeDtypeStruct`s) on `mesh`: all replicated without an "fsdp"
  axis; else each leaf split over "fsdp" along its largest dimension that
  the axis size divides (the first of equal ones), replicated when none
  does (scalars, small vectors)."""
  if FSDP_AXIS not in mesh.axis_names:
    return jax.tree.map(lambda _: replicated(mesh), abstract_state)
  k = mesh.shape[FSDP_AXIS]

  def leaf(x):
    shape = tuple(getattr(x, "shape", ()))
    dims = [i for i, d in enumerate(shape) if d >= k and d % k == 0]
    if not dims:
      return replicated(mesh)
    axis = max(dims, key=lambda i: (shape[i], -i))
    return NamedSharding(mesh, P(*[FSDP_AXIS if i == axis else None
                                   for i in range(len(shape))]))
  return jax.tree.map(leaf, abstract_state)


def gather(tree, mesh: Mesh):
  """A pytree of (possibly FSDP-sharded) arrays, replicated on `mesh`."""
  return jax.jit(lambda t: t, out_shardings=replicated(mesh))(tree)


def replicated(mesh: Mesh) -> NamedSharding:
  """The same full copy on every device of the mesh."""
  return NamedSharding(mesh, P())


def check_global_batch(global_batch: int, mesh: Mesh) -> None:
  """Raises a ValueError unless the batch splits evenly over the mesh's
  devices and their hosts (those of a TPU topology too)."""
  n = mesh.devices.size
  hosts = len({d.process_index for d in mesh.devices.flat})
  if global_batch % n or global_batch % hosts:
    raise ValueError(
        f"The global batch size {global_batch} is not divisible by the "
        f"{n} devices of the mesh ({hosts} processes). Set "
        f"--config.batch_size to a multiple of {n}, e.g. "
        f"{max(n, global_batch // n * n)}.")


def fit_to_devices(rows: int, mesh: Mesh) -> int:
  """`rows` rounded down to a multiple of the mesh's device count, at least
  one row per device: a batch size that shards evenly."""
  devices = mesh.devices.size
  return max(rows - rows % devices, devices)


def replicate(tree, mesh: Mesh):
  """Places a pytree of host values (the same on every process) on every
  device of `mesh`; works for PRNG keys and across hosts."""
  return jax.jit(lambda: tree, out_shardings=replicated(mesh))()


def shard_host_array(x: np.ndarray, mesh: Mesh) -> jax.Array:
  """A numpy array that every process holds in full -> a global array
  sharded on the data axis (each device gets its slice)."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, data_sharding(mesh),
                                      lambda index: x[index])


def to_host(x: jax.Array) -> np.ndarray:
  """The full value of a (possibly multi-host) sharded array on every host."""
  if x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def map_batches(fn, arrays, mesh: Mesh, batch_size: int = 512):
  """Runs `fn(*sharded_chunks) -> pytree of [b, ...] arrays` over host arrays
  of equal length N in chunks of `batch_size` (rounded down to a multiple of
  the device count, and no larger than N rounded up to one, so that a few
  images do not cost a whole batch; the last chunk padded with copies of its
  last row, so that every chunk has one shape and compiles once).

  Returns the outputs as numpy arrays of length N, on every host.
  """
  devices = mesh.devices.size
  n = len(arrays[0])
  batch_size = min(fit_to_devices(batch_size, mesh),
                   -(-n // devices) * devices)
  outputs = []
  for start in range(0, n, batch_size):
    chunks = [np.asarray(a[start:start + batch_size]) for a in arrays]
    real = len(chunks[0])
    chunks = [np.concatenate([c, np.repeat(c[-1:], batch_size - real, 0)])
              for c in chunks]
    out = fn(*[shard_host_array(c, mesh) for c in chunks])
    outputs.append(jax.tree.map(lambda x: to_host(x)[:real], out))
  return jax.tree.map(lambda *xs: np.concatenate(xs), *outputs)
