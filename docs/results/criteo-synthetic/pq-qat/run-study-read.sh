#!/bin/bash
# The second pq QAT grid (after 7cb0c7c): the codebooks refitted on the rows recent batches read, not on the whole
# table. Collisionless and multi-size unified at 6%, pq QAT with one sub-vector, the same data and settings as
# run-study.sh (whose float32 runs are the reference: the runs are deterministic for a seed).
set -e
DATA=${DATA:-/work/criteo/kaggle-12.5M}
WORK=${WORK:-/work/criteo/pq-qat-read}
cd "$(dirname "$0")/../../../.."
[ -d "$DATA" ] || .venv/bin/python -m uembed data synth --preset criteo-kaggle --examples 12.5M --out "$DATA"
.venv/bin/python -m uembed study --dataset "$DATA" --methods collisionless,multi-size-unified --budgets 0.06 \
  --seeds 1 --jobs 2 --network mlp --hidden 256,128 --batch-size 2048 --lr 0.001 --epochs 1 --checkpoint-every 100M \
  --codecs pq --qat pq --pq-subvectors 1 --out "$WORK"
mkdir -p docs/results/criteo-synthetic/pq-qat/read
cp "$WORK"/runs.csv "$WORK"/summary.md docs/results/criteo-synthetic/pq-qat/read/
