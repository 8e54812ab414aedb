import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from uembed.cli.model_commands import model_name


def uembed(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "uembed", *args], capture_output=True, text=True, cwd=cwd)


def test_bare_uembed_prints_the_commands_in_the_order_a_user_needs_them():
    result = uembed()
    assert result.returncode == 0 and not result.stderr
    steps = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("  uembed ")]
    assert steps[:4] == ["serve", "train", "export", "serve"]
    parser_commands = {"serve", "train", "export", "bench", "loadtest", "stack"}
    assert parser_commands <= set(result.stdout.replace("|", " ").split())


def test_help_explains_the_commands():
    result = uembed("train", "--help")
    assert result.returncode == 0
    for option in ("--dataset", "--embedding", "--budget", "--budget-rows", "--spec", "--seed"):
        assert option in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dataset", "missing.csv", "--spec", "spec.toml"], "data file missing.csv does not exist"),
        (["--dataset", "data.csv"], "--spec is required"),
        (["--dataset", "data.csv", "--spec", "spec.toml", "--budget-rows", "1"], "smaller than the 2 features"),
        (["--dataset", "synthetic:huge"], "unknown synthetic preset 'huge'"),
    ],
)
def test_bad_input_is_one_line_not_a_traceback(tmp_path, args, message):
    pacsv.write_csv(pa.table({"a": ["x", "y"] * 5, "b": ["1", "2"] * 5, "y": [0, 1] * 5}), tmp_path / "data.csv")
    (tmp_path / "spec.toml").write_text("label = 'y'\n[[features]]\nname = 'a'\n[[features]]\nname = 'b'\n")
    result = uembed("train", *args, "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert message in result.stderr


def test_a_budget_given_to_collisionless_is_a_warning_and_the_run_says_what_was_trained(tmp_path):
    pacsv.write_csv(pa.table({"a": [f"v{i % 20}" for i in range(200)], "y": [i % 2 for i in range(200)]}), tmp_path / "data.csv")
    (tmp_path / "spec.toml").write_text("label = 'y'\n[[features]]\nname = 'a'\n")
    common = ("--dataset", "data.csv", "--spec", "spec.toml", "--epochs", "1", "--quiet", "--runs-dir", "runs")
    full = uembed("train", *common, "--embedding", "collisionless", "--budget", "0.1", cwd=tmp_path)
    assert full.returncode == 0, full.stderr
    assert "warning: --embedding collisionless keeps one row per training value" in full.stderr
    hashed = uembed("train", *common, "--embedding", "hashing-trick", cwd=tmp_path)  # the default budget, no warning
    assert hashed.returncode == 0 and "warning" not in hashed.stderr, hashed.stderr
    names = sorted(path.name for path in (tmp_path / "runs").iterdir())
    assert [name.split("-s0-")[0] for name in names] == ["data.csv-collisionless-full", "data.csv-hashing-trick-b0.1"], names


def collision_lines(stdout: str) -> list[str]:
    """The collision table a command printed: its header and one line per feature."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("collisions (")) + 1
    return lines[start : start + 3]


def test_train_on_a_user_file_from_the_cli(tmp_path):
    rows = 400
    table = pa.table({"a": [f"v{i % 40}" for i in range(rows)], "b": [str(i % 7) for i in range(rows)], "y": [int(i % 40 < 20) for i in range(rows)]})
    pacsv.write_csv(table, tmp_path / "data.csv")
    (tmp_path / "spec.toml").write_text("label = 'y'\n[[features]]\nname = 'a'\n[[features]]\nname = 'b'\n")
    result = uembed(
        "train", "--dataset", "data.csv", "--spec", "spec.toml", "--embedding", "hashing-trick",
        "--budget", "0.5", "--epochs", "2", "--quiet", "--name", "r", "--runs-dir", "runs", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "test AUC" in result.stdout and (tmp_path / "runs" / "r" / "checkpoint.pt").is_file()
    report = json.loads((tmp_path / "runs" / "r" / "collisions.json").read_text())
    train_examples = json.loads((tmp_path / "runs" / "r" / "config.json").read_text())["split"]["train"]
    assert report["features"]["b"]["values"] == 7 and report["features"]["b"]["occurrences"] == train_examples
    table = collision_lines(result.stdout)
    assert table[0].split() == ["feature", "values", "rows", "shared", "uniform", "hash"]
    for line in table[1:]:
        entry = report["features"][line.split()[0]]
        assert line.split()[1:] == [f"{entry['values']:,}", f"{entry['rows']:,}", f"{entry['shared_share']:.1%}", f"{entry['predicted_share']:.1%}"]
    exported = uembed("export", "runs/r", "--out", "bundles", "--name", "clicks", "--dtype", "int8", "--evaluate", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert "bundle bundles/clicks/1: int8 rows" in exported.stdout and "bundle test AUC" in exported.stdout
    assert collision_lines(exported.stdout) == table  # the export summary repeats the trainer's table
    assert json.loads((tmp_path / "bundles" / "clicks" / "1" / "manifest.json").read_text())["collisions"] == report
    again = uembed("export", "runs/r", "--out", "bundles", "--name", "clicks", "--version", "1", cwd=tmp_path)
    assert again.returncode == 2 and again.stderr.startswith("error: bundle bundles/clicks/1 already exists")
    unnamed = uembed("export", "runs/r", "--out", "bundles", cwd=tmp_path)  # the model is named for data.csv
    assert unnamed.returncode == 0 and "bundle bundles/data/1:" in unnamed.stdout, unnamed.stdout + unnamed.stderr


@pytest.mark.parametrize(
    ("dataset", "model"),
    [("clicks.csv", "clicks"), ("Clicks.TSV", "Clicks"), ("train.txt.gz", "train"), ("part.parquet.brotli", "part"),
     ("criteo-synth", "criteo-synth"), ("movielens100k", "movielens100k"), (".csv", ".csv")],
)  # fmt: skip
def test_a_model_is_named_for_its_data_set_without_the_file_extension(dataset, model):
    assert model_name(dataset) == model


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--bundle", "no-such-bundle"], {}, "no-such-bundle is not a bundle: no such directory"),
        ([], {"UEMBED_MAX_WAIT_MS": "-1"}, "UEMBED_MAX_WAIT_MS"),
        ([], {"UEMBED_BUSY_POLL_MS": "-1"}, "UEMBED_BUSY_POLL_MS"),
        ([], {"UEMBED_RELOAD_TOKEN": "short"}, "reload_token must be at least 16 characters"),
    ],
)
def test_serve_refuses_bad_bundles_and_settings_in_one_line(tmp_path, monkeypatch, args, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = uembed("serve", "--port", "1", *args, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert message in result.stderr.strip().splitlines()[-1]


def test_serve_help_lists_every_setting():
    from uembed.serving.settings import ServiceSettings

    result = uembed("serve", "--help")
    assert result.returncode == 0
    for name in ServiceSettings.model_fields:
        assert f"UEMBED_{name.upper()}" in result.stdout


def test_search_then_applier_then_export_from_the_cli(tmp_path):
    import json

    rows = 600
    table = pa.table({
        "a": [f"v{i % 40}" for i in range(rows)], "b": [str(i % 7) for i in range(rows)],
        "c": [f"n{(i * 7919) % 13}" for i in range(rows)], "y": [int(i % 40 < 20) for i in range(rows)],
    })  # fmt: skip
    pacsv.write_csv(table, tmp_path / "data.csv")
    (tmp_path / "spec.toml").write_text("label = 'y'\n" + "".join(f"[[features]]\nname = '{n}'\n" for n in "abc"))
    common = ("--dataset", "data.csv", "--spec", "spec.toml", "--budget", "0.5", "--epochs", "2", "--quiet",
              "--runs-dir", "runs", "--dim", "8", "--chunk-dim", "4", "--network", "mlp", "--hidden", "8")  # fmt: skip
    searched = uembed("search", *common, "--name", "s", "--policy-out", "policy.json", cwd=tmp_path)
    assert searched.returncode == 0, searched.stderr
    policy = json.loads((tmp_path / "policy.json").read_text())
    assert set(policy["features"]) == {"a", "b", "c"} and policy["pool_chunks"] == 4
    assert "policy file: policy.json" in searched.stdout
    assert "next: uembed train --dataset data.csv --spec spec.toml --embedding seo-applier --policy policy.json" in searched.stdout

    applier = uembed("train", *common, "--embedding", "seo-applier", "--applier", "rr", "--policy", "policy.json", "--name", "a", cwd=tmp_path)
    assert applier.returncode == 0, applier.stderr
    assert applier.stdout.splitlines()[-1] == "next: uembed export runs/a"
    exported = uembed("export", "runs/a", "--out", "bundles", "--name", "clicks", "--evaluate", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    manifest = json.loads((tmp_path / "bundles" / "clicks" / "1" / "manifest.json").read_text())
    assert manifest["policy"]["features"] == policy["features"] and manifest["embedding"]["method"] == "seo-applier-rr"

    refused = uembed("export", "runs/s", "--out", "bundles", cwd=tmp_path)
    assert refused.returncode == 2 and "SEO search run" in refused.stderr
    missing = uembed("train", *common, "--embedding", "seo-applier", "--name", "m", cwd=tmp_path)
    assert missing.returncode == 2 and "needs a policy" in missing.stderr


@pytest.mark.parametrize(("text", "value"), [("50M", 50_000_000), ("2.5M", 2_500_000), ("10k", 10_000), ("1_000", 1000)])
def test_counts_take_suffixes(text, value):
    from uembed.cli.model_commands import count

    assert count(text) == value


@pytest.mark.parametrize("text", ["0", "-5", "1.5", "ten", "2.5x"])
def test_bad_counts_are_refused(text):
    import argparse

    from uembed.cli.model_commands import count

    with pytest.raises(argparse.ArgumentTypeError, match="count"):
        count(text)


def test_data_synth_writes_shards_a_spec_and_its_settings(tmp_path):
    import json

    result = uembed("data", "synth", "--preset", "criteo-tiny", "--examples", "3k", "--out", "d", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "wrote 3,000 examples" in result.stdout and result.stdout.splitlines()[-1] == "next: uembed train --dataset d"
    info = json.loads((tmp_path / "d" / "dataset.json").read_text())
    assert info["examples"] == 3000 and len(info["shape"]["vocabulary"]) == 26
    assert (tmp_path / "d" / "part-00000.parquet").is_file() and "quantiles:16" in (tmp_path / "d" / "spec.toml").read_text()
    again = uembed("data", "synth", "--preset", "criteo-tiny", "--examples", "3k", "--out", "d", "--quiet", cwd=tmp_path)
    assert again.returncode == 2 and "already holds generated data" in again.stderr
