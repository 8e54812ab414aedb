#!/bin/bash
# The full Criteo-shaped grid at 10 M training examples (12.5 M generated), in one study.
set -x
UEMBED="main/.venv/bin/python -m uembed"
COMMON="--network mlp --hidden 256,128 --batch-size 2048 --lr 0.001 --epochs 1 --checkpoint-every 100M"
date
/usr/bin/time -v $UEMBED data synth --preset criteo-kaggle --examples 12.5M --out data-criteo/kaggle-12.5M
date
/usr/bin/time -v $UEMBED study --dataset data-criteo/kaggle-12.5M \
  --methods collisionless,hashing-trick,unified,multi-size-unified,seo-search,seo-applier-exact \
  --budgets 0.01,0.1,0.3 --seeds 1 --jobs 2 --search-examples 2M $COMMON --out criteo-work/study-10M
date
