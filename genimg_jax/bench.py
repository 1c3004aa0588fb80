"""`genimg bench`: throughput of the compiled train steps.

Each model's real train step (the function training uses, jitted with the same
shardings by `train.compile_train_step`) is compiled, warmed up, and timed step by
step, blocking on the new state. Synthetic uint8 data by default, so the step
is measured alone; `input="real"` includes the input pipeline. With a
profile directory the timed steps also run under `jax.profiler.trace`, and
the record lists the XLA ops that took the most time, with the model layer
each came from. `sweep` doubles each model's batch on 1 device until it no
longer fits. Each record's fraction of peak (MFU) uses the peak of how its
matmuls ran: bfloat16, TF32 (float32 on Ampere and newer GPUs by default) or
float32.

Latent diffusion configs (latent_dit, and the aliases dit_xl2_latent and
dit_b2_latent: the DiT paper's ImageNet 256 x 256 set-up on 32 x 32 x 4
latents) are timed on synthetic latent moments of the right shape
(`synthetic_latents`): the train step on latents needs no autoencoder.
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
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from genimg_jax import aot, config as config_lib, data, latents, parallel, train

# Model name -> the experiment config whose train step is timed.
MODELS = {"cnn": "cnn", "resnet": "resnet", "dcgan": "dcgan",
          "vae": "vae_conv", "vae_mlp": "vae_mlp", "ddpm": "ddpm",
          "flow": "flow", "dit": "dit", "latent_dit": "latent_dit"}
# The DiT paper's ImageNet 256 x 256 set-up (256 x 256 x 3 images, the SD
# VAE's 32 x 32 x 4 latents, 1,000 classes, random flips): name -> (config,
# overrides). Not in "all" (full size); no :ARG.
_IMAGENET256 = ("data.image_shape=(256, 256, 3)", "data.num_classes=1000",
                "data.random_flip=true")
ALIASES = {
    "dit_xl2_latent": ("latent_dit:fashion_mnist,full", _IMAGENET256),
    "dit_b2_latent": ("latent_dit:fashion_mnist,full", _IMAGENET256 + (
        "model.hidden_size=768", "model.depth=12", "model.num_heads=12")),
}


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
        config_lib.split_config_arg(part)[0] not in (*MODELS, *ALIASES,
                                                     "all")):
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


def model_config(model: str):
  """The experiment config of `model` (a name of `MODELS`, which may end in
  :ARG, the config's argument, e.g. dcgan:celeb_a64; or of `ALIASES`), as
  the file (the installed one) makes it."""
  name, arg = config_lib.split_config_arg(model)
  if name in ALIASES and not arg:
    path, overrides = ALIASES[name]
    return config_lib.apply_overrides(config_lib.load_config_file(path),
                                      overrides)
  if name not in MODELS:
    raise config_lib.ConfigError(
        f"Unknown model {name!r} for bench; choose from {sorted(MODELS)} "
        f"(each may end in :ARG, the config's argument), {sorted(ALIASES)} "
        "or all.")
  return config_lib.load_config_file(MODELS[name] + (f":{arg}" if arg else ""))


def load_model_config(model: str, batch: int, dtype: str, devices: int,
                      overrides=()):
  """`model_config(model)` with the bench's batch (0: the config's own
  batch_size), dtype and devices, then `overrides` ("KEY=VALUE", e.g.
  "xla_cpu_ynn_fusions=false") applied; a latent diffusion config gets
  `synthetic_latents`."""
  config = model_config(model)
  config = config_lib.apply_overrides(config, [
      *([f"batch_size={batch}"] if batch else []), f"model.dtype={dtype}",
      f"mesh.num_devices={devices}", "num_steps=1000", *overrides])
  if latents.is_latent(config):
    config = synthetic_latents(config)
  return config


# SD's VAE (experiments/latent_dit.py's full variant) halves 3 times;
# experiments/autoencoder_kl.py's networks twice. Both give 4 channels.
SD_VAE_FILE = "sd_vae.msgpack"
SD_VAE_SCALING_FACTOR = 0.18215


def synthetic_latent_shape(config) -> tuple[int, int, int]:
  """(h, w, 4): the latents of config.data.image_shape's images, 8x smaller
  for SD's VAE (config.diffusion.autoencoder named sd_vae.msgpack: 256 x 256
  x 3 -> 32 x 32 x 4), else 4x (experiments/autoencoder_kl.py)."""
  height, width, _ = config.data.image_shape
  factor = 8 if os.path.basename(
      config.diffusion.autoencoder) == SD_VAE_FILE else 4
  if height % factor or width % factor:
    raise config_lib.ConfigError(
        f"data.image_shape {tuple(config.data.image_shape)}: the latents of "
        f"{config.diffusion.autoencoder!r} are {factor}x smaller, so height "
        f"and width must be multiples of {factor}; set e.g. "
        "--config.data.image_shape='(256, 256, 3)' (or use dit_xl2_latent).")
  return height // factor, width // factor, 4


def synthetic_latents(config, directory: str | None = None):
  """`config` with diffusion.latents and .autoencoder pointed at `directory`
  (default: one per shape under the temporary directory), which gets a
  latents.json of `synthetic_latent_shape` latents and the autoencoder's
  .json, and no arrays or weights: enough for the train step on latents
  (which draws z from moments and never decodes), not for sampling."""
  shape = synthetic_latent_shape(config)
  image_shape = tuple(config.data.image_shape)
  if directory is None:
    directory = os.path.join(
        tempfile.gettempdir(), "genimg_bench_latents",
        "_from_".join("x".join(map(str, s)) for s in (shape, image_shape)))
  autoencoder_path = os.path.join(directory, "synthetic_autoencoder.msgpack")
  meta = {"autoencoder": os.path.basename(autoencoder_path),
          "autoencoder_sha256": "synthetic",
          "scaling_factor": SD_VAE_SCALING_FACTOR, "shift_factor": 0.0,
          "latent_shape": list(shape), "image_shape": list(image_shape),
          "data": "synthetic", "splits": {},
          "flips": bool(config.data.get("random_flip", False))}
  os.makedirs(directory, exist_ok=True)
  for path, content in ((os.path.join(directory, latents.LATENTS_JSON), meta),
                        (autoencoder_path + ".json", {"sha256": "synthetic"})):
    temporary = f"{path}.{os.getpid()}"
    with open(temporary, "w") as f:
      json.dump(content, f)
    os.replace(temporary, path)  # Whole, for other processes reading it.
  return config_lib.apply_overrides(config, [
      f"diffusion.latents={directory}",
      f"diffusion.autoencoder={autoencoder_path}"])


def synthetic_batch(config, mesh) -> dict:
  """One global sharded batch of this process's share of
  config.batch_size: random uint8 images (or, for latent diffusion, float32
  standard-normal moments; `aot.batch_shapes`) and in-range labels."""
  rng = np.random.default_rng(0)
  n = config.batch_size // jax.process_count()
  (image_shape, image_dtype), _ = aot.batch_shapes(config, n).values()
  if image_dtype == np.uint8:
    image = rng.integers(0, 256, image_shape, dtype=np.uint8)
  else:
    image = rng.standard_normal(image_shape, dtype=np.float32)
  local = {"image": image,
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

  batch: the global batch (0: the config's batch_size). overrides: config
  "KEY=VALUE" strings (`load_model_config`), e.g. "model.remat=blocks".

  The record's flops_per_step is the step as lowered, with any remat's
  recomputation; model_flops_per_step is without it (the step lowered again
  with model.remat=none), and fraction_of_peak (MFU) uses that.

  profile_dir: also trace the timed steps with `jax.profiler` into
  profile_dir/MODEL_bBATCH_dDEVICES_DTYPE and add the record's "top_ops".
  """
  config = load_model_config(model, batch, dtype, devices, overrides)
  batch = config.batch_size
  mesh = train.make_mesh(config)
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
  remat = config.model.get("remat", "") if "model" in config else ""
  model_flops = flops
  if remat not in ("", "none"):
    model_flops = flops_of(aot.lower_train_step(
        config_lib.apply_overrides(config, ["model.remat=none"]),
        list(mesh.devices.flat)))

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
      "dtype": dtype, "remat": remat, "float32_matmul": matmul,
      "input": input_pipeline,
      "compile_s": compile_s, "step_ms_median": 1e3 * median,
      "step_ms_min": 1e3 * min(times), "step_ms_max": 1e3 * max(times),
      "images_per_s": batch / median, "flops_per_step": flops,
      "model_flops_per_step": model_flops, "flops_per_s": flops / median,
      "peak_flops_per_s": peak,
      "peak_source": peak_source, "peak_kind": peak_kind,
      "fraction_of_peak": model_flops / median / peak,
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
  """Adds scaling_efficiency: (images/s on N) / (N x images/s on the fewest)
  of the same model, batch, dtype and remat."""
  runs = [r for r in records if "skipped" not in r]
  key = lambda r: (r["model"], r["batch"], r["dtype"], r.get("remat", ""))
  for r in runs:
    base = min((b for b in runs if key(b) == key(r)),
               key=lambda b: b["devices"])
    r["scaling_efficiency"] = (r["images_per_s"] / base["images_per_s"] *
                               base["devices"] / r["devices"])


def format_table(records: list[dict]) -> str:
  """One row per run: images/s, GFLOP/step, MFU (% of peak: the model's
  FLOPs, without remat's recomputation), peak kind; failed or skipped rows
  at the end."""
  runs = [r for r in records if "skipped" not in r]
  w = max([8] + [len(r["model"]) for r in records])  # model column
  header = (f"{'model':{w}} {'batch':>5} {'dev':>3} {'dtype':8} {'remat':6} "
            f"{'compile s':>9} {'median ms':>9} {'min ms':>8} {'max ms':>8} "
            f"{'images/s':>9} {'GFLOP/step':>10} {'MFU %':>6} {'peak':>4} "
            f"{'scaling':>7}")
  lines = [header, "-" * len(header)]
  for r in runs:
    lines.append(
        f"{r['model']:{w}} {r['batch']:5d} {r['devices']:3d} {r['dtype']:8} "
        f"{r.get('remat') or '-':6} "
        f"{r['compile_s']:9.2f} {r['step_ms_median']:9.2f} "
        f"{r['step_ms_min']:8.2f} {r['step_ms_max']:8.2f} "
        f"{r['images_per_s']:9.0f} {r['flops_per_step'] / 1e9:10.3f} "
        f"{100 * r['fraction_of_peak']:6.2f} {r['peak_kind']:>4} "
        f"{r.get('scaling_efficiency', 1.0):7.2f}")
  for r in records:
    if "skipped" in r:
      lines.append(f"{r['model']:{w}} {r['batch']:5d} {r['dtype']:8} "
                   f"{r.get('remat') or '-':6} skipped: {r['skipped']}")
  loaders = [r for r in runs if r.get("loader_images_per_s")]
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


def parse_dtypes(text: str) -> list[str]:
  """"float32,bfloat16" -> ["float32", "bfloat16"]; ValueError otherwise."""
  dtypes = [d.strip() for d in text.split(",") if d.strip()]
  for dtype in dtypes:
    if dtype not in ("float32", "bfloat16"):
      raise ValueError(f"Unknown dtype {dtype!r}: float32 or bfloat16 "
                       "(comma-separated)")
  if not dtypes:
    raise ValueError("No dtype: give float32, bfloat16 or both")
  return dtypes


def has_remat(model: str) -> bool:
  """Whether `model`'s config has model.remat (the diffusion networks)."""
  return "remat" in model_config(model).get("model", {})


def records_writer(output: str | None):
  """A function that (re)writes its records as the JSON lines of `output`
  after the lines that were there before (none without `output`)."""
  if not output:
    return lambda records: None
  with open(output, "a") as f:
    offset = f.tell()

  def write(records):
    with open(output, "r+") as f:
      f.seek(offset)
      f.truncate()
      f.writelines(json.dumps(r) + "\n" for r in records)
  return write


def compile_memory(model: str, batch: int, dtype: str, topology: str,
                   overrides=()) -> dict:
  """A record of XLA's compile-time memory and FLOPs per chip of `model`'s
  train step compiled for the TPU `topology` (e.g. "v5e:2x2"; needs libtpu,
  no TPU: `aot.run`), with model, dtype, remat, fsdp and jax_version."""
  config = load_model_config(model, batch, dtype, 0, overrides)
  start = time.perf_counter()
  costs = aot.run(config, topology)
  return {"model": model, "batch": config.batch_size, "dtype": dtype,
          "remat": config.model.get("remat", "") if "model" in config else "",
          "fsdp": config.mesh.get("fsdp", 1), "overrides": list(overrides),
          "jax_version": jax.__version__,
          "compile_s": time.perf_counter() - start, **costs}


def format_compile_table(records: list[dict]) -> str:
  """`compile_memory` records: GiB per chip (arguments, temporaries,
  peak) and GFLOP per chip and step."""
  w = max([8] + [len(r["model"]) for r in records])
  header = (f"{'model':{w}} {'batch':>5} {'dtype':8} {'remat':6} {'fsdp':>4} "
            f"{'args GiB':>8} {'temp GiB':>8} {'peak GiB':>8} "
            f"{'GFLOP/chip':>10}")
  lines = [header, "-" * len(header)]
  for r in records:
    if "skipped" in r:
      lines.append(f"{r['model']:{w}} {r['batch']:5d} {r['dtype']:8} "
                   f"{r.get('remat') or '-':6} skipped: {r['skipped']}")
      continue
    lines.append(
        f"{r['model']:{w}} {r['batch']:5d} {r['dtype']:8} "
        f"{r['remat'] or '-':6} {r['fsdp']:4d} {r['argument'] / 2**30:8.3f} "
        f"{r['temp'] / 2**30:8.3f} {r['peak_bytes'] / 2**30:8.3f} "
        f"{r['flops'] / 1e9:10.1f}")
  return "\n".join(lines)


def run(models: list[str], batches: list[int], devices: list[int],
        steps: int, dtypes, input_pipeline: str,
        output: str | None, profile_dir: str | None = None,
        overrides=(), remats=("",), time_budget_s: float | None = None,
        warmup: int = 3, clock=time.monotonic,
        topology: str | None = None) -> list[dict]:
  """Benchmarks every combination, prints the table, appends JSON lines.
  With `topology` each row is `compile_memory` for that TPU topology instead
  (devices unused).

  dtypes: "float32", "bfloat16" or a list of them. remats: model.remat
  values ("none", "blocks", "full"; "": the config's) for the models that
  have it; the others run once, with the first. batches: global batches,
  0: each config's own. overrides: config "KEY=VALUE" strings for every
  model. Every config is loaded first, so a bad name or override raises
  before anything compiles. Rows run remat by remat, dtype by dtype, then
  model, batch and devices. A row that fails (out of memory, or otherwise:
  traceback on stderr) becomes a record with "skipped" and "error", and the
  rest go on; once `time_budget_s` has passed, the remaining rows are
  "skipped" records. Each record goes to `output` as soon as it exists.
  """
  if isinstance(dtypes, str):
    dtypes = [dtypes]
  if models == ["all"]:
    models = sorted(MODELS)
  if topology:
    aot.topology_devices(topology)  # A TopologyError before anything runs.
  remat_of = {m: has_remat(m) for m in models}
  own_batch = {}  # The config's batch_size, for batch 0.
  for model in models:
    for remat in remats:
      extra = [f"model.remat={remat}"] if remat and remat_of[model] else []
      for batch in sorted(set(batches)):  # A bad batch raises here.
        config = load_model_config(model, batch, dtypes[0], devices[0],
                                   [*overrides, *extra])
        if not batch:
          own_batch[model] = config.batch_size
  write, start, records = records_writer(output), clock(), []
  for remat in remats:
    for dtype in dtypes:
      for model, batch, d in ((m, b, d) for m in models for b in batches
                              for d in devices):
        if not remat_of[model] and remat != remats[0]:
          continue  # No model.remat: it ran once, with the first.
        extra = (f"model.remat={remat}",) if remat and remat_of[model] else ()
        row = {"model": model, "batch": batch or own_batch[model],
               "devices": d, "dtype": dtype,
               "remat": remat if remat_of[model] else ""}
        if time_budget_s is not None and clock() - start > time_budget_s:
          record = {**row,
                    "skipped": f"time budget of {time_budget_s:g} s spent"}
        elif topology:
          record = _bench_or_error(row, model, batch, dtype, topology,
                                   (*overrides, *extra), run=compile_memory)
        else:
          record = _bench_or_error(
              row, model, batch, steps, warmup=warmup, dtype=dtype,
              devices=d, input_pipeline=input_pipeline,
              profile_dir=profile_dir, overrides=(*overrides, *extra))
        records.append(record)
        write(records)
  if overrides:
    print("config overrides:", " ".join(overrides))
  if topology:
    print(format_compile_table(records), flush=True)
    return records
  add_scaling(records)
  write(records)
  print(format_table(records), flush=True)
  for r in records:
    if "top_ops" in r:
      print(format_top_ops(r))
  return records


def _bench_or_error(row: dict, *args, run=None, **kwargs) -> dict:
  """`run(*args, **kwargs)` (default `bench_one`), or `row` with "skipped"
  and "error" when it raises (the traceback to stderr)."""
  try:
    return (run or bench_one)(*args, **kwargs)
  except Exception as e:  # pylint: disable=broad-except
    error = f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"
    kind = "out of memory" if is_out_of_memory(e) else "failed"
    print(f"{row['model']} {row['dtype']} batch {row['batch']}: {kind}",
          flush=True)
    traceback.print_exc()
    return {**row, "skipped": f"{kind}: {error}", "error": error}
  finally:
    gc.collect()  # Frees the state (and, after an error, its traceback).


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
          clock=time.monotonic, overrides=()) -> list[dict]:
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
  a run killed from outside keeps what it measured. overrides: config
  "KEY=VALUE" strings for every run.
  """
  if start_batch > max_batch:
    raise ValueError(f"start batch {start_batch} > max batch {max_batch}")
  parse_dtypes(",".join(dtypes))  # Checks them.
  if models == ["all"]:
    models = sorted(MODELS)
  combos = [(m, d) for m in models for d in dtypes]
  records, write = [], records_writer(output)

  def emit(record=None):
    """Adds `record`, then rewrites this sweep's lines of `output`."""
    if record:
      records.append(record)
    write(records)

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
                           devices=1, overrides=overrides)
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
