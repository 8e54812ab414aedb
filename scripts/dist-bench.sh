#!/bin/bash
# Issue #41: 1 training process against 2 on the Criteo-shaped stream (2 M examples, Parquet shards of
# 250 k rows), the same examples, one after the other; run it alone. Usage: scripts/dist-bench.sh [OUT]
set -e
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
OUT=${1:-/tmp/uembed-dist-bench}
rm -rf $OUT && mkdir -p $OUT
.venv/bin/uembed data synth --preset criteo-kaggle --examples 2M --shard-rows 250000 --out $OUT/data --quiet
for n in 1 2; do
  /usr/bin/time -v .venv/bin/uembed train --dataset $OUT/data --embedding unified --budget 0.1 --epochs 1 \
    --runs-dir $OUT/runs --name dp$n --nproc $n --quiet > $OUT/train-$n.log 2> $OUT/train-$n.err || { echo "nproc $n failed"; tail -20 $OUT/train-$n.err; }
done
.venv/bin/python - "$OUT" <<'PY'
import json, sys
for n in (1, 2):
    m = json.load(open(f"{sys.argv[1]}/runs/dp{n}/metrics.json"))
    print(n, {k: m.get(k) for k in ("world_size", "train_examples", "examples_per_second", "examples_per_second_per_rank", "test_auc", "test_logloss", "train_seconds", "replicas_identical")})
PY
