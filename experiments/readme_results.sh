#!/usr/bin/env bash
# Reproduces the result tables of README.md and docs/results.md on a 2-core CPU machine, in order.
# Usage: bash experiments/readme_results.sh [OUT_DIR]   (several hours)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-workdirs/readme}
mkdir -p "$out"
run() {  # run NAME ARGS...: times a genimg command, log in $out/NAME.log
  local name=$1; shift
  { time .venv/bin/genimg "$@" ; } > "$out/$name.log" 2>&1
  tail -n 4 "$out/$name.log"
}
run cnn train --config experiments/cnn.py --workdir "$out/cnn"
run resnet train --config experiments/resnet.py --workdir "$out/resnet"
run resnet_full train --config experiments/resnet.py:fashion_mnist,full --workdir "$out/resnet_full"
run dcgan train --config experiments/dcgan.py --workdir "$out/dcgan"
run wgan_gp train --config experiments/wgan_gp.py --workdir "$out/wgan_gp" --config.num_steps=500 --config.eval_every=250
run hinge_sn train --config experiments/hinge_sn.py --workdir "$out/hinge_sn" --config.num_steps=1500 --config.eval_every=750
run vae_mlp train --config experiments/vae_mlp.py --workdir "$out/vae_mlp" --config.vae.iw_samples=1000
run vae_conv train --config experiments/vae_conv.py --workdir "$out/vae_conv" --config.vae.iw_samples=100
run vae_cond train --config experiments/vae_cond.py --workdir "$out/vae_cond" --config.vae.iw_samples=100
run cgan train --config experiments/cgan.py --workdir "$out/cgan" --config.num_steps=1500 --config.eval_every=750
run bench bench --model cnn,dcgan,vae --batch 64,128 --devices 1,2 --steps 10 --output "$out/bench.jsonl"
