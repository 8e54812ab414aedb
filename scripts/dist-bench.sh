#!/bin/bash
# Issue #41: 1 training process against 2 on the Criteo-shaped stream (2 M examples), the same examples, one after
# the other, and the machine's own ceiling for two processes: two independent single-process trainings at once
# (no exchange between them), each on the first half of the shards. Then 2 processes with --overlap-exchange (each
# step's gradients applied one step late), with float32 and with bfloat16 on the wire. Run it alone.
# Usage: scripts/dist-bench.sh [OUT]   (BATCH=512 for another batch per process)
set -e
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
OUT=$(realpath -m "${1:-/tmp/uembed-dist-bench}")
BATCH=${BATCH:-256}
rm -rf $OUT && mkdir -p $OUT
.venv/bin/uembed data synth --preset criteo-kaggle --examples 2M --shard-rows 250000 --out $OUT/data --quiet
mkdir -p $OUT/half
for path in $OUT/data/*; do
  case $path in *.parquet) ;; *) cp $path $OUT/half/ ;; esac
done
SHARDS=$(ls $OUT/data/*.parquet | wc -l)
ls $OUT/data/*.parquet | head -n $(( SHARDS > 1 ? SHARDS / 2 : 1 )) | xargs -I{} ln -s {} $OUT/half/
train() {  # NAME DATA NPROC [OPTIONS]
  name=$1 data=$2 nproc=$3; shift 3
  /usr/bin/time -v .venv/bin/uembed train --dataset $data --embedding unified --budget 0.1 --epochs 1 --batch-size $BATCH \
    --runs-dir $OUT/runs --name $name --nproc $nproc --quiet "$@" > $OUT/train-$name.log 2> $OUT/train-$name.err || { echo "$name failed"; tail -20 $OUT/train-$name.err; }
}
train dp1 $OUT/data 1
train dp2 $OUT/data 2
train pair-a $OUT/half 1 & train pair-b $OUT/half 1 & wait
train dp2-overlap $OUT/data 2 --overlap-exchange
train dp2-overlap-bf16 $OUT/data 2 --overlap-exchange --exchange-dtype bfloat16
.venv/bin/python - "$OUT" <<'PY'
import json, sys
import os
names = ("dp1", "dp2", "pair-a", "pair-b", "dp2-overlap", "dp2-overlap-bf16")
runs = {name: json.load(open(path)) for name in names if os.path.exists(path := f"{sys.argv[1]}/runs/{name}/metrics.json")}
for name, m in runs.items():
    print(name, {k: m.get(k) for k in ("world_size", "train_examples", "examples_per_second", "examples_per_second_per_rank",
                                       "test_auc", "test_logloss", "train_seconds", "replicas_identical", "exchange_overflows")})
one, two = runs["dp1"]["examples_per_second"], runs["dp2"]["examples_per_second"]
pair = runs["pair-a"]["examples_per_second"] + runs["pair-b"]["examples_per_second"]
print(f"2 processes over 1: {two / one:.2f}x; two independent processes at once over 1: {pair / one:.2f}x; "
      f"data-parallel over the independent pair: {two / pair:.2f}; test AUC {runs['dp2']['test_auc']:.4f} against {runs['dp1']['test_auc']:.4f}")
for name in ("dp2-overlap", "dp2-overlap-bf16"):
    if name not in runs:
        print(f"{name}: no metrics (see its train-{name}.err)")
        continue
    m = runs[name]
    print(f"{name} over 1: {m['examples_per_second'] / one:.2f}x; test AUC {m['test_auc']:.4f} (1 process: "
          f"{runs['dp1']['test_auc']:.4f}, difference {m['test_auc'] - runs['dp1']['test_auc']:+.4f}); replicas identical: {m.get('replicas_identical')}")
PY
