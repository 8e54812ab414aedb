#!/bin/bash
# Hybrid tables on MovieLens-100K (issue #38): the shared methods at 10% of the collisionless rows with their tuned
# settings (../movielens100k-tuned/selected.json), 5 seeds, with no head, fixed head shares and auto; then the
# collision report of the tuned multi-size table without and with its head (one seed each, train's own printout).
set -e
cd "$(dirname "$0")/../../.."
OUT=docs/results/movielens100k-hybrid
.venv/bin/python -m uembed study --dataset movielens100k --methods collisionless,unified,multi-size-unified --budgets 0.1 \
  --seeds 5 --epochs 12 --patience 2 --jobs 2 --settings docs/results/movielens100k-tuned/selected.json \
  --head-shares 0,0.1,0.25,auto --out "$OUT"
ARGS=$(.venv/bin/python - <<'PY'
import json
from uembed.model.data.movielens import load_movielens100k
from uembed.model.train import TrainConfig
from uembed.model.tuning import selected_configs, train_arguments
chosen = json.load(open("docs/results/movielens100k-tuned/selected.json"))
configs = selected_configs(chosen, load_movielens100k(), TrainConfig(epochs=12, patience=2))
print(train_arguments(configs[("multi-size-unified", 0.1)]))
PY
)
for share in 0 auto; do
  .venv/bin/python -m uembed train --dataset movielens100k --embedding multi-size-unified $ARGS --head-share $share \
    --runs-dir /tmp/uembed-hybrid-runs --name multi-size-head-$share 2>&1 | tee "$OUT/collisions-head-$share.txt"
done
