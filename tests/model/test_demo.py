"""The demo bundle (uembed/model/demo.py): its dense network split by the user's features, so a ranking request of
one user and many candidates computes the user's part once."""

import numpy as np
import pytest

from uembed.bundle.loader import load_bundle
from uembed.model.demo import DEMO_CONTEXT_FEATURES, demo_bundle
from uembed.serving.pipeline.cpu import ModelRuntime
from uembed.serving.pipeline.reference import ReferenceScorer

pytestmark = pytest.mark.slow  # trains the demo's model (one epoch here)


def test_a_ranking_request_on_the_demo_bundle_computes_the_users_part_once(tmp_path, movielens_examples):
    bundle = load_bundle(demo_bundle(tmp_path / "bundles", epochs=1))
    assert bundle.manifest["dense"]["context_split"]["features"] == list(DEMO_CONTEXT_FEATURES)
    runtime = ModelRuntime(bundle, hot_rows_bytes=2**16)
    parts = runtime.dense_parts
    assert parts is not None and runtime.splits_context
    context_rows = []
    compute_context = parts._context

    def recording(context):  # the real context part, its input rows counted
        context_rows.append(len(context))
        return compute_context(context)

    parts._context = recording
    flat_rows = []
    compute_flat = parts._flat

    def recording_flat(embeddings):  # the parts in one model (dense_flat.onnx), its input rows counted
        flat_rows.append(len(embeddings))
        return compute_flat(embeddings)

    parts._flat = recording_flat
    user = {name: movielens_examples[0][name] for name in DEMO_CONTEXT_FEATURES}
    candidates = [{k: v for k, v in e.items() if k not in DEMO_CONTEXT_FEATURES} for e in movielens_examples[:500]]
    ranked = runtime.score(candidates, user)
    assert context_rows == [1]  # the user's part of the first cross layer, once for 500 candidates
    context_rows.clear()
    flat_examples = [{**candidate, **user} for candidate in candidates]
    flat = runtime.score(flat_examples)
    assert context_rows == [] and flat_rows == [500]  # the flat form: both parts on every example, in one call
    np.testing.assert_allclose(ranked, flat, atol=1e-5, rtol=0)
    whole = ReferenceScorer(bundle)
    whole.dense_parts = None  # dense.onnx, unsplit
    np.testing.assert_allclose(ranked, whole.score(flat_examples), atol=1e-5, rtol=0)
