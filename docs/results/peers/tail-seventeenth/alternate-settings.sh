#!/bin/bash
# The peers phase (REST v1, 1 worker, 64 examples) three rounds, the settings given taking turns in each round:
#   OUT=/tmp/tail docs/results/peers/tail-seventeenth/alternate-settings.sh UEMBED_BUSY_POLL_MS=0 UEMBED_BUSY_POLL_MS=2
#   python docs/results/peers/tail-seventeenth/summarise.py '/tmp/tail/*.json'
OUT=${OUT:-/tmp/tail}
mkdir -p "$OUT"
cd "$(dirname "$0")/../../../.."
for r in 1 2 3; do
  for cfg in "$@"; do
    name=$(echo "$cfg" | tr '=' '_')-r$r
    env "$cfg" .venv/bin/uembed bench --peers --peer-sizes 64 --peer-workers 1 --peer-fronts ceiling v1 --seconds 8 \
      --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1
  done
done
