"""The product-quantisation search's speed: training's nearest-centroid codes of 30,000 rows (a batch's gathered
rows) and the export's codes of 200,000 rows, for one, two and four sub-vectors of a dim-16 row, one thread (torch's
and numpy's BLAS alike).

    PYTHONPATH=TREE .venv/bin/python scripts/pq-search-bench.py     # once per tree, trees taking turns

Prints the median milliseconds of five calls each (after one to warm up) and a digest of the codes, which two trees
must share, as JSON. Compare trees run minutes apart, in turns: this machine drifts.
"""

import os

os.environ["OPENBLAS_NUM_THREADS"] = "1"  # before numpy loads its BLAS
os.environ["OMP_NUM_THREADS"] = "1"

import hashlib  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from uembed.bundle.codecs import pq_encode  # noqa: E402
from uembed.model.qat import pq_codes  # noqa: E402

torch.set_num_threads(1)


def median_ms(call, times: int = 5) -> float:
    call()
    spent = []
    for _ in range(times):
        started = time.perf_counter()
        call()
        spent.append(time.perf_counter() - started)
    return round(statistics.median(spent) * 1000, 1)


out = {}
for subvectors, width in ((1, 16), (2, 8), (4, 4)):
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(30000, 16, generator=generator)
    codebooks = torch.randn(subvectors, 256, width, generator=generator)
    exported = np.random.default_rng(0).standard_normal((200000, 16)).astype(np.float32)
    digest = hashlib.sha256(pq_codes(rows, codebooks).numpy().tobytes() + pq_encode(exported, codebooks.numpy()).tobytes())
    out[f"M={subvectors}"] = {
        "train_30k_rows_ms": median_ms(lambda: pq_codes(rows, codebooks)),
        "export_200k_rows_ms": median_ms(lambda: pq_encode(exported, codebooks.numpy()), times=3),
        "codes_sha256": digest.hexdigest()[:16],
    }
print(json.dumps(out))
