#!/bin/bash
# A/B of the rowwise range at 10 seeds: the same unified 10% runs (no QAT, and QAT int2; scored in float32 and
# int2) with the least-squared-error range of this commit (search/) and with each row's min and max as main had it
# at 08e4082 (minmax/). The float32 runs of the two are identical, so every difference is the quantiser's.
# (The summaries' "Produced by" lines name the /tmp folders these were first written to.)
set -e
cd "$(dirname "$0")/../../../.."
PY=${PYTHON:-$PWD/.venv/bin/python}
HERE=$PWD/docs/results/movielens100k-int2-range/ab-10-seeds
ARGS=(--dataset movielens100k --methods unified --budgets 0.1 --seeds 10 --epochs 12 --patience 2 --jobs 1
      --settings "$PWD/docs/results/movielens100k-tuned/selected.json" --codecs float32,int2 --qat none,int2)
"$PY" -m uembed study "${ARGS[@]}" --out "$HERE/search"
git worktree add --detach /tmp/uembed-minmax 08e4082
(cd /tmp && PYTHONPATH=/tmp/uembed-minmax "$PY" -m uembed study "${ARGS[@]}" --out "$HERE/minmax")
git worktree remove /tmp/uembed-minmax
