"""What a load run measured: its requests, failures, duration and latencies, and their percentiles. Light to import
(numpy only), so that a load client in its own process starts without the service's modules."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def percentiles(seconds: list[float]) -> dict[str, float]:
    values = np.asarray(seconds) * 1000
    return {f"p{q}_ms": float(np.percentile(values, q)) for q in (50, 95, 99)} if len(values) else {}


@dataclass
class LoadResult:
    requests: int
    failures: int
    seconds: float
    latencies: list[float]

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def summary(self) -> dict:
        return {"requests": self.requests, "failures": self.failures, "requests_per_s": round(self.throughput, 1),
                **{k: round(v, 3) for k, v in percentiles(self.latencies).items()}}  # fmt: skip
