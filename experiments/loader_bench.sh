#!/usr/bin/env bash
# The input pipeline against the train step on this machine's CPU cores:
# folders of 64 x 64 and 256 x 256 JPEGs (smooth random images, 2,000 each),
# read through Grain and resized to DCGAN's 64 x 64 (dcgan:celeb_a64).
# `genimg bench --input real` records the loader alone (loader_images_per_s)
# and loader + step (images_per_s). Appends to docs/loader_bench.jsonl and
# renders the table in docs/data.md.
#   bash experiments/loader_bench.sh [SCRATCH_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
scratch=${1:-/tmp/genimg_loader_bench}
python=${PYTHON:-.venv/bin/python}
genimg=${GENIMG:-.venv/bin/genimg}
"$python" - "$scratch" <<'PY'
import os, sys
import numpy as np
from PIL import Image
scratch = sys.argv[1]
rng = np.random.default_rng(0)
for side in (64, 256):
  root = os.path.join(scratch, f"jpeg{side}")
  if os.path.isdir(root):
    continue
  os.makedirs(root)
  for i in range(2000):
    small = rng.integers(0, 256, (side // 8, side // 8, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((side, side), Image.Resampling.BICUBIC)
    image.save(os.path.join(root, f"{i:05d}.jpg"), quality=90)
PY
for side in 64 256; do
  for repeat in 1 2; do
    "$genimg" bench --model dcgan:celeb_a64 --input real --batch 64 --steps 10 \
        --output docs/loader_bench.jsonl \
        --config.data.name="folder:$scratch/jpeg$side" \
        --config.data.center_crop=0 --config.data.num_classes=0
  done
done
"$python" docs/render_tables.py loader
