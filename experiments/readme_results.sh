#!/usr/bin/env bash
# Reproduces the result tables of README.md and docs/results.md on a 2-core CPU machine, in order:
# each finished run appends its record to docs/results/FAMILY.jsonl, and the tables are re-rendered.
# Usage: bash experiments/readme_results.sh [OUT_DIR]   (several hours)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-workdirs/readme}
mkdir -p "$out"
export TIMEFORMAT='wall_s=%R user_s=%U system_s=%S'  # read by render_tables.py record
run() {  # run FAMILY MODEL NAME ARGS...: times a genimg command (log in $out/NAME.log), records it
  local family=$1 model=$2 name=$3; shift 3
  { time .venv/bin/genimg "$@" ; } > "$out/$name.log" 2>&1
  tail -n 4 "$out/$name.log"
  .venv/bin/python docs/render_tables.py record --workdir "$out/$name" --family "$family" \
      --model "$model" --command "genimg $*" --log "$out/$name.log"
}
run classifier "seed CNN" cnn train --config experiments/cnn.py --workdir "$out/cnn"
run classifier ResNet resnet train --config experiments/resnet.py --workdir "$out/resnet"
run classifier ResNet resnet_full train --config experiments/resnet.py:fashion_mnist,full --workdir "$out/resnet_full"
run gan DCGAN dcgan train --config experiments/dcgan.py --workdir "$out/dcgan"
run gan WGAN-GP wgan_gp train --config experiments/wgan_gp.py --workdir "$out/wgan_gp" --config.num_steps=500 --config.eval_every=250
run gan "hinge + SN" hinge_sn train --config experiments/hinge_sn.py --workdir "$out/hinge_sn" --config.num_steps=1500 --config.eval_every=750
run vae "MLP VAE" vae_mlp train --config experiments/vae_mlp.py --workdir "$out/vae_mlp" --config.vae.iw_samples=1000
run vae "conv VAE" vae_conv train --config experiments/vae_conv.py --workdir "$out/vae_conv" --config.vae.iw_samples=100
run vae "conditional conv VAE" vae_cond train --config experiments/vae_cond.py --workdir "$out/vae_cond" --config.vae.iw_samples=100
run gan "conditional DCGAN" cgan train --config experiments/cgan.py --workdir "$out/cgan" --config.num_steps=1500 --config.eval_every=750
run diffusion "DDPM (eps)" ddpm train --config experiments/ddpm.py --workdir "$out/ddpm"
run diffusion "flow matching" flow train --config experiments/flow.py --workdir "$out/flow"
.venv/bin/python docs/render_tables.py results
.venv/bin/genimg bench --model cnn,dcgan,vae --batch 64,128 --devices 1,2 --steps 10 --output "$out/bench.jsonl"
