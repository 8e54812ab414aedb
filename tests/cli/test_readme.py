"""The README's commands, as a new user runs them: `make demo` serves the demo bundle, and the curl under it prints
what the README shows; the walk-through of one's own data (example-data, train, export, serve, curl) prints its
outputs. Training is deterministic, so the README's scores are the runs'."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from uembed.model.demo import demo_bundle

pytestmark = pytest.mark.slow  # trains the demo bundle (MovieLens-100K, 20 epochs)

README = Path(__file__).resolve().parents[2] / "README.md"


CROSS_MACHINE_SCORE_TOLERANCE = 0.03


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
    # The demo is trained where it is first served: the same data, seeds and one thread, but torch's kernels sum in
    # another order on another instruction set, and twenty epochs carry that into the second decimal. The README's
    # digits are this project's machines' answer; elsewhere a score stays near them, far nearer than a wrong feature,
    # model or score order would leave it.
    for score, printed in zip(answer["scores"], digits):
        assert abs(score - float(printed)) < CROSS_MACHINE_SCORE_TOLERANCE, (score, printed)


OWN_DATA = "## Your own data in ten minutes"


def walk_through() -> list[tuple[str, list[str]]]:
    """The README's walk-through of one's own data: each `$ command` of its console blocks with the lines shown under it."""
    text = README.read_text()
    section = text[text.index(OWN_DATA) : text.index("\n## ", text.index(OWN_DATA) + 1)]
    steps: list[tuple[str, list[str]]] = []
    for block in re.findall(r"```console\n(.*?)```", section, re.S):
        for line in block.splitlines():
            if line.startswith("$ "):
                steps.append((line[2:], []))
            else:
                steps[-1][1].append(line)
    return steps


def untimed(line: str) -> str:
    """A line with its durations masked: the one part of the outputs that differs between runs."""
    return re.sub(r"\b\d+(\.\d+)?s\b", "<seconds>", line)


def test_the_readmes_own_data_walk_through_runs_and_prints_what_it_shows(tmp_path, start_service):
    steps = walk_through()
    commands = [command.split()[:2] for command, _ in steps]
    assert commands[:4] == [["uembed", "example-data"], ["uembed", "train"], ["uembed", "export"], ["uembed", "serve"]]
    assert [c[0] for c in commands[4:]] == ["curl"] * (len(steps) - 4)
    text = README.read_text()
    spec = re.search(r"```toml\n(.*?)```", text[text.index(OWN_DATA) :], re.S)[1]
    suggested, service = None, None
    for command, shown in steps:
        if suggested:  # each command is the one the previous command printed as next
            assert command == suggested, (command, suggested)
        args = shlex.split(command)
        if args[:2] == ["uembed", "serve"]:
            service = start_service([tmp_path / args[args.index("--bundle") + 1]])
            suggested = None
            continue
        if args[0] == "curl":
            body = json.loads(args[args.index("-d") + 1])
            path = re.search(r"http://127\.0\.0\.1:8000(/\S+)", command)[1]
            answer = httpx.post(f"{service.url}{path}", json=body, timeout=30).json()
            printed = json.loads(re.sub(r"(\d)\.\.\.", r"\1", shown[0]))
            assert (answer["model"], answer["version"]) == (printed["model"], printed["version"])
            digits = re.findall(r"(\d+\.\d+)\.\.\.", shown[0])
            assert len(answer["scores"]) == len(digits)
            assert all(str(score).startswith(prefix) for score, prefix in zip(answer["scores"], digits, strict=True)), answer
            suggested = None
            continue
        result = subprocess.run([sys.executable, "-m", "uembed", *args[1:]], capture_output=True, text=True, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert [untimed(line) for line in result.stdout.splitlines()] == [untimed(line) for line in shown], result.stdout
        nexts = [line.split(": ", 1)[1] for line in shown if line.startswith(("next: ", "then: "))]
        suggested = nexts[0] if nexts else None
        if args[1] == "export":  # the curl the export suggests is the walk-through's first
            assert nexts[1] == next(c for c, _ in steps if c.startswith("curl"))
        if args[1] == "example-data":  # the README shows the spec the command writes
            assert (tmp_path / "data" / "clicks.toml").read_text() == spec
