"""The trainer: one loop for every model family.

`train_and_evaluate(config, workdir)` builds the mesh once, shards the data,
compiles the family's pure `train_step(state, batch, rng)` with `jax.jit`
(state replicated and donated, batch sharded on "data"), resumes from the
latest orbax checkpoint in `workdir`, and logs per-step metrics fetched one
step late so the host never stalls the device.

A family module provides `create_train_state(config, rng, num_steps)`,
`bind_train_step(config, mesh)` and `make_evaluator(config, mesh, eval_source,
workdir) -> evaluator(state, step) -> {name: float}`.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time

import jax
import ml_collections
import numpy as np
from etils import epath
from tqdm import tqdm

from genimg_jax import autoencoder_family, checkpoint, classifier
from genimg_jax import config as config_lib, data
from genimg_jax import diffusion, gan, images as images_lib, metrics_writer
from genimg_jax import distributed, optim, parallel
from genimg_jax import preemption as preemption_lib, quality, vae

FAMILIES = {"classifier": classifier, "gan": gan, "vae": vae,
            "diffusion": diffusion, "autoencoder": autoencoder_family}


def family_module(config):
  if config.family not in FAMILIES:
    raise config_lib.ConfigError(
        f"Unknown family {config.family!r}; choose from {sorted(FAMILIES)}.")
  return FAMILIES[config.family]


def load_split(config, split: str, workdir: str | None = None):
  """The source the family trains or evaluates on: `family.load_split` where
  it has one (latent diffusion), else `data.load_split`."""
  family = family_module(config)
  if hasattr(family, "load_split"):
    return family.load_split(config, split, workdir)
  return data.load_split(config.data, split, workdir)


def total_steps(config, num_train_examples: int) -> int:
  """config.num_steps if set, else num_epochs whole passes over the data."""
  if config.num_steps:
    return config.num_steps
  return config.num_epochs * data.steps_per_epoch(num_train_examples,
                                                  config.batch_size)


def init_state(config, mesh, rng, num_steps):
  """The family's initial state, created directly on `mesh`: replicated,
  or split over "fsdp" (`parallel.state_sharding`)."""
  family = family_module(config)
  create = lambda r: family.create_train_state(config, r, num_steps)
  if parallel.FSDP_AXIS not in mesh.axis_names:
    return jax.jit(create, out_shardings=parallel.replicated(mesh))(rng)
  return jax.jit(lambda r: constrain_state(create(r), mesh))(rng)


def constrain_state(state, mesh):
  """`state` (traced) constrained to `parallel.state_sharding` on `mesh`:
  its shardings are computed from the state itself, whose static fields
  (apply_fn, tx) differ between two builds of the same state."""
  return jax.lax.with_sharding_constraint(
      state, parallel.state_sharding(mesh, state))


def _with_state_constrained(step, mesh):
  def constrained_step(state, batch, rng):
    new_state, metrics = step(state, batch, rng)
    return constrain_state(new_state, mesh), metrics
  return constrained_step


def make_mesh(config):
  """The run's mesh: `mesh_devices(config)` devices, config.mesh.fsdp."""
  return parallel.make_mesh(mesh_devices(config), config.mesh.get("fsdp", 1))


def mesh_devices(config) -> int:
  """config.mesh.num_devices (0: all); but with num_devices 0 and fsdp 1, a
  single-process CPU run whose device count genimg chose
  (`distributed.chose_cpu_devices`) uses the first config.mesh.cpu_devices
  (0: all) CPU devices: for steps that ran faster on one CPU device with
  all cores than split over one device per core (docs/performance.md)."""
  num_devices = config.mesh.num_devices
  cpu_devices = config.mesh.get("cpu_devices", 0)
  if (num_devices == 0 and cpu_devices and config.mesh.get("fsdp", 1) == 1
      and distributed.chose_cpu_devices() and jax.process_count() == 1
      and jax.default_backend() == "cpu"):
    return min(cpu_devices, jax.device_count())
  return num_devices


def compile_train_step(config, mesh):
  """The family's train step, jitted: state with `state_sharding` (replicated
  or split over "fsdp") and donated, batch sharded on the mesh, metrics
  replicated; `parallel.compiler_options`."""
  repl, batch = parallel.replicated(mesh), parallel.data_sharding(mesh)
  step = family_module(config).bind_train_step(config, mesh)
  state = repl
  if parallel.FSDP_AXIS in mesh.axis_names:
    state = None  # In: the argument's; out: constrained in the step.
    step = _with_state_constrained(step, mesh)
  return jax.jit(step,
                 in_shardings=(state, batch, repl), out_shardings=(state, repl),
                 donate_argnums=0,
                 compiler_options=parallel.compiler_options(config, mesh))


def speed_scalars(steps: int, seconds: float, batch_size: int,
                  flops_per_step: float = 0.0, num_devices: int = 1,
                  peak_per_device: float | None = None) -> dict[str, float]:
  """The "speed/" scalars of `steps` train steps that took `seconds`.

  steps_per_s, images_per_s (global batch), step_ms; with the step's FLOPs
  (`bench.flops_of` the lowered step: the whole global batch) and a
  device's peak FLOP/s, also tflops_per_s_per_device (achieved, per device
  of the mesh) and mfu (that over the peak, 0-1).
  """
  step_s = seconds / steps
  scalars = {"steps_per_s": steps / seconds,
             "images_per_s": steps * batch_size / seconds,
             "step_ms": 1e3 * step_s}
  if flops_per_step and peak_per_device:
    per_device = flops_per_step / step_s / num_devices
    scalars["tflops_per_s_per_device"] = per_device / 1e12
    scalars["mfu"] = model_flops_utilization(flops_per_step, step_s,
                                             num_devices, peak_per_device)
  return scalars


def model_flops_utilization(flops_per_step: float, step_s: float,
                            num_devices: int,
                            peak_per_device: float) -> float:
  """The fraction of the mesh's peak that a step of `flops_per_step` (over
  all devices) taking `step_s` seconds achieves: flops / (step_s x devices x
  peak per device)."""
  return flops_per_step / (step_s * num_devices * peak_per_device)


def step_flops_and_peak(config, mesh, lowered) -> tuple[float, float | None]:
  """(FLOPs of one train step over the global batch, counted as `genimg
  bench` counts them on the lowered step; the published peak FLOP/s of one
  of the mesh's devices for config.model.dtype, or None: CPUs and devices
  without a published peak, which get no MFU)."""
  from genimg_jax import bench  # pylint: disable=g-import-not-at-top
  device = mesh.devices.flat[0]
  if device.platform == "cpu":
    return 0.0, None
  dtype = config.get("model", {}).get("dtype", "float32")
  peak = bench.published_peak(device, dtype, bench.float32_matmul(device))
  return bench.flops_of(lowered), None if peak is None else peak[0]


def speed_postfix(scalars: dict[str, float]) -> dict[str, str]:
  """The progress bar's short form of `speed_scalars`."""
  postfix = {"img/s": f"{scalars['images_per_s']:.4g}",
             "ms/step": f"{scalars['step_ms']:.4g}"}
  if "mfu" in scalars:
    postfix["TFLOP/s/dev"] = f"{scalars['tflops_per_s_per_device']:.4g}"
    postfix["MFU"] = f"{100 * scalars['mfu']:.1f}%"
  return postfix


def parameter_counts(state) -> dict[str, int]:
  """{module path: parameter count} of the trained parameters in `state`
  (every `params` collection, e.g. `g/Generator_0/ConvTranspose_0` for a
  GAN; EMA copies and optimizer state excluded), at the top module level."""
  counts = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    keys = [str(getattr(k, "name", getattr(k, "key", k))) for k in path]
    if "params" not in keys:
      continue
    at = keys.index("params")
    name = "/".join(keys[:at] + keys[at + 1:at + 2])
    counts[name] = counts.get(name, 0) + int(np.prod(leaf.shape))
  return counts


class CompileCacheCounter:
  """Counts JAX's persistent compilation cache hits and misses (listens to
  jax.monitoring events from the first instance on)."""
  hits = misses = 0
  _listening = False

  def __init__(self):
    if not CompileCacheCounter._listening:
      jax.monitoring.register_event_listener(CompileCacheCounter._on_event)
      CompileCacheCounter._listening = True
    self._start = (CompileCacheCounter.hits, CompileCacheCounter.misses)

  @staticmethod
  def _on_event(event, **kwargs):
    del kwargs
    if event == "/jax/compilation_cache/cache_hits":
      CompileCacheCounter.hits += 1
    elif event == "/jax/compilation_cache/cache_misses":
      CompileCacheCounter.misses += 1

  def counts(self) -> tuple[int, int]:
    """(hits, misses) since this counter was made."""
    return (CompileCacheCounter.hits - self._start[0],
            CompileCacheCounter.misses - self._start[1])


def setup_compilation_cache(config, workdir: str) -> str:
  """Turns on JAX's persistent compilation cache, so a restarted run loads
  its compiled steps instead of recompiling; returns its directory ("" when
  off). config.compilation_cache_dir: "" (default) keeps a directory set by
  JAX_COMPILATION_CACHE_DIR, else uses WORKDIR/compilation_cache; "off"
  leaves the cache as JAX has it. Call before anything is compiled."""
  directory = config.get("compilation_cache_dir", "")
  if directory == "off":
    return jax.config.jax_compilation_cache_dir or ""
  if not directory:
    directory = jax.config.jax_compilation_cache_dir
    # Several processes get the cache only where it is set explicitly (they
    # would otherwise all write WORKDIR/compilation_cache at once).
    if not directory and jax.process_count() == 1:
      directory = checkpoint.workdir_path(workdir, "compilation_cache")
    if not directory:
      return ""
  if directory != jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", directory)
    from jax.experimental import compilation_cache  # pylint: disable=g-import-not-at-top
    compilation_cache.compilation_cache.reset_cache()
  return directory


def check_finite(step: int, metrics: dict) -> None:
  """Raises FloatingPointError naming the step and metric that is not finite."""
  for name, value in metrics.items():
    if not math.isfinite(float(value)):
      raise FloatingPointError(
          f"Training diverged: metric {name!r} is {float(value)} at step "
          f"{step}. The last good checkpoint is kept; lower the learning "
          "rate or check the data.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stop_at_step: int | None = None):
  """Trains `config` in `workdir`, resuming from its latest checkpoint.

  Returns (state, final eval metrics). `stop_at_step` stops early after
  saving a checkpoint, as a preempted run would (the metrics are then {}).
  """
  config_lib.validate(config)  # Before anything is written or compiled.
  checkpoint.check_writable(workdir)
  with checkpoint.WorkdirLock(workdir):
    return _train_and_evaluate(config, workdir, stop_at_step)


def without_unfit_fid(config):
  """`config`, or a copy with eval_samples 0 (no FID, score, KID or
  precision/recall) when its feature network cannot measure its images
  (`quality.feature_network_misfit`), which is said once on stdout."""
  why = quality.feature_network_misfit(config)
  if why is None:
    return config
  if jax.process_index() == 0:
    print(f"Training without FID: {why}.", flush=True)
  config = copy.deepcopy(config)
  config.eval_samples = 0
  return config


def _train_and_evaluate(config, workdir, stop_at_step):
  config = without_unfit_fid(config)
  cache_dir = setup_compilation_cache(config, workdir)
  cache_counter = CompileCacheCounter()
  mesh = make_mesh(config)
  parallel.check_global_batch(config.batch_size, mesh)
  train_source = load_split(config, "train", workdir)
  eval_source = load_split(config, config.data.eval_split, workdir)
  num_steps = total_steps(config, len(train_source))

  init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
  state = init_state(config, mesh, init_rng, num_steps)
  ckpt = checkpoint.Checkpointer(workdir, config_lib.model_fingerprint(config),
                                 config.keep_checkpoints)
  restored = ckpt.restore_latest(state)
  if restored is not None:
    state = restored
  # Opened by every process together, before any evaluation, when the
  # evaluation computes an FID.
  best_ckpt = None
  if config.get("feature_network") and config.get("eval_samples"):
    best_ckpt = checkpoint.Checkpointer(
        workdir, ckpt.fingerprint, best=True,
        protocol=config_lib.evaluation_protocol(config))
  start_step = int(jax.device_get(state.step))
  if jax.process_index() == 0:
    epath.Path(checkpoint.workdir_path(workdir, "config.json")).write_text(
        config.to_json_best_effort(indent=2))
  train_step = compile_train_step(config, mesh)
  compiled_step = None  # Lowered and compiled once, at the first batch.
  flops_per_step, peak_per_device = 0.0, None
  speed = {}  # The last window's speed_postfix, shown with the losses.
  evaluator = family_module(config).make_evaluator(config, mesh, eval_source,
                                                   workdir)
  step_rng = parallel.replicate(step_rng, mesh)
  writer = metrics_writer.MetricWriter(workdir)
  writer.write_hparams(config)
  if jax.process_index() == 0:
    counts = parameter_counts(state)
    width = max(map(len, counts))
    print(f"{sum(counts.values()):,} parameters:\n" + "\n".join(
        f"  {name:<{width}} {n:>12,}" for name, n in counts.items()),
          flush=True)
  progress = tqdm(total=num_steps, initial=start_step, unit="step",
                  disable=jax.process_index() != 0, dynamic_ncols=True,
                  mininterval=1 if sys.stderr.isatty() else 30)

  pending = None  # (step, on-device metrics) of the previous step.
  window_start, window_steps = time.perf_counter(), 0
  eval_metrics = {}

  def flush_pending():
    step, metrics = pending
    metrics = jax.device_get(metrics)
    check_finite(step, metrics)
    writer.write(step, metrics)
    return metrics

  def evaluate(done):
    """Runs the evaluation of step `done` on every process and logs it."""
    # The evaluators take the state replicated: an FSDP-sharded one is
    # gathered for them.
    eval_metrics = evaluator(
        state if parallel.FSDP_AXIS not in mesh.axis_names
        else parallel.gather(state, mesh), done)
    writer.write(done, eval_metrics, prefix="eval")
    writer.flush()
    if best_ckpt is not None and checkpoint.BEST_METRIC in eval_metrics:
      best_ckpt.save(done, state, eval_metrics)
    if jax.process_index() == 0:  # The writer: other processes would read
      # grids that process 0 may still be writing.
      writer.write_images(done, images_lib.read_grids(
          checkpoint.workdir_path(workdir, "samples"), done))
    progress.write(f"step {done}: eval " + ", ".join(
        f"{k}={v:.4f}" for k, v in eval_metrics.items()))
    return eval_metrics

  def evaluation_due(done):
    return bool(config.eval_every and done % config.eval_every == 0
                or done == num_steps)

  try:
    with preemption_lib.Preemption(ckpt.manager.reached_preemption) as (
        preemption):
      if start_step and evaluation_due(start_step) and evaluation_missing(
          workdir, start_step):
        progress.write(f"Step {start_step} was checkpointed but not evaluated "
                       "(the run stopped first): evaluating it now.")
        eval_metrics = evaluate(start_step)
      batches = data.train_batches(train_source, config.batch_size,
                                   config.seed, start_step, num_steps, mesh)
      for step, batch in batches:
        if compiled_step is None:
          lowered = train_step.lower(state, batch, step_rng)
          flops_per_step, peak_per_device = step_flops_and_peak(config, mesh,
                                                                lowered)
          compiled_step = lowered.compile()
          window_start = time.perf_counter()  # Speeds leave out compiling.
        state, metrics = compiled_step(state, batch, step_rng)
        if pending is not None:
          last = flush_pending()
          progress.set_postfix({**{k: f"{v:.4g}" for k, v in last.items()
                                   if "loss" in k or k == "accuracy"},
                                **speed}, refresh=False)
        pending = (step + 1, metrics)  # Logged as the step count after it.
        if step == start_step and cache_dir:
          hits, misses = cache_counter.counts()
          progress.write(f"Compilation cache {cache_dir}: {hits} hits, "
                         f"{misses} misses.")
        progress.update(1)
        window_steps += 1
        done = step + 1
        stopping = preemption.requested(done) or done == stop_at_step
        if done % config.log_every == 0:
          jax.block_until_ready(state.step)
          scalars = speed_scalars(
              window_steps, time.perf_counter() - window_start,
              config.batch_size, flops_per_step, int(mesh.devices.size),
              peak_per_device)
          writer.write(done, scalars, prefix="speed")
          speed = speed_postfix(scalars)
          writer.write(done, optim.learning_rates(config.optimizer, num_steps,
                                                  done - 1), prefix="optimizer")
          window_start, window_steps = time.perf_counter(), 0
        if done % config.checkpoint_every == 0 or done == num_steps or stopping:
          flush_pending()  # Never checkpoint a state whose loss is NaN.
          pending = None
          ckpt.save(done, state)
        if stopping:  # The resumed run evaluates this step, if due.
          progress.write(f"Stopping at step {done}: checkpoint saved; run the "
                         "same command again to resume.")
          eval_metrics = {}
          break
        if evaluation_due(done):
          eval_metrics = evaluate(done)
      if pending is not None:
        flush_pending()
  finally:
    progress.close()
    writer.close()
    ckpt.close()
    if best_ckpt is not None:
      best_ckpt.close()
  if eval_metrics and jax.process_index() == 0:
    epath.Path(checkpoint.workdir_path(workdir, "eval.json")).write_text(
        json.dumps({"step": int(jax.device_get(state.step)), **eval_metrics}))
  return state, eval_metrics


def evaluation_missing(workdir: str, step: int) -> bool:
  """Whether WORKDIR/metrics.jsonl holds no evaluation of `step` (a run
  stopped or killed between saving that step and finishing its evaluation).
  Read by process 0 and broadcast, so every process decides alike."""
  missing = True
  if jax.process_index() == 0:
    path = epath.Path(checkpoint.workdir_path(workdir, "metrics.jsonl"))
    if path.exists():
      for line in path.read_text().splitlines():
        try:
          row = json.loads(line)
        except ValueError:
          continue  # A line cut short by a kill.
        if row.get("split") == "eval" and row.get("step") == step:
          missing = False
          break
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    missing = bool(multihost_utils.broadcast_one_to_all(np.int32(missing)))
  return missing


def restore_workdir(workdir: str, overrides=(), which: str = "latest"):
  """(config, mesh, state) of a checkpoint in a `genimg train` workdir.

  which: "latest", "best" (the lowest FID of the evaluations so far, kept in
  WORKDIR/checkpoints_best) or a step number.
  """
  config_path = epath.Path(checkpoint.workdir_path(workdir, "config.json"))
  if not config_path.is_file():
    raise checkpoint.CheckpointError(
        f"{workdir!r} holds no config.json: it is not a genimg workdir. Pass "
        "the --workdir of a `genimg train` run.")
  config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
  config = config_lib.apply_overrides(config, overrides)
  setup_compilation_cache(config, workdir)
  mesh = make_mesh(config)
  state = init_state(config, mesh, jax.random.key(0), 1)
  if which not in ("latest", "best") and not which.isdigit():
    raise config_lib.ConfigError(
        f"--checkpoint {which!r}: use latest, best or a step number.")
  ckpt = checkpoint.Checkpointer(workdir, config_lib.model_fingerprint(config),
                                 config.keep_checkpoints,
                                 best=which == "best")
  try:
    step = int(which) if which.isdigit() else None
    if which == "best":
      step = ckpt.best_step()
      if step is None:
        raise checkpoint.CheckpointError(
            f"{workdir!r} has no best checkpoint: one is kept at each "
            "evaluation that computes an FID (set config.feature_network "
            "and eval_samples).")
    state = ckpt.restore_latest(state, step)
  finally:
    ckpt.close()
  if state is None:
    raise checkpoint.CheckpointError(f"{workdir!r} has no checkpoint yet.")
  return config, mesh, state


def evaluate_workdir(workdir: str, overrides=(),
                     which: str = "latest") -> dict[str, float]:
  """Restores a checkpoint of `workdir` (see `restore_workdir`) and
  evaluates it."""
  config, mesh, state = restore_workdir(workdir, overrides, which)
  config = without_unfit_fid(config)
  eval_source = load_split(config, config.data.eval_split, workdir)
  step = int(jax.device_get(state.step))
  evaluator = family_module(config).make_evaluator(config, mesh, eval_source,
                                                   workdir)
  return {"step": step, **evaluator(state, step)}


def sample_workdir(workdir: str, num: int, output: str, seed: int = 0,
                   overrides=(), which: str = "latest",
                   **sampler_options) -> dict:
  """Writes `num` samples of the latest checkpoint of a generative `workdir`
  to `output`: a PNG grid (FILE.png, at most 1,024 images) or uint8 NHWC
  images as `arr_0` in an .npz (FILE.npz, the layout clean-fid, torch-fidelity
  and the ADM evaluation suite read; `labels` too, for class-conditional
  runs). sampler_options (diffusion only): sampler, steps, eta,
  guidance_scale; None keeps the run's. which: the checkpoint (see
  `restore_workdir`). Every process samples; process 0 writes."""
  if not output.endswith((".png", ".npz")):
    raise config_lib.ConfigError(
        f"--output {output!r} must end in .png (a grid) or .npz (arrays).")
  if num < 1 or (output.endswith(".png") and num > 1024):
    raise config_lib.ConfigError(
        f"--num {num}: a PNG grid takes 1 to 1,024 images; write more to an "
        ".npz file.")
  config, mesh, state = restore_workdir(workdir, overrides, which)
  family = family_module(config)
  if not hasattr(family, "sample_images"):
    raise config_lib.ConfigError(
        f"{workdir!r} trained a {config.family}, which does not generate "
        "images.")
  sampler_options = {k: v for k, v in sampler_options.items()
                     if v is not None}
  if sampler_options and config.family != "diffusion":
    raise config_lib.ConfigError(
        f"--{'/--'.join(sampler_options)} only apply to diffusion runs; "
        f"{workdir!r} trained a {config.family}.")
  # The labels sampled (cycling through the classes), and written with the
  # images for conditional runs.
  labels = data.cycling_labels(num, config.data.num_classes)
  start = time.perf_counter()
  images = family.sample_images(config, mesh, state, labels, seed,
                                **sampler_options)
  seconds = time.perf_counter() - start
  if jax.process_index() == 0:
    output_path = epath.Path(output)  # A local path or a URL.
    output_path.parent.mkdir(parents=True, exist_ok=True)
    if output.endswith(".png"):
      from genimg_jax import images as images_lib  # pylint: disable=g-import-not-at-top
      images_lib.save_grid(output, images, min(num, 10 if
                                               config.data.num_classes else 8))
    else:
      arrays = {"arr_0": images}
      if config.get(config.family, {}).get("conditional", False):
        arrays["labels"] = labels
      with output_path.open("wb") as f:
        np.savez(f, **arrays)
  return {"step": int(jax.device_get(state.step)), "output": output,
          "num": num, "seconds": round(seconds, 2),
          "images_per_s": round(num / seconds, 2)}


def export_feature_network(workdir: str, output: str) -> dict:
  """Writes the latest ResNet classifier of `workdir` as a feature network
  (`output` and `output.json`) for FID and score on its data set."""
  config, _, state = restore_workdir(workdir)
  if config.family != "classifier":
    raise config_lib.ConfigError(
        f"{workdir!r} trained a {config.family}, not a classifier: train "
        "experiments/resnet.py:DATASET and export that.")
  from genimg_jax import quality  # pylint: disable=g-import-not-at-top
  meta = quality.save_feature_network(
      state, config.model, output, tuple(config.data.image_shape),
      config.data.num_classes)
  return {"step": int(jax.device_get(state.step)), "output": output, **meta}


def export_autoencoder(workdir: str, output: str) -> dict:
  """Writes the latest KL autoencoder of `workdir` (experiments/
  autoencoder_kl.py) as `output` and `output.json` for
  `autoencoder.load`, with its scaling factor."""
  config, mesh, state = restore_workdir(workdir)
  if config.family != "autoencoder":
    raise config_lib.ConfigError(
        f"{workdir!r} trained a {config.family}, not an autoencoder: train "
        "experiments/autoencoder_kl.py and export that.")
  return {"output": output, **autoencoder_family.export(
      config, mesh, state, output, workdir)}
