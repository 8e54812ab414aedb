#!/bin/sh
# The tuned MovieLens-100K study of issue #21 (docs/results/movielens100k-tuned).
exec .venv/bin/uembed study --dataset movielens100k \
  --methods collisionless,hashing-trick,unified,multi-size-unified,monolithic-shared,seo-applier-exact \
  --budgets 0.01,0.03,0.1,0.3 --seeds 5 --trials 20 --epochs 12 --patience 2 --jobs 2 \
  --out docs/results/movielens100k-tuned
