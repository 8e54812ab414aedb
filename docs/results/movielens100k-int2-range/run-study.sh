#!/bin/bash
# The int2 goal of issue #37 (within 0.005 AUC of float32 at 10% of the rows) with the rowwise quantiser's
# least-squared-error range (int2; int4 keeps min and max) instead of each row's min and max: unified at 10%, its tuned
# settings, 5 seeds, trained without QAT and quantization-aware in int4 and int2, evaluated in float32, int4, int2.
# The levers study (../movielens100k-levers) is the same runs with the min/max range.
set -e
cd "$(dirname "$0")/../../.."
${PYTHON:-.venv/bin/python} -m uembed study --dataset movielens100k \
  --methods unified --budgets 0.1 --seeds 5 --epochs 12 --patience 2 --jobs 1 \
  --settings docs/results/movielens100k-tuned/selected.json \
  --codecs float32,int4,int2 --qat none,int4,int2 \
  --out docs/results/movielens100k-int2-range
