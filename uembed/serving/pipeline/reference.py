"""The reference scorer: the pipeline's stages over the bundle's own row files, one call per batch of examples. The
oracle the service's tiers, caches and batching are checked against (they must not change a score), and the scorer
of the export check and the peer baselines.

>>> scorer = ReferenceScorer(load_bundle("bundles/movielens/1"))       # doctest: +SKIP
>>> scorer.score([{"user_id": "196", "movie_id": "242", "genres": ["Comedy"]}])  # doctest: +SKIP
array([0.87], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from uembed.contract.errors import ExampleError
from uembed.serving.pipeline.stages import Stages

__all__ = ["ExampleError", "ReferenceScorer"]


class ReferenceScorer(Stages):
    def score(self, examples: Sequence[Mapping[str, object]], context: Mapping[str, object] | None = None) -> np.ndarray:
        """Scores [B] of one request's examples (with ``context``: a ranking request's candidates)."""
        scores, _ = self.score_batch([self.canonicalise(examples, context)])
        return np.asarray(scores, dtype=np.float32).reshape(-1)
