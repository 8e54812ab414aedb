#!/bin/bash
# Toward issue #37's Criteo goal (within 0.001 AUC of collisionless float32 at >= 1,000x fewer embedding bytes):
# the Criteo-shaped data's planted signal is one number per (feature, value), so a row may need far fewer bits than
# 16 float32 values. Unified and multi-size unified at 3% and 6% of the collisionless rows, evaluated in pq with one
# sub-vector (one code byte a row, 256 centroids of the whole row), beside collisionless float32 in the same study.
# The data: `uembed data synth --preset criteo-kaggle --examples 12.5M --out DATA` (deterministic: seed 0).
set -e
DATA=${DATA:-/work/criteo/kaggle-12.5M}
WORK=${WORK:-/work/criteo/pq-1000x}  # the runs (checkpoints of up to 1 GB) stay here
cd "$(dirname "$0")/../../../.."
[ -d "$DATA" ] || .venv/bin/python -m uembed data synth --preset criteo-kaggle --examples 12.5M --out "$DATA"
.venv/bin/python -m uembed study --dataset "$DATA" --methods collisionless,unified,multi-size-unified --budgets 0.03,0.06 \
  --seeds 1 --jobs 2 --network mlp --hidden 256,128 --batch-size 2048 --lr 0.001 --epochs 1 --checkpoint-every 100M \
  --codecs float32,int4,pq --pq-subvectors 1 --out "$WORK"
cp "$WORK"/runs.csv "$WORK"/summary.md "$WORK"/pareto.png docs/results/criteo-synthetic/pq-1000x/
