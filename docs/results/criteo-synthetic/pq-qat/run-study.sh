#!/bin/bash
# Issue #37's Criteo goal (within 0.001 AUC of collisionless float32 at >= 1,000x fewer embedding bytes), with the
# lever the pq-1000x study named: rows trained with their codebooks (`--qat pq`). One code byte a row (one
# sub-vector, 256 centroids of the whole row) at 6% of the collisionless rows is 1,047x; collisionless, unified and
# multi-size unified, each trained once without QAT (scored in float32 and post-training pq) and once with pq QAT.
# The data: `uembed data synth --preset criteo-kaggle --examples 12.5M --out DATA` (deterministic: seed 0).
set -e
DATA=${DATA:-/work/criteo/kaggle-12.5M}
WORK=${WORK:-/work/criteo/pq-qat}  # the runs (checkpoints of up to 1 GB) stay here
cd "$(dirname "$0")/../../../.."
[ -d "$DATA" ] || .venv/bin/python -m uembed data synth --preset criteo-kaggle --examples 12.5M --out "$DATA"
.venv/bin/python -m uembed study --dataset "$DATA" --methods collisionless,unified,multi-size-unified --budgets 0.06 \
  --seeds 1 --jobs 2 --network mlp --hidden 256,128 --batch-size 2048 --lr 0.001 --epochs 1 --checkpoint-every 100M \
  --codecs float32,pq --qat none,pq --pq-subvectors 1 --out "$WORK"
cp "$WORK"/runs.csv "$WORK"/summary.md "$WORK"/pareto.png docs/results/criteo-synthetic/pq-qat/
