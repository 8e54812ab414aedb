#!/bin/bash
# 2-worker v1 A/B, trees taking turns: /tmp/ab-before (before) and /work/main (after)
for r in 1 2 3; do
  if [ $((r % 2)) = 1 ]; then order="/tmp/ab-before /work/main"; else order="/work/main /tmp/ab-before"; fi
  for t in $order; do
    name=$([ $t = /work/main ] && echo after || echo before)
    (cd $t && PYTHONPATH=$t /work/main/.venv/bin/python -m uembed bench --bundle /work/main/bundles/movielens100k/1 --peers --peer-sizes 64 --peer-workers 2 --peer-fronts v1 --seconds 8 --out /tmp/s16/ab2w-$name-$r.json > /tmp/s16/ab2w-$name-$r.log 2>&1)
  done
done
