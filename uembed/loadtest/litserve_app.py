"""A peer for ``uembed bench --peers``: LitServe serving this project's reference scorer with LitServe's own
dynamic batching.

The same bundle and the same scoring code as the service: every request's examples are checked and
canonicalised by the service's ``ExampleEncoder`` (the service's value limits and value caches), and a
batch of requests is hashed, looked up from the row files, assembled and scored by ONNX Runtime in one
call, as the service's batcher does. What differs is the serving path: LitServe's HTTP servers, its queues
between them and the inference workers, its batching loop.

    python -m loadtest.litserve_app --bundle BUNDLE --port 8000 --workers 1

Requests and responses are ``/v1/score``'s: ``{"examples": [...]}`` in, ``{"scores": [...]}`` out.
"""

from __future__ import annotations

import argparse
import os

import litserve as ls
import numpy as np

from uembed.bundle.loader import load_bundle
from uembed.serving.pipeline.reference import ReferenceScorer
from uembed.serving.pipeline.values import ValueLimits
from uembed.serving.settings import load_settings

MAX_BATCH_SIZE = 32  # requests per batch
BATCH_TIMEOUT_S = 0.002


class BundleScorer(ls.LitAPI):
    def setup(self, device) -> None:
        settings = load_settings()
        limits = ValueLimits(settings.max_value_chars, settings.max_list_values)
        self.scorer = ReferenceScorer(load_bundle(os.environ["LITSERVE_BUNDLE"]), limits=limits,
                                      cache_bytes=settings.value_cache_bytes)  # fmt: skip

    def decode_request(self, request):
        return self.scorer.canonicalise(request["examples"])

    def batch(self, inputs):
        return inputs

    def predict(self, batch):
        scorer = self.scorer
        rows, weights = scorer.hash(batch)
        scores = scorer.dense(scorer.assemble(scorer.lookup(rows), weights)).reshape(-1)
        return np.split(scores, np.cumsum([part.count for part in batch])[:-1])

    def unbatch(self, output):
        return output

    def encode_response(self, output):
        return {"scores": output.astype(np.float64).tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1, help="inference workers (and as many API servers)")
    args = parser.parse_args()
    os.environ["LITSERVE_BUNDLE"] = args.bundle
    api = BundleScorer(max_batch_size=MAX_BATCH_SIZE, batch_timeout=BATCH_TIMEOUT_S, api_path="/v1/score")
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=args.workers)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=args.workers, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
