"""Step-interleaved A/B of genimg-jax train steps in one process.

  python benchmarks/ab_steps.py MODEL STEPS VARIANT [VARIANT ...]
  python benchmarks/ab_steps.py vae 30 base phases
  python benchmarks/ab_steps.py dcgan 12 base mesh.num_devices=1

Each VARIANT is '+'-joined knobs: `base` (the code as it is), `phases`
(the transposed convolutions as the earlier CPU rewrites: 4 phase
convolutions for stride 2, row convolutions for stride 1, the taps forward
pass for the VAE's last layer), `laxconvt` (lax's transposed convolutions
and their JAX gradients), `laxconv` (the discriminator's stride-2
convolutions as lax's, JAX's input gradient), `mask2` (dropout masks
from two 16-bit values per Threefry hash, as before four), or a config override
`KEY=VALUE` (e.g. `mesh.num_devices=1`, `xla_cpu_ynn_fusions_kept=reduce`).
Every variant's step is compiled first, then the steps run round-robin
(A B C A B C ...), so load on a shared machine hits every variant alike.
Prints one JSON line: per variant the median and min wall ms, the median
process CPU ms per step (less sensitive to other processes' load) and the
median over steps of first-variant ms / this variant's ms (above 1: faster
than the first). GENIMG_CPU_DEVICES sets the device count as for `genimg`.
"""

import json
import os
import statistics
import sys
import time

from genimg_jax import distributed

distributed.use_cpu_cores()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
from genimg_jax import bench, parallel, train  # pylint: disable=g-import-not-at-top,wrong-import-position
from genimg_jax.nets import layers  # pylint: disable=g-import-not-at-top,wrong-import-position

_CLASSES = (layers.ConvTranspose2x, layers.ConvTranspose1x,
            layers.ConvTransposeTaps, layers.ConvStride2)
_ORIGINAL = {c: c.convolve for c in _CLASSES}
_KEEP_MASK = layers.dropout_keep_mask


def _keep_mask_two_per_hash(rng, keep_prob, shape):
  """The earlier dropout mask: 32-bit `jax.random.bits` words (one hash
  each) split into two 16-bit halves."""
  threshold = round(keep_prob * 65536)
  half = -(-shape[-1] // 2)
  bits = jax.random.bits(rng, (*shape[:-1], half), jnp.uint32)
  halves = jnp.concatenate([bits & 0xFFFF, bits >> 16], axis=-1)
  return halves[..., :shape[-1]] < jnp.uint32(threshold), threshold / 65536


def _lax_conv_transpose(stride):
  return lambda self, x, k: jax.lax.conv_transpose(
      x, k, (stride, stride), "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _phases_2x(self, x, k):
  if self.features >= 8:
    return layers.conv_transpose_stride2(x, k)
  return _lax_conv_transpose(2)(self, x, k)


def _taps(self, x, k):
  return layers.forward_by(lambda x, k: layers.conv_transpose_taps(x, k, 1),
                           lambda x, k: _lax_conv_transpose(1)(None, x, k))(
                               x, k)


def set_knobs(knobs) -> list[str]:
  """Patches the layers for `knobs`; returns the config overrides among
  them."""
  for cls, fn in _ORIGINAL.items():
    cls.convolve = fn
  layers.dropout_keep_mask = (_keep_mask_two_per_hash if "mask2" in knobs
                              else _KEEP_MASK)
  if "phases" in knobs:
    layers.ConvTranspose2x.convolve = _phases_2x
    layers.ConvTranspose1x.convolve = (
        lambda self, x, k: layers.conv_transpose_stride1(x, k))
    layers.ConvTransposeTaps.convolve = _taps
  if "laxconvt" in knobs:
    layers.ConvTranspose2x.convolve = _lax_conv_transpose(2)
    layers.ConvTranspose1x.convolve = _lax_conv_transpose(1)
    layers.ConvTransposeTaps.convolve = _lax_conv_transpose(1)
  if "laxconv" in knobs:
    layers.ConvStride2.convolve = lambda self, x, k: (
        jax.lax.conv_general_dilated(
            x, k, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
  return [k for k in knobs if "=" in k]


def compiled_run(model: str, variant: str) -> dict:
  """The variant's compiled step, state and inputs, warmed up."""
  overrides = set_knobs(variant.split("+"))
  config = bench.load_model_config(model, 128, "float32", 0, overrides)
  mesh = train.make_mesh(config)
  state = train.init_state(config, mesh, jax.random.key(0), config.num_steps)
  step = train.compile_train_step(config, mesh)
  rng = parallel.replicate(jax.random.key(1), mesh)
  batch = bench.synthetic_batch(config, mesh)
  compiled = step.lower(state, batch, rng).compile()
  for _ in range(3):
    state, _ = compiled(state, batch, rng)
  jax.block_until_ready(state)
  return {"variant": variant, "step": compiled, "state": state,
          "batch": batch, "rng": rng, "ms": [], "cpu_ms": []}


def main(argv):
  model, steps, variants = argv[1], int(argv[2]), argv[3:]
  runs = [compiled_run(model, v) for v in variants]
  set_knobs([])
  load_before = os.getloadavg()[0]
  for _ in range(steps):
    for run in runs:
      t0, c0 = time.perf_counter(), time.process_time()
      run["state"], _ = run["step"](run["state"], run["batch"], run["rng"])
      jax.block_until_ready(run["state"])
      run["ms"].append(1e3 * (time.perf_counter() - t0))
      run["cpu_ms"].append(1e3 * (time.process_time() - c0))
  first = runs[0]["ms"]
  record = {"model": model, "batch": 128, "devices": jax.device_count(),
            "steps": steps, "jax_version": jax.__version__,
            "host_cpus": os.cpu_count(), "load_avg_1m_before": load_before,
            "load_avg_1m_after": os.getloadavg()[0], "variants": {}}
  for run in runs:
    record["variants"][run["variant"]] = {
        "median_ms": round(statistics.median(run["ms"]), 1),
        "min_ms": round(min(run["ms"]), 1),
        "cpu_ms_median": round(statistics.median(run["cpu_ms"]), 1),
        "first_over_this": round(statistics.median(
            a / b for a, b in zip(first, run["ms"])), 3)}
  print(json.dumps(record), flush=True)


if __name__ == "__main__":
  main(sys.argv)
