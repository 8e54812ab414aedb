#!/bin/bash
# Memory levers on the Criteo-shaped data, 10 M training examples streamed, one pass, one seed (issue #37, item 6):
# collisionless and unified at four budgets, each run evaluated in every row codec, and trained again
# quantization-aware in int2. The data: `uembed data synth --preset criteo-kaggle --examples 12.5M --out DATA`.
set -e
DATA=${DATA:-/work/criteo/kaggle-12.5M}
WORK=${WORK:-/work/criteo/levers-10M}  # the runs (checkpoints of up to 1 GB) stay here
cd "$(dirname "$0")/../../../.."
.venv/bin/python -m uembed study --dataset "$DATA" --methods collisionless,unified --budgets 0.0002,0.001,0.01,0.1 \
  --seeds 1 --jobs 2 --network mlp --hidden 256,128 --batch-size 2048 --lr 0.001 --epochs 1 --checkpoint-every 100M \
  --codecs float32,float16,int8,int4,int2,pq --qat none,int2 --out "$WORK"
cp "$WORK"/runs.csv "$WORK"/summary.md "$WORK"/pareto.png docs/results/criteo-synthetic/levers-10M/
