"""The README's first command, as a new user runs it: `make demo` serves the demo bundle, and the curl under it
prints what the README shows. Training is deterministic, so the README's scores are the demo's."""

import json
import re
from pathlib import Path

import httpx
import pytest

from uembed.model.demo import demo_bundle

pytestmark = pytest.mark.slow  # trains the demo bundle (MovieLens-100K, 20 epochs)

README = Path(__file__).resolve().parents[2] / "README.md"


def first_curl() -> tuple[dict, dict, list[str]]:
    """The README's first scoring curl: its request body, the response it shows, and the shown scores' digits."""
    text = README.read_text()
    block = re.search(r"curl -s -X POST http://127\.0\.0\.1:8000/v1/score.*?-d '(?P<body>[^']+)'\n# (?P<out>\{[^\n]*\})", text, re.S)
    assert block, "the README has no curl of /v1/score followed by its output"
    shown = block["out"]
    digits = re.findall(r"(-?\d+\.\d+)\.\.\.", shown)  # "0.9485..." -> "0.9485"
    return json.loads(block["body"]), json.loads(re.sub(r"(\d)\.\.\.", r"\1", shown)), digits


def test_the_readmes_first_curl_prints_what_the_demo_answers(tmp_path, start_service):
    body, shown, digits = first_curl()
    service = start_service([demo_bundle(tmp_path / "bundles")])
    answer = httpx.post(f"{service.url}/v1/score", json=body, timeout=30).json()
    assert (answer["model"], answer["version"]) == (shown["model"], shown["version"])
    assert len(answer["scores"]) == len(digits) == len(body["examples"])
    for score, printed in zip(answer["scores"], digits):
        assert f"{score:.{len(printed.split('.')[1])}f}" == printed or str(score).startswith(printed), (score, printed)
