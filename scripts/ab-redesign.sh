#!/usr/bin/env bash
# The redesign (#34) against the main before it, side by side in one run on one machine: each round runs the same
# benches on each tree in turn (before, after; then after, before), so drift between minutes falls on both.
#   ROUNDS=3 scripts/ab-redesign.sh [BEFORE_COMMIT]   # run alone: nothing else on the machine; ~12 min a round
# Writes docs/results/redesign/{peers,scale}-{before,after}-{round}.json and prints the side-by-side table.
set -euo pipefail
cd "$(dirname "$0")/.."
BEFORE=${1:-c058921}
WORK=${WORK:-/tmp/uembed-ab}
OUT=docs/results/redesign
SECONDS_PER_PHASE=${SECONDS_PER_PHASE:-6}
mkdir -p "$WORK" "$OUT"
if [ ! -d "$WORK/before" ]; then git worktree add --detach "$WORK/before" "$BEFORE"; fi
AFTER=$PWD
BUNDLE=$(.venv/bin/python -c "from pathlib import Path; from uembed.model.demo import demo_bundle; print(demo_bundle(Path('bundles')))" | tail -1)
SCALE=$WORK/scale/criteo-scale/1
if [ ! -f "$SCALE/manifest.json" ]; then
  .venv/bin/python -c "from pathlib import Path; from uembed.loadtest.scale_bench import scale_bundle; scale_bundle(None, Path('$WORK/scale'), 100_000_000, 'float16')"
fi
run() {  # tree-name tree-path round
  local name=$1 tree=$2 round=$3
  echo "== round $round: $name ($tree)"
  (cd "$tree" && PYTHONPATH="$tree" "$AFTER/.venv/bin/python" -m uembed bench --peers --bundle "$AFTER/$BUNDLE" \
      --peer-sizes 64 --peer-workers 1 --seconds "$SECONDS_PER_PHASE" --out "$AFTER/$OUT/peers-$name-$round.json")
  (cd "$tree" && PYTHONPATH="$tree" "$AFTER/.venv/bin/python" -m uembed bench --phases scale --scale-bundle "$SCALE" \
      --scale-workers 1 --seconds "$SECONDS_PER_PHASE" --out "$AFTER/$OUT/scale-$name-$round.json")
}
for round in $(seq 1 "${ROUNDS:-2}"); do  # before then after in odd rounds, after then before in even ones
  if [ $((round % 2)) = 1 ]; then run before "$WORK/before" "$round"; run after "$AFTER" "$round"
  else run after "$AFTER" "$round"; run before "$WORK/before" "$round"; fi
done
.venv/bin/python scripts/ab-redesign-table.py "$OUT"
