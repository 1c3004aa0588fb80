"""Ahead-of-time compilation of a run's train step, for devices not at hand.

`genimg compile --config C --topology v5e:4x4` lowers and compiles the
sharded train step that `genimg train --config C` would run, for a TPU slice
described by its topology, on this (CPU) machine, as MaxText's
`train_compile.py` does. It needs only `libtpu` (`pip install ".[tpu]"`),
no TPU. It prints the per-device memory and FLOPs of one step, so a global
batch that does not split over the slice, or a step that does not fit the
chips' memory (XLA's TPU compiler refuses it), fails before a slice is paid
for. Without `--topology` it compiles for this machine's own devices.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from genimg_jax import latents, parallel, train


class TopologyError(ValueError):
  """The topology cannot be built (no libtpu, or an unknown name)."""


def topology_devices(topology: str) -> list:
  """The devices of a TPU topology such as "v5e:4x4" or "v4:2x2x2"
  (`jax.experimental.topologies`, backed by libtpu; no TPU needed)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    return list(topologies.get_topology_desc(topology_name=topology,
                                             platform="tpu").devices)
  except Exception as e:  # pylint: disable=broad-except
    raise TopologyError(
        f"Cannot describe the TPU topology {topology!r}: {e}\nIt needs libtpu "
        "of the version that pairs with the installed jax (pip install "
        "'genimg-jax[tpu]' or 'jax[tpu]'), and a name such as v5e:2x2, "
        "v5e:4x4, v4:2x2x1, v5p:2x2x1 or v6e:4x4.") from e


def abstract_inputs(config, mesh: Mesh, num_steps: int):
  """(state, batch, rng) as `jax.ShapeDtypeStruct`s with the trainer's
  shardings: the family's state replicated or split over "fsdp"
  (`parallel.state_sharding`; shapes by `jax.eval_shape`, no
  parameters are made), the batch ("image" uint8 [B, H, W, C], "label" int32
  [B]; for latent diffusion float32 moments [B, h, w, 2c or 4c]) sharded on
  "data", the step key replicated."""
  family = train.family_module(config)
  key = jax.random.key(0)
  state = jax.eval_shape(
      lambda r: family.create_train_state(config, r, num_steps), key)
  replicated, sharded = parallel.replicated(mesh), parallel.data_sharding(mesh)
  with_sharding = lambda sharding: (lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=sharding))
  state = jax.tree.map(
      lambda x, s: with_sharding(s)(x), state,
      parallel.state_sharding(mesh, state))
  batch = {name: jax.ShapeDtypeStruct(*shape_dtype, sharding=sharded)
           for name, shape_dtype in batch_shapes(config).items()}
  rng = with_sharding(replicated)(jax.eval_shape(lambda: key))
  return state, batch, rng


def batch_shapes(config, batch_size: int | None = None) -> dict:
  """{"image": (shape, dtype), "label": ((B,), int32)} of a train batch of
  `batch_size` (default config.batch_size): images uint8 [B, H, W, C], or
  for latent diffusion float32 moments [B, h, w, 2c] (mean, logvar; 4c with
  data.random_flip, the mirrored images' after them)."""
  b = config.batch_size if batch_size is None else batch_size
  image = ((b, *config.data.image_shape), np.dtype(np.uint8))
  if latents.is_latent(config):
    h, w, c = latents.latent_shape(config)
    moments = 4 if config.data.get("random_flip", False) else 2
    image = ((b, h, w, moments * c), np.dtype(np.float32))
  return {"image": image, "label": ((b,), np.dtype(np.int32))}


def lower_train_step(config, devices: list, num_steps: int = 1000):
  """The trainer's jitted train step lowered for `devices` (the trainer's
  mesh over all of them: "data", or "data" x "fsdp" with config.mesh.fsdp) from abstract inputs (`jax.stages.Lowered`).

  Raises ValueError when the global batch does not split over the devices
  and their hosts.
  """
  mesh = parallel.mesh_of(devices, config.mesh.get("fsdp", 1))
  parallel.check_global_batch(config.batch_size, mesh)
  state, batch, rng = abstract_inputs(config, mesh, num_steps)
  return train.compile_train_step(config, mesh).lower(state, batch, rng)


def compile_train_step(config, devices: list, num_steps: int = 1000):
  """`lower_train_step` compiled (`jax.stages.Compiled`); XLA's error when
  the step does not compile (e.g. does not fit the devices' memory)."""
  return lower_train_step(config, devices, num_steps).compile()


def step_costs(compiled) -> dict:
  """Per-device memory (bytes) and FLOPs of one call of `compiled`.

  peak_bytes = arguments + outputs - aliased (the donated state) + temporaries,
  XLA's own accounting of the program's buffers (code size not included).
  """
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  record = {name: int(getattr(memory, f"{name}_size_in_bytes"))
            for name in ("argument", "output", "alias", "temp",
                         "generated_code")}
  record["peak_bytes"] = (record["argument"] + record["output"] -
                          record["alias"] + record["temp"])
  record["flops"] = float(cost.get("flops", 0.0))
  return record


def run(config, topology: str | None) -> dict:
  """Compiles `config`'s train step for `topology` (None: this machine's
  devices), prints and returns what it costs each device."""
  devices = topology_devices(topology) if topology else jax.devices()
  try:
    costs = step_costs(compile_train_step(config, devices))
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    raise ValueError(
        f"The train step at global batch {config.batch_size} does not fit "
        f"{len(devices)} x {devices[0].device_kind}: "
        f"{str(e).strip().splitlines()[0]}\nLower --config.batch_size, or "
        "use more devices.") from None
  costs.update(device_kind=devices[0].device_kind, devices=len(devices),
               hosts=len({d.process_index for d in devices}),
               batch_size=config.batch_size, topology=topology or "")
  gib = lambda n: f"{n / 2**30:.3f} GiB"
  print(f"{config.family} step, global batch {config.batch_size}, on "
        f"{len(devices)} x {costs['device_kind']} ({costs['hosts']} hosts); "
        f"per device: {gib(costs['peak_bytes'])} of buffers (arguments "
        f"{gib(costs['argument'])}, temporaries {gib(costs['temp'])}), "
        f"{costs['flops'] / 1e9:.2f} GFLOP a step")
  return costs
