"""The side-by-side table of scripts/ab-redesign.sh: each figure before and after the redesign, per round."""

import json
import sys
from pathlib import Path

out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/results/redesign")


def figures(tree: str, round_: int) -> dict:
    peers = json.loads((out / f"peers-{tree}-{round_}.json").read_text())["peers"]
    scale = json.loads((out / f"scale-{tree}-{round_}.json").read_text())["scale_service_1_workers"]
    row = {f"{front} 64 req/s": peers[front]["1w"]["64"]["closed"]["requests_per_s"]
           for front in ("v1", "v2", "grpc", "litserve", "naive")}
    row["v1 64 p99 ms (half load)"] = peers["v1"]["1w"]["64"]["open_at_half"]["p99_ms"]
    row["scale ranking req/s"] = scale["ranking_saturated"]["requests_per_s"]
    row["scale flat req/s"] = scale["flat_same_examples_saturated"]["requests_per_s"]
    row["scale candidates over flat"] = scale["candidates_over_flat"]
    return row


rounds = sorted({int(p.stem.rsplit("-", 1)[1]) for p in out.glob("peers-after-*.json")})
print(f"| figure | {' | '.join(f'before r{r} | after r{r} | after/before r{r}' for r in rounds)} |")
print("| --- |" + " ---: |" * 3 * len(rounds))
table = {r: (figures("before", r), figures("after", r)) for r in rounds}
for name in table[rounds[0]][0]:
    cells = []
    for r in rounds:
        before, after = table[r][0][name], table[r][1][name]
        cells += [f"{before:g}", f"{after:g}", f"{after / before:.2f}" if before else "-"]
    print(f"| {name} | {' | '.join(cells)} |")
