"""The codecs and hybrid bench phases (``uembed bench --phases codecs|hybrid``, uembed/loadtest/codec_bench.py) at
tiny sizes, end to end through the CLI against real servers: the JSON holds every bundle's figures, and the ratios
and goals are the ones its own measured rounds give."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from uembed.cli import build_parser
from uembed.contract.errors import UembedError
from uembed.loadtest.codec_bench import check_args, scale_codec_bundle

ROOT = Path(__file__).resolve().parents[2]
QUICK = ["--seconds", "1", "--rounds", "2", "--concurrency", "2"]


def bench(tmp_path: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "uembed", "bench", *options, "--out", str(tmp_path / "bench.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip


def check_side_by_side(figures: dict, labels: list[str], rounds: int) -> None:
    """Every bundle's bytes, memory and per-round figures are there, and the compared figures are the rounds'."""
    assert list(figures["bundles"]) == labels and list(figures["compared"]) == labels
    for label in labels:
        bundle = figures["bundles"][label]
        assert 0 < bundle["row_file_bytes"] <= bundle["table_files_bytes"] < bundle["bundle_bytes"]
        assert bundle["start_up"]["ready_s"] >= bundle["start_up"]["live_s"] > 0
        assert abs(sum(bundle["tier_hit_rates"].values()) - 1) < 1e-3
        (worker,) = bundle["memory_per_worker"]
        assert 0 < worker["private_bytes"] <= worker["rss_bytes"] and 0 < worker["pss_bytes"] <= worker["rss_bytes"]
    assert len(figures["rounds"]) == rounds
    first = labels[0]
    for round_figures in figures["rounds"]:
        assert list(round_figures) == labels
        for figure in round_figures.values():
            assert figure["requests"] > 0 and figure["failures"] == 0 and figure["cpu_ms_per_request"] > 0
            assert figure["p99_ms"] >= figure["p50_ms"] > 0
    for label in labels:
        compared = figures["compared"][label]
        for field in ("requests_per_s", "cpu_ms_per_request"):
            ratios = [r[label][field] / r[first][field] for r in figures["rounds"]]
            assert compared[f"{field}_ratio"] == pytest.approx(statistics.median(ratios), abs=1e-4)
            assert compared[field] == pytest.approx(statistics.median(r[label][field] for r in figures["rounds"]), abs=1e-3)
    assert figures["compared"][first]["requests_per_s_ratio"] == 1.0


@pytest.mark.slow
def test_the_codecs_phase_serves_one_run_in_each_codec_side_by_side(bundle_store, tmp_path):
    run = bench(tmp_path, "--phases", "codecs", "--codecs", "float16", "int4", "--train-run", str(bundle_store.parent / "run"),
                "--codec-hot-rows-mb", "0", *QUICK)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    figures = json.loads((tmp_path / "bench.json").read_text())["codecs_demo"]
    check_side_by_side(figures, ["float16", "int4"], rounds=2)
    assert figures["hot_rows_bytes"] == "0"
    assert all(b["tier_hit_rates"]["file"] == 1.0 for b in figures["bundles"].values())  # tier 1 off: all decoded
    float16, int4 = figures["bundles"]["float16"], figures["bundles"]["int4"]
    (table,) = json.loads((Path(int4["path"]) / "manifest.json").read_text())["tables"]
    rows, dim = table["rows"], table["dim"]
    assert float16["table_rows"] == int4["table_rows"] == rows
    # a .npy header and 2 bytes a value (float16), half a byte (int4 codes; the scale and bias in their own file)
    assert float16["row_file_bytes"] - rows * dim * 2 == pytest.approx(int4["row_file_bytes"] - rows * dim // 2, abs=64)
    assert int4["table_files_bytes"] - int4["row_file_bytes"] >= rows * 8
    goal = figures["goal"]
    assert goal["value"] == figures["compared"]["int4"]["requests_per_s_ratio"]
    assert goal["met"] == (goal["value"] >= 0.9)


def test_the_codecs_phase_writes_the_scale_bundle_in_each_codec_and_serves_them(tmp_path):
    scale = tmp_path / "scale"
    run = bench(tmp_path, "--phases", "codecs", "--codec-models", "scale", "--codecs", "float16", "int2", "--scale-rows", "5000",
                "--scale-dir", str(scale), "--examples", "8", *QUICK)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    figures = json.loads((tmp_path / "bench.json").read_text())["codecs_scale"]
    check_side_by_side(figures, ["float16", "int2"], rounds=2)
    for codec in ("float16", "int2"):
        bundle = figures["bundles"][codec]
        assert bundle["path"] == str(scale / f"criteo-scale-{codec}" / "1") and bundle["table_rows"] == 5000
        assert bundle["row_file_bytes"] == (scale / f"criteo-scale-{codec}" / "1" / "tables" / "unified.npy").stat().st_size
    assert figures["bundles"]["int2"]["row_file_bytes"] < figures["bundles"]["float16"]["row_file_bytes"] / 4
    # the same seed: the same float32 rows before encoding, so the codecs' decoded test rows agree within int2's step
    decoded = {}
    for codec in ("float16", "int2"):
        table = json.loads((scale / f"criteo-scale-{codec}" / "1" / "manifest.json").read_text())["tables"][0]
        decoded[codec] = np.array([row["values"] for row in table["test_rows"]])
    step = (decoded["float16"].max(axis=1) - decoded["float16"].min(axis=1)) / 3
    assert np.all(np.abs(decoded["int2"] - decoded["float16"]) <= step[:, None] / 2 + 1e-3)


def test_a_scale_bundle_already_written_is_reused_and_one_of_other_rows_refused(tmp_path):
    path = scale_codec_bundle(tmp_path, 1000, "int4")
    written = (path / "tables" / "unified.npy").stat().st_mtime_ns
    assert scale_codec_bundle(tmp_path, 1000, "int4") == path
    assert (path / "tables" / "unified.npy").stat().st_mtime_ns == written
    with pytest.raises(UembedError, match="--scale-dir: .* holds 1000 int4 rows, not 2000 int4"):
        scale_codec_bundle(tmp_path, 2000, "int4")


@pytest.mark.parametrize(("options", "message"), [
    (["--phases", "codecs", "--codecs", "int4", "int4"], "--codecs: name at least two codecs"),
    (["--phases", "codecs", "--rounds", "0"], "--rounds: at least 1"),
    (["--phases", "hybrid", "--bench-epochs", "0"], "--bench-epochs: at least 1"),
    (["--phases", "codecs", "--train-run", "/nonexistent"], "--train-run: /nonexistent is not a training run"),
    (["--phases", "hybrid", "--head-share", "1"], "--head-share: the hybrid run's share"),
])  # fmt: skip
def test_bad_options_are_refused_naming_the_option(options, message):
    args = build_parser().parse_args(["bench", *options])
    with pytest.raises(UembedError, match=message):
        check_args(args)
    check_args(build_parser().parse_args(["bench", "--phases", "service", *options[2:]]))  # other phases ignore them


def test_the_cli_refuses_bad_options_before_any_phase_runs(tmp_path):
    run = bench(tmp_path, "--phases", "service", "codecs", "--codecs", "int4", "--bundle-store", str(tmp_path / "store"))
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "--codecs: name at least two codecs to compare, got int4" in run.stderr
    assert not (tmp_path / "bench.json").exists() and not (tmp_path / "store").exists()


@pytest.mark.slow
def test_the_hybrid_phase_serves_a_hybrid_run_beside_a_plain_one_of_the_same_rows(tmp_path):
    run = bench(tmp_path, "--phases", "hybrid", "--bench-epochs", "1", "--head-share", "0.3", *QUICK)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    figures = json.loads((tmp_path / "bench.json").read_text())["hybrid"]
    check_side_by_side(figures, ["plain", "hybrid"], rounds=2)
    plain, hybrid = figures["bundles"]["plain"], figures["bundles"]["hybrid"]
    assert plain["table_rows"] == hybrid["table_rows"] == figures["table_rows"]
    assert plain["row_file_bytes"] == hybrid["row_file_bytes"]
    assert figures["head_rows"] == int(0.3 * figures["table_rows"])
    hybrid_manifest = json.loads((Path(hybrid["path"]) / "manifest.json").read_text())
    assert sum(f["head"]["size"] for f in hybrid_manifest["features"] if f.get("head")) == figures["head_rows"]
    goal = figures["goal"]
    assert goal["value"] == figures["compared"]["hybrid"]["cpu_ms_per_request_ratio"]
    assert goal["met"] == (goal["value"] <= 1.05)
