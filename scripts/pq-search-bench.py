"""The product-quantisation search's speed: training's nearest-centroid codes of 30,000 rows (a batch's gathered
rows) and the export's codes of 200,000 rows, for one, two and four sub-vectors of a dim-16 row, one thread.

    PYTHONPATH=TREE .venv/bin/python scripts/pq-search-bench.py     # once per tree, trees taking turns

Prints milliseconds per call as a dict. Compare trees run minutes apart, in turns: this machine drifts.
"""

import time

import numpy as np
import torch

from uembed.bundle.codecs import pq_encode
from uembed.model.qat import pq_codes

torch.set_num_threads(1)

out = {}
for M, s in ((1, 16), (2, 8), (4, 4)):
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(30000, 16, generator=g)
    cb = torch.randn(M, 256, s, generator=g)
    pq_codes(rows, cb)
    t = time.perf_counter()
    [pq_codes(rows, cb) for _ in range(5)]
    train = (time.perf_counter() - t) / 5
    big = np.random.default_rng(0).standard_normal((200000, 16)).astype(np.float32)
    t = time.perf_counter()
    pq_encode(big, cb.numpy())
    export = time.perf_counter() - t
    out[f"M={M}"] = {"train_30k_rows_ms": round(train * 1000, 1), "export_200k_rows_ms": round(export * 1000, 1)}
print(out)
