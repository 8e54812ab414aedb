#!/bin/bash
# int2 QAT warm-started (float32 until validation AUC stops improving, then fine-tuned quantised at a tenth of the
# learning rates) against float32 and post-training int2, unified at 10% on MovieLens-100K, 20 seeds, paired by
# seed (warm-20-seeds/), and QAT from the start at the same 20 seeds (cold-20-seeds/). Seeds 0-9 are the ones the
# fine-tune's learning rate was chosen on (explore-*/: the full rate, then a tenth); seeds 10-19 are new.
set -e
cd "$(dirname "$0")/../../.."
HERE=docs/results/movielens100k-int2-warm-start
ARGS=(--dataset movielens100k --methods unified --budgets 0.1 --seeds 20 --epochs 12 --patience 2 --jobs 1
      --settings docs/results/movielens100k-tuned/selected.json)
.venv/bin/python -m uembed study "${ARGS[@]}" --codecs float32,int2 --qat none,int2 --qat-warm-start --out $HERE/warm-20-seeds
.venv/bin/python -m uembed study "${ARGS[@]}" --codecs int2 --qat int2 --out $HERE/cold-20-seeds
