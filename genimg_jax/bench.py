"""`genimg bench`: throughput of the compiled train steps.

Each model's real train step (the function training uses, jitted with the same
shardings by `train.compile_train_step`) is compiled, warmed up, and timed step by
step, blocking on the new state. Synthetic uint8 data by default, so the step
is measured alone; `input="real"` includes the input pipeline. With a
profile directory the timed steps also run under `jax.profiler.trace`, and
the record lists the XLA ops that took the most time, with the model layer
each came from.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from genimg_jax import config as config_lib, data, parallel, train

# Model name -> the experiment config whose train step is timed.
MODELS = {"cnn": "cnn.py", "resnet": "resnet.py",
          "dcgan": "dcgan.py", "vae": "vae_conv.py",
          "vae_mlp": "vae_mlp.py", "ddpm": "ddpm.py", "flow": "flow.py"}

# Published dense peak FLOP/s per device: (substring of device_kind, float32,
# bfloat16). float32 on GPUs is the non-tensor-core rate.
PEAK_FLOPS = (
    ("H100", 67e12, 989e12), ("H200", 67e12, 989e12),
    ("A100", 19.5e12, 312e12), ("V100", 15.7e12, 125e12),
    ("L4", 30.3e12, 121e12), ("TPU v4", 275e12, 275e12),
    ("TPU v5 lite", 197e12, 197e12), ("TPU v5e", 197e12, 197e12),
    ("TPU v5p", 459e12, 459e12), ("TPU v5", 459e12, 459e12),
    ("TPU v6", 918e12, 918e12),
)


def measured_cpu_peak(dtype=jnp.float32, n: int = 1024, repeats: int = 5):
  """FLOP/s of an n x n matmul on the first device, best of `repeats`."""
  a = jnp.ones((n, n), dtype)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


def peak_flops(device, dtype: str) -> tuple[float, str]:
  """(peak FLOP/s of one device, where the number comes from)."""
  for name, f32, bf16 in PEAK_FLOPS:
    if name.lower() in device.device_kind.lower():
      return (bf16 if dtype == "bfloat16" else f32), "published"
  return measured_cpu_peak(jnp.dtype(dtype)), "measured matmul"


def load_model_config(model: str, batch: int, dtype: str, devices: int):
  if model not in MODELS:
    raise config_lib.ConfigError(
        f"Unknown model {model!r} for bench; choose from {sorted(MODELS)} "
        "or all.")
  config = config_lib.load_config_file(MODELS[model])  # The installed one.
  return config_lib.apply_overrides(config, [
      f"batch_size={batch}", f"model.dtype={dtype}",
      f"mesh.num_devices={devices}", "num_steps=1000"])


def synthetic_batch(config, mesh) -> dict:
  """Random uint8 images and in-range labels as one global sharded batch."""
  rng = np.random.default_rng(0)
  n = config.batch_size // jax.process_count()
  local = {"image": rng.integers(0, 256, (n, *config.data.image_shape),
                                 dtype=np.uint8),
           "label": rng.integers(0, config.data.num_classes, (n,),
                                 dtype=np.int32)}
  return data.to_global_array(local, mesh)


def flops_of(compiled) -> float:
  """FLOPs of one call of a compiled function, from XLA's cost analysis."""
  analysis = compiled.cost_analysis()
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


def bench_one(model: str, batch: int, steps: int = 20, warmup: int = 3,
              dtype: str = "float32", devices: int = 0,
              input_pipeline: str = "synthetic",
              profile_dir: str | None = None) -> dict:
  """Compiles and times `steps` train steps of `model`; returns one record.

  profile_dir: also trace the timed steps with `jax.profiler` into
  profile_dir/MODEL_bBATCH_dDEVICES_DTYPE and add the record's "top_ops".
  """
  config = load_model_config(model, batch, dtype, devices)
  mesh = parallel.make_mesh(devices)
  parallel.check_global_batch(batch, mesh)
  state = train.init_state(config, mesh, jax.random.key(0), config.num_steps)
  train_step = train.compile_train_step(config, mesh)
  rng = parallel.replicate(jax.random.key(1), mesh)
  batch_data = synthetic_batch(config, mesh)

  start = time.perf_counter()
  compiled = train_step.lower(state, batch_data, rng).compile()
  compile_s = time.perf_counter() - start
  # XLA reports the cost of one device's program: the step's total is that
  # times the devices of the mesh.
  flops = flops_of(compiled) * mesh.devices.size

  if input_pipeline == "real":
    source = data.load_split(config.data, "train")
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
  peak, peak_source = peak_flops(device, dtype)
  median = statistics.median(times)
  record = {
      "model": model, "batch": batch, "devices": int(mesh.devices.size),
      "device_kind": device.device_kind, "platform": device.platform,
      "dtype": dtype, "input": input_pipeline,
      "compile_s": compile_s, "step_ms_median": 1e3 * median,
      "step_ms_min": 1e3 * min(times), "step_ms_max": 1e3 * max(times),
      "images_per_s": batch / median, "flops_per_step": flops,
      "flops_per_s": flops / median,
      "peak_flops_per_s": peak * mesh.devices.size,
      "peak_source": peak_source,
      "fraction_of_peak": flops / median / (peak * mesh.devices.size),
  }
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
        output: str | None, profile_dir: str | None = None) -> list[dict]:
  """Benchmarks every combination, prints the table, appends JSON lines."""
  if models == ["all"]:
    models = sorted(MODELS)
  records = [bench_one(m, b, steps, dtype=dtype, devices=d,
                       input_pipeline=input_pipeline, profile_dir=profile_dir)
             for m in models for b in batches for d in devices]
  add_scaling(records)
  print(format_table(records))
  for r in records:
    if "top_ops" in r:
      print(format_top_ops(r))
  if output:
    with open(output, "a") as f:
      for r in records:
        f.write(json.dumps(r) + "\n")
  return records
