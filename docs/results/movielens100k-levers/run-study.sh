#!/bin/bash
# Memory levers on MovieLens-100K (issue #37, item 6): every method with its tuned settings
# (../movielens100k-tuned/selected.json), 5 seeds, each run evaluated in every row codec, trained
# quantization-aware in int4 and int2, and pruned to 8 columns.
set -e
cd "$(dirname "$0")/../../.."
.venv/bin/python -m uembed study --dataset movielens100k \
  --methods collisionless,unified --budgets 0.01,0.1 --seeds 5 --epochs 12 --patience 2 --jobs 2 \
  --settings docs/results/movielens100k-tuned/selected.json \
  --codecs float32,float16,int8,int4,int2,pq --qat none,int4,int2 --prune-keep 8 --prune-epochs 3 \
  --out docs/results/movielens100k-levers
