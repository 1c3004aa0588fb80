#!/usr/bin/env bash
# GPU numbers in one run of at most 8 minutes (HARD_STOP).
#
# MODE=rows (default): the full-size configs on 1 device (mesh.fsdp=1), each
# at its config's batch, in bfloat16 and float32 (float32 rows say whether
# their matmuls ran as TF32, JAX's default on Ampere and newer, and are held
# to that peak), with model.remat none and blocks where the config has it:
#   ddpm:cifar10,full      DDPM's 35.7M UNet on CIFAR-10, batch 128
#   dit_b2_latent          DiT-B/2 on 32x32x4 latents (synthetic), batch 256
#   dit_xl2_latent         DiT-XL/2 on 32x32x4 latents (synthetic), batch 256
#   dcgan:celeb_a64,full   DCGAN on 64x64 CelebA shapes, batch 128
# then a table of images/s and MFU per row, and published numbers beside it.
# Rows run remat by remat and dtype by dtype (bfloat16 first); rows not
# started within BUDGET seconds are listed as skipped, a row that runs out of
# memory is listed as such and the others run.
# MODE=sweep: every model (MODELS, default all: the configs' local sizes) in
# each DTYPE on 1 device, the batch growing from START_BATCH until it runs
# out of memory (or reaches MAX_BATCH, or the time budget ends): it jumps to
# the largest power-of-two multiple that XLA's memory analysis of the last
# run predicts to fit, and bisects back after a jump that does not fit.
#
# Install first, from the repo root (the `cuda12` extra is jax[cuda12]):
#   python -m venv .venv && .venv/bin/pip install -e '.[cuda12]'
# On a machine with no package registry but a CUDA JAX, flax and optax of its
# own, carry wheels of this package (`pip wheel --no-deps .`), ml_collections
# and tensorboardX, install them with `pip install --no-deps --target DIR`,
# and run with PYTHONPATH=DIR PYTHONSAFEPATH=1 PYTHON=python3
# (docs/performance.md, "Reproducing").
# Usage, from the repo root:
#   bash experiments/gpu_bench.sh [OUT_DIR]    (default: $OUT, else /tmp/gpu_bench)
# Writes OUT_DIR/gpu_bench.jsonl (one record per row) and OUT_DIR/gpu_bench.txt.
# Environment: MODE (rows or sweep), MODELS (a config argument may follow a
# name, e.g. ddpm:cifar10,full), DTYPE (bfloat16,float32; sweep:
# float32,bfloat16), STEPS (timed steps: rows 10, sweep 10), BUDGET (seconds
# for the rows or the sweep, 420), HARD_STOP (480: seconds for the whole
# script), MATMUL_PRECISION (highest: true float32 matmuls instead of TF32),
# PYTHON (.venv/bin/python if there is one, else python3),
# XLA_PYTHON_CLIENT_MEM_FRACTION (0.9: the share of GPU memory JAX may use,
# so "fits" means fits in that). Rows only: BATCH (0: each config's own),
# REMAT (none,blocks), OVERRIDES (extra --config.KEY=VALUE arguments for
# every model, e.g. to shrink them for a CPU test). Sweep only: START_BATCH
# (128), MAX_BATCH (65536).
set -uo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
out=${1:-${OUT:-/tmp/gpu_bench}}
mode=${MODE:-rows}
mkdir -p "$out"
jsonl=$out/gpu_bench.jsonl
rm -f "$jsonl"
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
if command -v nvidia-smi > /dev/null; then
  nvidia-smi -L
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
else
  echo "nvidia-smi not found: the bench runs on JAX's default backend"
fi
case $mode in
  rows)
    # shellcheck disable=SC2206  # OVERRIDES: words on purpose.
    args=(bench --model "${MODELS:-ddpm:cifar10,full,dit_b2_latent,dit_xl2_latent,dcgan:celeb_a64,full}"
          --batch "${BATCH:-0}" --dtype "${DTYPE:-bfloat16,float32}"
          --remat "${REMAT:-none,blocks}" --devices 1 --steps "${STEPS:-10}"
          --time-budget "${BUDGET:-420}" --output "$jsonl"
          --config.mesh.fsdp=1 ${OVERRIDES:-}) ;;
  sweep)
    args=(bench --sweep --model "${MODELS:-all}" --dtype "${DTYPE:-float32,bfloat16}"
          --batch "${START_BATCH:-128}" --max-batch "${MAX_BATCH:-65536}"
          --steps "${STEPS:-10}" --time-budget "${BUDGET:-420}" --output "$jsonl") ;;
  *) echo "MODE=$mode: rows or sweep" >&2; exit 2 ;;
esac
if [[ -n ${MATMUL_PRECISION:-} ]]; then
  args+=(--matmul-precision "$MATMUL_PRECISION")
fi
# The hard stop: HARD_STOP (480) s in all, less what has run and 15 s for the
# table.
limit=$((${HARD_STOP:-480} - 15 - (SECONDS - start)))
echo "genimg ${args[*]} (hard stop after ${limit} s)"
timeout "$limit" "$PYTHON" -m genimg_jax.cli "${args[@]}" | tee "$out/gpu_bench.txt"
rc=${PIPESTATUS[0]}
if [[ $rc -ne 0 && -s $jsonl ]] &&
   ! grep -q '^model ' "$out/gpu_bench.txt"; then
  # Stopped (timeout: rc 124) before its own table: print what was measured.
  echo "bench exited with $rc; the table of what it measured:" | tee -a "$out/gpu_bench.txt"
  table=format_table
  [[ $mode == sweep ]] && table=format_sweep_table
  timeout 12 "$PYTHON" -c 'import sys; from genimg_jax import bench
print(getattr(bench, sys.argv[2])(bench.read_records(sys.argv[1])))' "$jsonl" "$table" \
    | tee -a "$out/gpu_bench.txt"
fi
if [[ $mode == rows ]]; then
  tee -a "$out/gpu_bench.txt" <<'ANCHORS'
Published numbers beside these (2 FLOPs per multiply-add; a train step is
about 3 forward passes):
  DDPM CIFAR-10 (35.7M UNet, batch 128): 21 steps/s on a TPU v3-8 (Ho et al.
    2020, appendix B) = 2,688 images/s on 4 chips, about 672 images/s per
    chip; at 35.0 GFLOP per image and step (genimg's count of
    ddpm:cifar10,full) about 23.5 TFLOP/s, 19% of a v3 chip's 123 TFLOP/s.
  DiT-XL/2 on 32x32x4 latents: 0.84 steps/s at batch 128 on one A100 (fast-DiT
    PyTorch trainer: fp16 mixed precision, gradient checkpointing, latents
    extracted beforehand) = about 107 images/s; at 3 x 2 x 118.6 G = 711.6
    GFLOP per image and step about 76 TFLOP/s, 24% of the A100's 312 TFLOP/s
    (12% if the DiT paper's 118.6 "Gflops", multiply-adds, are taken as
    FLOPs).
ANCHORS
fi
echo "took $((SECONDS - start)) s; records in $jsonl"
exit "$rc"
