#!/bin/sh
# The peer benchmark as recorded in docs/BENCHMARKS.md (about 9 minutes on a 2-core machine, run alone).
exec uembed bench --peers --seconds 8 --out docs/results/peers/peers.json
