"""`uembed plan` and `uembed train --plan` on a tiny data file (issue #38, item 3)."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from uembed.bundle.loader import load_bundle
from uembed.cli import main
from uembed.cli.plan_command import parse_size

# Small levers and short runs: each plan calibrates in seconds.
LEVERS = ("--methods", "unified,hashing-trick", "--dims", "4,8", "--fractions", "0.05,0.3", "--codecs", "float32,int8,int4",
          "--epochs", "3", "--lr", "0.01", "--hidden", "16", "--quiet")  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Users and items each with a logit of its own: hashing them together costs AUC."""
    folder = tmp_path_factory.mktemp("plan")
    rng = np.random.default_rng(0)
    user_effect, item_effect = rng.normal(0, 1.5, 200), rng.normal(0, 1.5, 100)
    users, items = rng.integers(0, 200, 3000), rng.integers(0, 100, 3000)
    label = (rng.random(3000) < 1 / (1 + np.exp(-(user_effect[users] + item_effect[items])))).astype(int)
    table = pa.table({"user": [f"u{u}" for u in users], "item": [f"i{i}" for i in items], "y": label.tolist()})
    pacsv.write_csv(table, folder / "data.csv")
    (folder / "spec.toml").write_text("label = 'y'\n[[features]]\nname = 'user'\n[[features]]\nname = 'item'\n")
    return folder


def plan(data, *target, out="plan.json", levers=LEVERS):
    return main(["plan", "--dataset", str(data / "data.csv"), "--spec", str(data / "spec.toml"), *target, *levers, "--out", str(data / out)])


def feasible_candidates(doc):
    return [c for c in doc["candidates"] if c["meets_target"]]


def test_a_byte_budget_gets_the_best_predicted_plan_within_it_and_train_plan_trains_exactly_that(data, capsys):
    assert plan(data, "--bytes", "1KiB") == 0
    out = capsys.readouterr().out
    doc = json.loads((data / "plan.json").read_text())
    assert doc["predicted"]["bytes"] <= 1024 and doc["target"] == {"bytes": 1024}
    best = max(feasible_candidates(doc), key=lambda c: c["predicted_auc"])
    assert doc["predicted"]["auc"] == pytest.approx(best["predicted_auc"])
    assert all(c["bytes"] <= 1024 for c in feasible_candidates(doc)) and "why: the highest predicted AUC" in out
    assert doc["calibration"]["points"] and doc["calibration"]["reference"]["method"] == "collisionless"

    runs = data / "runs"
    assert main(["train", "--plan", str(data / "plan.json"), "--quiet", "--epochs", "2", "--name", "planned", "--runs-dir", str(runs)]) == 0
    out = capsys.readouterr().out
    config = json.loads((runs / "planned" / "config.json").read_text())["train"]
    assert (config["embedding"], config["dim"], config["hidden"]) == (doc["train"]["embedding"], doc["train"]["dim"], [16])
    assert config["budget_rows"] == doc["train"]["budget_rows"] and config["learning_rate"] == 0.01
    measured = json.loads((runs / "planned" / "metrics.json").read_text())["memory_plan"]
    assert measured["predicted_auc"] == doc["predicted"]["auc"] and measured["codec"] == doc["codec"]
    assert 0 <= measured["measured_val_auc"] <= 1 and 0 <= measured["measured_test_auc"] <= 1
    assert measured["served_bytes"] == doc["predicted"]["bytes"]
    assert f"predicted AUC {doc['predicted']['auc']:.4f}, measured validation AUC" in out

    assert main(["export", str(runs / "planned"), "--out", str(data / "bundles"), "--name", "planned"]) == 0
    bundle = load_bundle(data / "bundles" / "planned" / "1")
    assert {t["dtype"] for t in bundle.manifest["tables"]} == {doc["codec"]}  # the export's default: the plan's codec
    assert sum(t.nbytes for t in bundle.tables.values()) == doc["predicted"]["bytes"]


def test_an_auc_loss_gets_the_cheapest_plan_predicted_to_meet_it(data, capsys):
    assert plan(data, "--max-auc-loss", "0.05", out="loss.json") == 0
    doc = json.loads((data / "loss.json").read_text())
    meeting = [c for c in doc["candidates"] if c["predicted_auc_loss"] <= 0.05]
    assert meeting == feasible_candidates(doc)
    assert doc["predicted"]["bytes"] == min(c["bytes"] for c in meeting) and doc["predicted"]["auc_loss"] <= 0.05
    assert "why: the fewest bytes" in capsys.readouterr().out


def test_an_impossible_target_exits_non_zero_naming_the_closest_plans(data, capsys):
    levers = ("--methods", "unified", "--dims", "4", "--fractions", "0.02,0.05", "--codecs", "float32", "--epochs", "3", "--lr", "0.01", "--quiet")
    assert plan(data, "--max-auc-loss", "0", out="none.json", levers=levers) == 1
    captured = capsys.readouterr()
    assert "no plan meets the target (within 0 AUC of collisionless float32); the closest: unified dim 4 float32" in captured.err
    assert "Collisionless float32, the reference, takes" in captured.err and not (data / "none.json").exists()


def test_a_time_budget_stops_calibration_and_plans_with_what_it_has(data, capsys):
    assert plan(data, "--bytes", "1MB", "--time-budget", "0.001", out="quick.json") == 0
    doc = json.loads((data / "quick.json").read_text())
    assert doc["calibration"]["points"] == [] and doc["calibration"]["stopped"].startswith("time budget of 0.001s (0 of 8 runs)")
    assert doc["train"]["embedding"] == "collisionless"  # 1 MB holds the reference in any codec
    # No codec is predicted above float32: the cheapest of those that lose nothing measured.
    assert doc["predicted"]["auc"] == doc["calibration"]["reference"]["auc"]["float32"]


def test_a_target_missed_because_the_time_budget_cut_calibration_says_so(data, capsys):
    # 1 KiB holds no collisionless plan, and the time budget ends calibration before any hashed run that could fit.
    assert plan(data, "--bytes", "1KiB", "--time-budget", "0.001", out="cut.json") == 1
    err = capsys.readouterr().err
    assert "no plan meets the target (within 1,024 bytes)" in err and "the time budget left 8 of the planned runs out" in err
    assert "a larger --time-budget may find one" in err and not (data / "cut.json").exists()
    # A target missed with every run calibrated does not blame the time budget.
    levers = ("--methods", "unified", "--dims", "4", "--fractions", "0.02,0.05", "--codecs", "float32", "--epochs", "3", "--lr", "0.01", "--quiet")
    assert plan(data, "--max-auc-loss", "0", out="none.json", levers=levers) == 1
    assert "--time-budget" not in capsys.readouterr().err


def test_a_fraction_below_a_familys_fewest_rows_calibrates_at_them_once(data):
    # Of 300 values, 0.001 and 0.002 are under one row: both calibrate unified at its minimum (a row per feature),
    # once; a fraction's point sits at the full training split's rows, as the candidates are weighed.
    levers = ("--methods", "unified", "--dims", "4", "--fractions", "0.001,0.002,0.3", "--codecs", "float32", "--epochs", "2",
              "--lr", "0.01", "--quiet")  # fmt: skip
    assert plan(data, "--bytes", "4KiB", out="few.json", levers=levers) == 0
    doc = json.loads((data / "few.json").read_text())
    points = sorted(doc["calibration"]["points"], key=lambda p: p["rows"])
    assert [p["rows"] for p in points][0] == 2 and len(points) == 2
    collisionless = points[1]["rows"] / points[1]["fraction"]
    assert points[1]["rows"] == round(0.3 * collisionless) and points[0]["fraction"] == pytest.approx(2 / collisionless)


def test_another_target_reuses_a_plan_files_calibration_and_refuses_one_of_other_levers(data, capsys):
    levers = ("--methods", "unified", "--dims", "4", "--fractions", "0.05,0.3", "--codecs", "float32,int8", "--epochs", "2",
              "--lr", "0.01", "--quiet")  # fmt: skip
    assert plan(data, "--bytes", "2KiB", out="first.json", levers=levers) == 0
    first = json.loads((data / "first.json").read_text())
    # A time budget that would leave out every run: the runs come from the file, none is trained.
    again = (*levers, "--calibration", str(data / "first.json"), "--time-budget", "0.001")
    assert plan(data, "--max-auc-loss", "0.2", out="second.json", levers=again) == 0
    second = json.loads((data / "second.json").read_text())
    assert second["calibration"]["points"] == first["calibration"]["points"] and len(first["calibration"]["points"]) == 2
    assert second["calibration"]["reference"] == first["calibration"]["reference"]
    assert second["calibration"]["stopped"].startswith(f"reused from {data / 'first.json'}") and second["target"] == {"max_auc_loss": 0.2}
    capsys.readouterr()
    other = tuple("8" if value == "4" else value for value in again)
    assert plan(data, "--bytes", "2KiB", out="third.json", levers=other) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --calibration {data / 'first.json'}: its runs had dims = [4], this command [8]")
    assert not (data / "third.json").exists()


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (("--bytes", "10"), "error: --bytes 10 is below the smallest table considered: "),
        (("--max-auc-loss", "-0.01"), "error: --max-auc-loss must be 0 or more, got -0.01"),
        ((), "error: give exactly one target: --bytes SIZE or --max-auc-loss DELTA"),
        (("--bytes", "1MB", "--max-auc-loss", "0.01"), "error: give exactly one target"),
        (("--bytes", "2XB"), "error: --bytes: expected a size such as 2GB, 50MB, 512KiB or 1000, got '2XB'"),
    ],
)
def test_bad_targets_are_one_line_errors(data, capsys, target, message):
    assert plan(data, *target, out="bad.json") == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and len(err.strip().splitlines()) == 1 and not (data / "bad.json").exists()


def test_train_refuses_an_option_the_plan_sets_too_naming_both(data, capsys):
    doc = {"format": "uembed-memory-plan", "train": {"dataset": str(data / "data.csv"), "spec": str(data / "spec.toml"), "dim": 8,
                                                     "embedding": "unified", "budget_rows": 20}, "codec": "int8"}  # fmt: skip
    (data / "edited.json").write_text(json.dumps(doc))
    for option, named in ((["--dim", "16"], "--dim is given and the plan"), (["--budget", "0.5"], "--budget is given and the plan")):
        assert main(["train", "--plan", str(data / "edited.json"), *option, "--runs-dir", str(data / "refused")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {named} {data / 'edited.json'} sets ") and "leave out" in err
    assert not (data / "refused").exists()


@pytest.mark.parametrize(("text", "size"), [("2GB", 2 * 10**9), ("50MB", 50 * 10**6), ("512KiB", 512 * 1024), ("1000", 1000),
                                            ("1.5 GiB", 3 * 2**29), ("7b", 7)])  # fmt: skip
def test_sizes_take_decimal_and_binary_units(text, size):
    assert parse_size(text) == size
