"""Training's first words are about the data (splits, positive rate, each feature's kind, distinct values and missing
share) and its last about why it stopped, read from the command's output for a small CSV, in memory and streamed."""

import json
import re
import subprocess
import sys

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from uembed.model.summary import stop_reason

ROWS = 400


def uembed(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "uembed", *args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture
def clicks(tmp_path):
    """user (40 ids, every 10th missing), hour (24 numbers, undeclared: categorical), price (numeric), tags (a|b)."""
    table = pa.table({
        "user": ["" if i % 10 == 0 else f"u{i % 40}" for i in range(ROWS)],
        "hour": [str(i % 24) for i in range(ROWS)],
        "price": [str(1 + i % 50) for i in range(ROWS)],
        "tags": [["a|b", "b", "c|a", ""][i % 4] for i in range(ROWS)],
        "clicked": [int((i * 7) % 10 < 3) for i in range(ROWS)],
    })  # fmt: skip
    pacsv.write_csv(table, tmp_path / "clicks.csv")
    (tmp_path / "spec.toml").write_text(
        "label = 'clicked'\n[[features]]\nname = 'user'\nmissing = ['']\n[[features]]\nname = 'hour'\n"
        "[[features]]\nname = 'price'\nkind = 'numeric'\nboundaries = [10, 20, 30]\n"
        "[[features]]\nname = 'tags'\nkind = 'multivalent'\nseparator = '|'\n"
    )
    return tmp_path


def summary_rows(out: str) -> dict[str, list[str]]:
    """feature -> [kind, distinct, missing] from the summary's table."""
    rows = {}
    for line in out.splitlines():
        match = re.match(r"^  (user|hour|price|tags)\s+(.+?)\s+([\d,]+)\s+(\S+)$", line)
        if match:
            rows[match[1]] = [match[2], match[3], match[4]]
    return rows


@pytest.mark.parametrize("stream", [False, True])
def test_training_first_summarises_the_data(clicks, stream):
    result = uembed("train", "--dataset", "clicks.csv", "--spec", "spec.toml", "--epochs", "1", "--quiet", "--name", "r",
                    "--runs-dir", "runs", *(["--stream"] if stream else []), cwd=clicks)  # fmt: skip
    assert result.returncode == 0, result.stderr
    config = json.loads((clicks / "runs" / "r" / "config.json").read_text())
    head = result.stdout.splitlines()[0]
    if stream:
        split = json.loads((clicks / "runs" / "r" / "stats" / "stats.json").read_text())["examples"]
        split = {"train": split["train"], "validation": split["validation"], "test": split["test"]}
    else:
        split = config["split"]
    assert head.startswith(f"data clicks.csv: {ROWS} examples ({split['train']} training, {split['validation']} validation, "
                           f"{split['test']} test); positive rate 30.0% (training ")  # fmt: skip
    rows = summary_rows(result.stdout)
    assert rows["hour"][0] == "categorical (all numbers, each its own value)" and rows["hour"][1] == "24"
    assert rows["user"][0] == "categorical" and rows["user"][1] == "36"  # the ids 0, 10, 20, 30 are the missing rows
    assert rows["price"][0] == "numeric, 4 buckets (boundaries)" and rows["price"][1] == "4"
    assert rows["tags"][0] == "multivalent, '|'-separated, mean pooled" and rows["tags"][1] == "3"
    missing = {name: float(row[2].rstrip("%")) for name, row in rows.items()}
    assert 5 < missing["user"] < 15 and 15 < missing["tags"] < 35 and missing["hour"] == missing["price"] == 0
    assert "stopped: the only epoch run (--epochs 1); kept epoch 1" in result.stdout


def test_training_says_it_stopped_early_with_the_epoch_and_the_metric(clicks):
    result = uembed("train", "--dataset", "clicks.csv", "--spec", "spec.toml", "--epochs", "40", "--patience", "1",
                    "--quiet", "--name", "r", "--runs-dir", "runs", cwd=clicks)  # fmt: skip
    assert result.returncode == 0, result.stderr
    metrics = json.loads((clicks / "runs" / "r" / "metrics.json").read_text())
    assert metrics["epochs_run"] < 40
    assert (f"stopped: early stopping after epoch {metrics['epochs_run']}: validation AUC did not beat epoch "
            f"{metrics['best_epoch']}'s {metrics['best_val_auc']:.4f} for 1 epochs (--patience 1)") in result.stdout


def test_the_stop_reason_names_the_option_that_ended_training():
    assert stop_reason(20, 20, 18, 0.75, 2).startswith("all 20 epochs run (--epochs 20); kept epoch 18")
    assert stop_reason(6, 20, 4, 0.75, 2).startswith("early stopping after epoch 6: validation AUC did not beat epoch 4's 0.7500")
