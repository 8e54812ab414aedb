#!/bin/bash
# Peak RSS of one streamed model against the number of examples, after commit 341e801 (keys stay on disk).
set -x
UEMBED="main/.venv/bin/python -m uembed"
COMMON="--network mlp --hidden 256,128 --batch-size 2048 --lr 0.001 --epochs 1 --checkpoint-every 100M"
$UEMBED data synth --preset criteo-kaggle --examples 1.5M --out data-criteo/kaggle-1.5M
$UEMBED train --dataset data-criteo/kaggle-1.5M --embedding unified --budget-rows 2000000 $COMMON --quiet --runs-dir criteo-work/rss2 --name scan-1.5M
for size in 1.5M 12.5M; do
  stats=criteo-work/rss2/scan-1.5M/stats
  [ $size = 12.5M ] && stats=criteo-work/study-10M/stats
  /usr/bin/time -v $UEMBED train --dataset data-criteo/kaggle-$size --stats $stats --embedding unified \
    --budget-rows 2000000 $COMMON --quiet --runs-dir criteo-work/rss2 --name unified-$size
done
