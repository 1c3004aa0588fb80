"""`genimg bench`: throughput of the compiled train steps.

Each model's real train step (the function training uses, jitted with the same
shardings by `train.compile_train_step`) is compiled, warmed up, and timed step by
step, blocking on the new state. Synthetic uint8 data by default, so the step
is measured alone; `input="real"` includes the input pipeline. With a
profile directory the timed steps also run under `jax.profiler.trace`, and
the record lists the XLA ops that took the most time, with the model layer
each came from. `sweep` doubles each model's batch on 1 device until it no
longer fits (experiments/gpu_bench.sh). Each record's fraction of peak uses
the peak of how its matmuls ran: bfloat16, TF32 (float32 on Ampere and newer
GPUs by default) or float32.
"""

from __future__ import annotations

import collections
import gc
import glob
import gzip
import json
import math
import os
import re
import statistics
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from genimg_jax import config as config_lib, data, parallel, train

# Model name -> the experiment config whose train step is timed.
MODELS = {"cnn": "cnn", "resnet": "resnet", "dcgan": "dcgan",
          "vae": "vae_conv", "vae_mlp": "vae_mlp", "ddpm": "ddpm",
          "flow": "flow"}


def split_models(text: str) -> list[str]:
  """`--model`'s comma-separated names; a config argument may hold commas.

  "ddpm:cifar10,full,cnn" -> ["ddpm:cifar10,full", "cnn"]: after a name
  with an argument, a part that does not start with a model name (or "all")
  continues that argument. ("cnn,gpt" stays two names, so that a typo is
  reported as an unknown model.)
  """
  models = []
  for part in text.split(","):
    if (models and ":" in models[-1] and
        config_lib.split_config_arg(part)[0] not in (*MODELS, "all")):
      models[-1] += "," + part
    else:
      models.append(part)
  return models


# Published dense (not sparse) peak FLOP/s per device: (substring of
# device_kind, float32, tensorfloat32, bfloat16), first match wins. float32 on
# GPUs is the non-tensor-core rate; tensorfloat32 is None where there is none.
PEAK_FLOPS = (
    ("H100 PCIe", 51.2e12, 378e12, 756e12),
    ("H100", 67e12, 494.7e12, 989e12), ("H200", 67e12, 494.7e12, 989e12),
    ("A100", 19.5e12, 156e12, 312e12), ("V100", 15.7e12, None, 125e12),
    ("L4", 30.3e12, 60e12, 121e12), ("TPU v4", 275e12, None, 275e12),
    ("TPU v5 lite", 197e12, None, 197e12), ("TPU v5e", 197e12, None, 197e12),
    ("TPU v5p", 459e12, None, 459e12), ("TPU v5", 459e12, None, 459e12),
    ("TPU v6", 918e12, None, 918e12),
)


def measured_cpu_peak(dtype=jnp.float32, n: int = 1024, repeats: int = 5,
                      mesh=None):
  """FLOP/s of n x n matmuls, one on each device of `mesh` at once (default:
  the first device alone), best of `repeats`.

  On CPU this is the host's rate, not one device's times the device count:
  XLA:CPU runs a single device's matmul on every core (on 2 cores: 115-120
  GFLOP/s for device 0 alone, 105-113 for both devices at once;
  docs/performance.md).
  """
  if mesh is None:
    mesh = parallel.make_mesh(1)
  sharding = parallel.data_sharding(mesh)
  a = jax.jit(lambda: jnp.ones((mesh.devices.size, n, n), dtype),
              out_shardings=sharding)()
  matmul = jax.jit(lambda x: jnp.einsum("dij,djk->dik", x, x),
                   out_shardings=sharding)
  matmul(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * mesh.devices.size * n**3 / best


def float32_matmul(device) -> str:
  """How `device` runs float32 matmuls and convolutions under the current
  `jax_default_matmul_precision`: "tf32", "float32" or "n/a" (TPUs).

  XLA lets NVIDIA GPUs of compute capability 8.0 and up (Ampere, Hopper, ...)
  round float32 operands to TensorFloat-32 unless the precision is the
  highest ("highest", "float32", "F32_F32_F32") or NVIDIA_TF32_OVERRIDE=0.
  CPUs compute in float32; TPUs' passes of bfloat16 are not tracked here.
  """
  if device.platform == "cpu":
    return "float32"
  if device.platform != "gpu":
    return "n/a"
  try:
    major = int(str(getattr(device, "compute_capability", "")).split(".")[0])
  except ValueError:  # Not an NVIDIA GPU (ROCm names a gfx target).
    return "n/a"
  precision = jax.config.jax_default_matmul_precision
  if (major < 8 or os.environ.get("NVIDIA_TF32_OVERRIDE") == "0" or
      precision in ("highest", "float32", "F32_F32_F32")):
    return "float32"
  return "tf32"


def published_peak(device, dtype: str,
                   matmul: str = "float32") -> tuple[float, str] | None:
  """(published dense peak FLOP/s of one `device`, its kind: "bf16", "tf32"
  or "fp32") for a step in `dtype` whose float32 matmuls run as `matmul`
  (`float32_matmul`); None for a device not in `PEAK_FLOPS` (CPUs)."""
  for name, f32, tf32, bf16 in PEAK_FLOPS:
    if name.lower() in device.device_kind.lower():
      if dtype == "bfloat16":
        return bf16, "bf16"
      if matmul == "tf32" and tf32:
        return tf32, "tf32"
      return f32, "fp32"
  return None


def peak_flops(device, dtype: str, matmul: str = "float32",
               mesh=None) -> tuple[float, str, str]:
  """(peak FLOP/s of `mesh`, where the number comes from, its kind).

  mesh: the devices a step runs on (default: `device` alone). A published
  per-device peak counts once per device; without one (CPUs) the peak is
  `measured_cpu_peak` on all the mesh's devices at once, which on CPU is the
  host's rate however many devices share its cores. matmul:
  `float32_matmul(device)`; with "tf32" a float32 step is held to the
  TensorFloat-32 peak. kind: "bf16", "tf32" or "fp32".
  """
  devices = 1 if mesh is None else int(mesh.devices.size)
  published = published_peak(device, dtype, matmul)
  if published is not None:
    return published[0] * devices, "published", published[1]
  kind = "bf16" if dtype == "bfloat16" else "fp32"
  return (measured_cpu_peak(jnp.dtype(dtype), mesh=mesh), "measured matmul",
          kind)


def load_model_config(model: str, batch: int, dtype: str, devices: int,
                      overrides=()):
  """The experiment config of `model`, which may end in :ARG, the config's
  argument (e.g. dcgan:celeb_a64, to time the CelebA input pipeline), with
  the bench's batch, dtype and devices, then `overrides` ("KEY=VALUE", e.g.
  "xla_cpu_ynn_fusions=false") applied."""
  name, arg = config_lib.split_config_arg(model)
  if name not in MODELS:
    raise config_lib.ConfigError(
        f"Unknown model {name!r} for bench; choose from {sorted(MODELS)} "
        "or all (each may end in :ARG, the config's argument).")
  path = MODELS[name] + (f":{arg}" if arg else "")
  config = config_lib.load_config_file(path)  # The installed one.
  return config_lib.apply_overrides(config, [
      f"batch_size={batch}", f"model.dtype={dtype}",
      f"mesh.num_devices={devices}", "num_steps=1000", *overrides])


def synthetic_batch(config, mesh) -> dict:
  """Random uint8 images and in-range labels as one global sharded batch."""
  rng = np.random.default_rng(0)
  n = config.batch_size // jax.process_count()
  local = {"image": rng.integers(0, 256, (n, *config.data.image_shape),
                                 dtype=np.uint8),
           "label": rng.integers(0, max(config.data.num_classes, 1), (n,),
                                 dtype=np.int32)}
  return data.to_global_array(local, mesh)


def flops_of(program) -> float:
  """FLOPs of one call of `program`, from XLA's cost analysis.

  program: a `jax.stages.Lowered` (the whole computation as JAX lowered it,
  before any backend pass: the count of the work asked for, the same on
  every backend and device count) or a `Compiled` (one device's program
  after XLA's passes; XLA:GPU counts no FLOPs for the convolutions it hands
  to cuDNN, so its count of a conv net is too low, and moves with the batch
  as the choice of kernels does).
  """
  analysis = program.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis.get("flops", 0.0))


# Trace events of the runtime's own bookkeeping (host calls, executors,
# waits), not XLA ops.
_RUNTIME_EVENTS = ("$", "[", "end:", "PjitFunction", "Common", "ThunkExecutor",
                   "Wait", "Rendezvous", "InvokeRendezvous", "Threadpool")


def top_ops(trace_dir: str, hlo_text: str, steps: int, devices: int,
            count: int = 10) -> list[dict]:
  """The `count` XLA ops with the most time in a `jax.profiler` trace.

  Reads the Perfetto trace under `trace_dir`. Each entry: op (the HLO
  instruction), layer (its source op_name from `hlo_text`, "" if none) and
  ms_per_step (summed over the trace, divided by `steps` and `devices`).
  """
  files = glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"),
                    recursive=True)
  if not files:
    return []
  with gzip.open(max(files, key=os.path.getmtime)) as f:
    events = json.load(f)
  if isinstance(events, dict):
    events = events["traceEvents"]
  totals = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and not e["name"].startswith(_RUNTIME_EVENTS):
      totals[e["name"]] += e["dur"] / 1e3 / steps / devices
  layers = _op_sources(hlo_text)
  return [{"op": name, "layer": layers.get(name, ""), "ms_per_step": ms}
          for name, ms in totals.most_common(count)]


def _op_sources(hlo_text: str) -> dict[str, str]:
  """HLO instruction -> the op_name it came from, or, for a fusion without
  one, the opcode and shape of its fused computation's root."""
  roots = {}  # computation -> "opcode shape" of its ROOT.
  for block in hlo_text.split("\n\n"):
    header = re.match(r"\s*(?:ENTRY )?%([\w.\-]+) ", block)
    root = re.search(r"ROOT %[\w.\-]+ = (\S+) ([\w\-]+)\(", block)
    if header and root:
      roots[header.group(1)] = f"{root.group(2)} {root.group(1)}"
  sources = {}
  for line in hlo_text.splitlines():
    name = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = ", line)
    if not name:
      continue
    op_name = re.search(r'op_name="([^"]*)"', line)
    calls = re.search(r"calls=%([\w.\-]+)", line)
    if op_name:
      sources[name.group(1)] = op_name.group(1)
    elif calls and calls.group(1) in roots:
      sources[name.group(1)] = roots[calls.group(1)]
  return sources


def memory_fields(compiled, state, device) -> dict:
  """The step's memory on one device, for the sweep's batch prediction:
  memory_bytes (XLA's analysis: arguments + outputs - donated + temporaries),
  state_bytes (the train state's arrays), memory_limit_bytes (what the device
  reports it can hold; None on CPU)."""
  analysis = compiled.memory_analysis()
  used = None
  if analysis is not None:
    used = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
            - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)
  stats = device.memory_stats() or {}
  return {"memory_bytes": used,
          "state_bytes": sum(x.nbytes for x in jax.tree.leaves(state)),
          "memory_limit_bytes": stats.get("bytes_limit")}


def loader_throughput(source, batch: int, steps: int, mesh,
                      seed: int = 1) -> float:
  """Images/s of the input pipeline alone: `steps` global batches of
  `source` read, decoded, transformed and placed on `mesh` (after one
  batch of warm-up), with no train step."""
  batches = data.train_batches(source, batch, seed, 0, steps + 1, mesh)
  jax.block_until_ready(next(batches)[1])
  start = time.perf_counter()
  for _, b in batches:
    jax.block_until_ready(b)
  return steps * batch / (time.perf_counter() - start)


def bench_one(model: str, batch: int, steps: int = 20, warmup: int = 3,
              dtype: str = "float32", devices: int = 0,
              input_pipeline: str = "synthetic",
              profile_dir: str | None = None, overrides=()) -> dict:
  """Compiles and times `steps` train steps of `model`; returns one record.

  overrides: config "KEY=VALUE" strings (`load_model_config`).

  profile_dir: also trace the timed steps with `jax.profiler` into
  profile_dir/MODEL_bBATCH_dDEVICES_DTYPE and add the record's "top_ops".
  """
  config = load_model_config(model, batch, dtype, devices, overrides)
  mesh = parallel.make_mesh(devices)
  parallel.check_global_batch(batch, mesh)
  state = train.init_state(config, mesh, jax.random.key(0), config.num_steps)
  train_step = train.compile_train_step(config, mesh)
  rng = parallel.replicate(jax.random.key(1), mesh)
  batch_data = synthetic_batch(config, mesh)

  start = time.perf_counter()
  lowered = train_step.lower(state, batch_data, rng)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  # The whole step over the global batch, counted before XLA's backend
  # passes (`flops_of`): the same count on CPU, GPU and TPU.
  flops = flops_of(lowered)

  loader_images_per_s = None
  if input_pipeline == "real":
    source = data.load_split(config.data, "train")
    loader_images_per_s = loader_throughput(source, batch, steps, mesh)
    batches = (b for _, b in data.train_batches(
        source, batch, 0, 0, warmup + steps, mesh))
  else:
    batches = iter(lambda: batch_data, None)
  for _ in range(warmup):
    state, _ = compiled(state, next(batches), rng)
  jax.block_until_ready(state)
  trace_dir = None
  if profile_dir:
    trace_dir = os.path.join(
        profile_dir, f"{model}_b{batch}_d{mesh.devices.size}_{dtype}")
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
  times = []
  try:
    for _ in range(steps):
      t0 = time.perf_counter()
      state, _ = compiled(state, next(batches), rng)
      jax.block_until_ready(state)
      times.append(time.perf_counter() - t0)
  finally:
    if trace_dir:
      jax.profiler.stop_trace()

  device = mesh.devices.flat[0]
  memory = memory_fields(compiled, state, device)
  matmul = float32_matmul(device)
  peak, peak_source, peak_kind = peak_flops(device, dtype, matmul, mesh)
  median = statistics.median(times)
  record = {
      "model": model, "batch": batch, "devices": int(mesh.devices.size),
      "overrides": list(overrides),
      "device_kind": device.device_kind, "platform": device.platform,
      "jax_version": jax.__version__, "host_cpus": os.cpu_count(),
      "load_avg_1m": os.getloadavg()[0],
      "dtype": dtype, "float32_matmul": matmul, "input": input_pipeline,
      "compile_s": compile_s, "step_ms_median": 1e3 * median,
      "step_ms_min": 1e3 * min(times), "step_ms_max": 1e3 * max(times),
      "images_per_s": batch / median, "flops_per_step": flops,
      "flops_per_s": flops / median,
      "peak_flops_per_s": peak,
      "peak_source": peak_source, "peak_kind": peak_kind,
      "fraction_of_peak": flops / median / peak,
      **memory,
  }
  if loader_images_per_s is not None:
    record["loader_images_per_s"] = loader_images_per_s
  if trace_dir:
    record["profile_dir"] = trace_dir
    record["top_ops"] = top_ops(trace_dir, compiled.as_text(), steps,
                                int(mesh.devices.size))
  return record


def add_scaling(records: list[dict]) -> None:
  """Adds scaling_efficiency: (images/s on N) / (N x images/s on the fewest)."""
  for r in records:
    base = min((b for b in records if b["model"] == r["model"] and
                b["batch"] == r["batch"] and b["dtype"] == r["dtype"]),
               key=lambda b: b["devices"])
    r["scaling_efficiency"] = (r["images_per_s"] / base["images_per_s"] *
                               base["devices"] / r["devices"])


def format_table(records: list[dict]) -> str:
  header = (f"{'model':8} {'batch':>5} {'dev':>3} {'dtype':8} {'compile s':>9} "
            f"{'median ms':>9} {'min ms':>8} {'max ms':>8} {'images/s':>9} "
            f"{'GFLOP/step':>10} {'%peak':>6} {'scaling':>7}")
  lines = [header, "-" * len(header)]
  for r in records:
    lines.append(
        f"{r['model']:8} {r['batch']:5d} {r['devices']:3d} {r['dtype']:8} "
        f"{r['compile_s']:9.2f} {r['step_ms_median']:9.2f} "
        f"{r['step_ms_min']:8.2f} {r['step_ms_max']:8.2f} "
        f"{r['images_per_s']:9.0f} {r['flops_per_step'] / 1e9:10.3f} "
        f"{100 * r['fraction_of_peak']:6.1f} "
        f"{r.get('scaling_efficiency', 1.0):7.2f}")
  loaders = [r for r in records if r.get("loader_images_per_s")]
  if loaders:
    lines.append("input pipeline alone (read, decode, transform, to device):")
    lines += [f"  {r['model']} batch {r['batch']}: "
              f"{r['loader_images_per_s']:.0f} images/s" for r in loaders]
  return "\n".join(lines)


def format_top_ops(record: dict) -> str:
  lines = [f"{record['model']} batch {record['batch']} on "
           f"{record['devices']} device(s): ms per step per device, op, layer"
           f" (trace in {record['profile_dir']})"]
  for op in record["top_ops"]:
    lines.append(f"  {op['ms_per_step']:8.2f}  {op['op']:28} {op['layer']}")
  return "\n".join(lines)


def run(models: list[str], batches: list[int], devices: list[int],
        steps: int, dtype: str, input_pipeline: str,
        output: str | None, profile_dir: str | None = None,
        overrides=()) -> list[dict]:
  """Benchmarks every combination, prints the table, appends JSON lines.
  overrides: config "KEY=VALUE" strings for every model."""
  if models == ["all"]:
    models = sorted(MODELS)
  records = [bench_one(m, b, steps, dtype=dtype, devices=d,
                       input_pipeline=input_pipeline, profile_dir=profile_dir,
                       overrides=overrides)
             for m in models for b in batches for d in devices]
  add_scaling(records)
  if overrides:
    print("config overrides:", " ".join(overrides))
  print(format_table(records))
  for r in records:
    if "top_ops" in r:
      print(format_top_ops(r))
  if output:
    with open(output, "a") as f:
      for r in records:
        f.write(json.dumps(r) + "\n")
  return records


def is_out_of_memory(error: BaseException) -> bool:
  """Whether `error` is XLA running out of device (or host) memory."""
  if isinstance(error, MemoryError):
    return True
  text = str(error).lower()
  return isinstance(error, jax.errors.JaxRuntimeError) and (
      "resource_exhausted" in text or "out of memory" in text)


def format_sweep_table(records: list[dict]) -> str:
  """The sweep's table: one row per run, skipped combinations at the end.

  limit (on a combination's last run): oom@B (batch B did not fit, so this
  is the largest that fits), error@B (batch B failed otherwise), max_batch
  (the largest batch asked for) or time (the budget stopped the growth).
  """
  runs = [r for r in records if "skipped" not in r]
  lines = []
  if runs:
    kinds = sorted({r["device_kind"] for r in runs})
    matmuls = sorted({r["float32_matmul"] for r in runs if
                      r["dtype"] == "float32"})
    lines.append(f"device: {', '.join(kinds)}, 1 device; float32 matmuls ran "
                 f"as: {', '.join(matmuls) or 'n/a'}")
  w = max([8] + [len(r["model"]) for r in records])  # model column
  header = (f"{'model':{w}} {'dtype':8} {'batch':>6} {'step ms':>9} "
            f"{'images/s':>10} {'GFLOP/step':>10} {'TFLOP/s':>8} "
            f"{'peak':>7} {'kind':4} {'%peak':>6} {'limit':>9}")
  lines += [header, "-" * len(header)]
  for r in runs:
    limit = r.get("stop", "")
    if limit in ("oom", "error"):
      limit = f"{limit}@{r[limit + '_batch']}"
    lines.append(
        f"{r['model']:{w}} {r['dtype']:8} {r['batch']:6d} "
        f"{r['step_ms_median']:9.2f} {r['images_per_s']:10.0f} "
        f"{r['flops_per_step'] / 1e9:10.3f} {r['flops_per_s'] / 1e12:8.2f} "
        f"{r['peak_flops_per_s'] / 1e12:7.1f} {r['peak_kind']:4} "
        f"{100 * r['fraction_of_peak']:6.2f} {limit:>9}")
  for r in records:
    if "skipped" in r:
      lines.append(f"{r['model']:{w}} {r['dtype']:8} skipped: {r['skipped']}")
  return "\n".join(lines)


def next_sweep_batch(record: dict, max_batch: int,
                     oom_batch: int | None = None,
                     headroom: float = 0.8) -> int | None:
  """The batch a sweep times after `record`'s: twice it, or, where the
  record has the device's memory ("memory_limit_bytes", GPUs and TPUs), the
  largest power-of-two multiple predicted to fit in `headroom` of it; never
  above `max_batch` nor at or above `oom_batch` (known not to fit). None when
  no batch is left.

  The prediction is linear from the one run: the state ("state_bytes") plus
  the rest of the step's memory ("memory_bytes", XLA's memory analysis)
  scaled with the batch. Overestimating the per-image part (it includes
  fixed buffers) errs towards batches that fit.
  """
  batch = record["batch"]
  largest = min(max_batch, oom_batch - 1 if oom_batch else max_batch)
  if 2 * batch > largest:
    return None
  next_batch = 2 * batch
  used, total = record.get("memory_bytes"), record.get("memory_limit_bytes")
  if used and total:
    fixed = record.get("state_bytes", 0)
    per_image = max(used - fixed, 0) / batch
    while (2 * next_batch <= largest and
           fixed + per_image * 2 * next_batch <= headroom * total):
      next_batch *= 2
  return next_batch


def sweep(models: list[str], dtypes: list[str], start_batch: int = 128,
          max_batch: int = 8192, time_budget_s: float = 420.0,
          steps: int = 10, warmup: int = 2, output: str | None = None,
          clock=time.monotonic) -> list[dict]:
  """Times each model and dtype on 1 device, growing the batch from
  `start_batch` until it runs out of memory, passes `max_batch` or would
  overrun the time budget; prints and returns the records.

  The batch doubles, or, on devices that report their memory, jumps to the
  largest power-of-two multiple predicted to fit (`next_sweep_batch`); a
  jump that runs out of memory is followed by a batch halfway back (in
  powers of two), until twice a batch that fits is known not to fit.

  Each (model, dtype) gets an equal share of the budget left when it starts
  (time a fast one leaves goes to the later ones); after a run, the next is
  expected to take as long again plus its steps' time scaled by the batch,
  and is not started if that overruns the share (nor is the batch halfway
  back after a jump that ran out of memory, if that run overran it). A
  combination's first run starts whenever some budget is left. Its last run
  gets "stop" ("oom", "max_batch", "time" or "error") and "largest_fitting"
  (True only after an out-of-memory error at twice its batch, then
  "oom_batch"). Any other error ends that combination, not the sweep: its
  traceback goes to stderr and the last run gets "error" and "error_batch"
  (or, with no run, the skipped record says it failed and has "error").
  Combinations not run are {"model", "dtype", "batch", "skipped"} records.
  Each record is appended to `output` (JSON lines) as soon as it exists, so
  a run killed from outside keeps what it measured.
  """
  if start_batch > max_batch:
    raise ValueError(f"start batch {start_batch} > max batch {max_batch}")
  for dtype in dtypes:
    if dtype not in ("float32", "bfloat16"):
      raise ValueError(f"Unknown dtype {dtype!r}: float32 or bfloat16")
  if models == ["all"]:
    models = sorted(MODELS)
  combos = [(m, d) for m in models for d in dtypes]
  records = []
  if output:
    with open(output, "a") as f:
      offset = f.tell()

  def emit(record=None):
    """Adds `record`, then rewrites this sweep's lines of `output`."""
    if record:
      records.append(record)
    if output:
      with open(output, "r+") as f:
        f.seek(offset)
        f.truncate()
        f.writelines(json.dumps(r) + "\n" for r in records)

  start = clock()

  def overruns(expected, combo_start, share):
    """Whether a run expected to take `expected` s, starting now, would end
    past its combination's share of the budget or past the budget."""
    return (clock() - combo_start + expected > share or
            clock() - start + expected > time_budget_s)

  for index, (model, dtype) in enumerate(combos):
    left = time_budget_s - (clock() - start)
    if left <= 0:
      emit({"model": model, "dtype": dtype, "batch": start_batch,
            "skipped": f"time budget of {time_budget_s:g} s spent"})
      print(f"{model} {dtype}: skipped, time budget spent", flush=True)
      continue
    share = left / (len(combos) - index)
    combo_start = clock()
    batch, last, stop, oom_batch, error = (start_batch, None, "max_batch",
                                           None, "")
    while True:
      run_start = clock()
      try:
        record = bench_one(model, batch, steps, warmup=warmup, dtype=dtype,
                           devices=1)
      except Exception as e:  # pylint: disable=broad-except
        if not is_out_of_memory(e):  # Recorded; the other combinations run.
          stop, error_batch = "error", batch
          error = f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"
          print(f"{model} {dtype} batch {batch}: failed", flush=True)
          traceback.print_exc()
          break
        oom_batch = batch
        print(f"{model} {dtype} batch {batch}: out of memory", flush=True)
        if last is None or batch == 2 * last["batch"]:
          stop = "oom"
          break
        # Expected to take as long as the run that failed.
        if overruns(clock() - run_start, combo_start, share):
          stop = "time"
          break
        # A jump went past what fits: try halfway back (in powers of two).
        batch = last["batch"] * 2 ** (
            int(math.log2(batch // last["batch"])) // 2)
        continue
      finally:
        gc.collect()  # Frees the state (and, after an error, its traceback).
        jax.clear_caches()
      last = record
      emit(record)
      print(f"{model} {dtype} batch {batch}: {record['step_ms_median']:.2f} "
            f"ms, {record['images_per_s']:.0f} images/s, "
            f"{100 * record['fraction_of_peak']:.2f}% of peak", flush=True)
      elapsed = clock() - run_start
      if oom_batch == 2 * batch:
        stop = "oom"
        break
      next_batch = next_sweep_batch(record, max_batch, oom_batch)
      if next_batch is None:
        break  # stop stays "max_batch"
      expected = elapsed + ((warmup + steps) * record["step_ms_median"] / 1e3
                            * next_batch / batch)
      if overruns(expected, combo_start, share):
        stop = "time"
        break
      batch = next_batch
    if last is None:
      why = (f"failed at batch {start_batch}: {error}" if stop == "error"
             else f"out of memory at batch {start_batch}")
      emit({"model": model, "dtype": dtype, "batch": start_batch,
            "skipped": why, **({"error": error} if stop == "error" else {})})
      continue
    last["stop"] = stop
    last["largest_fitting"] = stop == "oom"
    if stop == "oom":
      last["oom_batch"] = oom_batch
    if stop == "error":
      last["error"], last["error_batch"] = error, error_batch
    emit()
  print(format_sweep_table(records), flush=True)
  return records


def read_records(path: str) -> list[dict]:
  """The records of a JSON lines file (for the table of a killed sweep)."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
