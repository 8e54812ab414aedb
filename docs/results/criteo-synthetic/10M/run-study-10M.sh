#!/bin/bash
# The study at 10 M training examples (12.5 M generated), queued after run-study.sh under the
# heavy-job lock. The SEO search and Applier at budgets 0.01 and 0.1 are the first attempt's
# runs (same data, same statistics, first-attempt-10M/); here they run at 0.3 only.
set -x
cd "$(dirname "$0")/../../../.."  # the repository root (the run used a snapshot of the branch at the commit it names)
COMMON="--network mlp --hidden 256,128 --batch-size 2048 --lr 0.001 --epochs 1 --checkpoint-every 100M"
date
/usr/bin/time -v .venv/bin/python -m uembed study --dataset data-criteo/kaggle-12.5M \
  --stats criteo-work/stats-12.5M --methods collisionless,hashing-trick,unified,multi-size-unified \
  --budgets 0.01,0.1,0.3 --seeds 1 --jobs 2 $COMMON --out criteo-work/study-10M
date
/usr/bin/time -v .venv/bin/python -m uembed study --dataset data-criteo/kaggle-12.5M \
  --stats criteo-work/stats-12.5M --methods seo-search,seo-applier-exact \
  --budgets 0.3 --seeds 1 --jobs 1 --search-examples 2M $COMMON --out criteo-work/study-10M-seo
date
