"""The reference scorer: the pipeline's stages over the bundle's own row files, one call per batch of examples. The
oracle the service's tiers, caches and batching are checked against (they must not change a score), and the scorer
of the export check and the peer baselines.

>>> scorer = ReferenceScorer(load_bundle("bundles/movielens/1"))       # doctest: +SKIP
>>> scorer.score([{"user_id": "196", "movie_id": "242", "genres": ["Comedy"]}])  # doctest: +SKIP
array([0.87], dtype=float32)
"""

from __future__ import annotations

import numpy as np

from uembed.serving.pipeline.stages import Stages


class ReferenceScorer(Stages):
    """:class:`Stages` as they are: rows from the bundle's row files, no caches of rows, one call per batch."""

    def gather_table(self, position: int, ids: np.ndarray) -> np.ndarray:
        """Every id's row straight from its table, duplicates included: the oracle does not share the service's
        dedupe on a flat batch."""
        return self.sources[position].gather(ids)
