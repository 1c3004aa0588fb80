#!/usr/bin/env bash
# GPU numbers in one run of at most 8 minutes: every model's train
# step in float32 and bfloat16 on 1 device, the batch growing from 128 until
# it runs out of memory (or reaches MAX_BATCH, or the time budget ends), then
# a table of images/s and fraction of peak. The batch jumps to the largest
# power-of-two multiple that XLA's memory analysis of the last run predicts
# to fit, and bisects back after a jump that does not fit. float32 rows say
# whether their matmuls ran as TF32 (JAX's default on Ampere and newer) and
# use that peak.
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
# Writes OUT_DIR/gpu_bench.jsonl (one record per run) and OUT_DIR/gpu_bench.txt.
# Environment: MODELS (default all; a config argument may follow, e.g.
# ddpm:cifar10,full), DTYPES (float32,bfloat16), START_BATCH (128), MAX_BATCH
# (65536), BUDGET (sweep seconds, 420), MATMUL_PRECISION
# (highest: true float32 matmuls instead of TF32), PYTHON (.venv/bin/python if
# there is one, else python3), XLA_PYTHON_CLIENT_MEM_FRACTION (0.9: the share
# of GPU memory JAX may use, so "fits" means fits in that), HARD_STOP (480:
# seconds for the whole script).
set -uo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
out=${1:-${OUT:-/tmp/gpu_bench}}
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
  echo "nvidia-smi not found: the sweep runs on JAX's default backend"
fi
args=(bench --sweep --model "${MODELS:-all}" --dtypes "${DTYPES:-float32,bfloat16}"
      --batch "${START_BATCH:-128}" --max-batch "${MAX_BATCH:-65536}"
      --time-budget "${BUDGET:-420}" --output "$jsonl")
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
  echo "sweep exited with $rc; the table of what it measured:" | tee -a "$out/gpu_bench.txt"
  timeout 12 "$PYTHON" -c 'import sys; from genimg_jax import bench
print(bench.format_sweep_table(bench.read_records(sys.argv[1])))' "$jsonl" \
    | tee -a "$out/gpu_bench.txt"
fi
echo "took $((SECONDS - start)) s; records in $jsonl"
exit "$rc"
