"""Spec ergonomics from the command line: each error is one line, exit code 2, no traceback."""

import subprocess
import sys

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from uembed.contract.errors import DataError, SpecError
from uembed.contract.features import LabelSpec
from uembed.model.data.synthetic import CRITEO_PRESETS, CriteoShape, write_criteo_shards


def uembed(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "uembed", *args], capture_output=True, text=True, cwd=cwd)


def adult_like(tmp_path, rows=300):
    """An Adult-shaped file: a text label, '?' for unknown, a numeric column, a fold column."""
    table = pa.table({
        "workclass": [["Private", "?", "State-gov"][i % 3] for i in range(rows)],
        "education": [f"e{i % 7}" for i in range(rows)],
        "age": [str(17 + i % 60) if i % 11 else "?" for i in range(rows)],
        "fold": [["train", "train", "train", "validation", "test"][i % 5] for i in range(rows)],
        "income": [">50K" if (i % 7) < 3 else "<=50K" for i in range(rows)],
    })  # fmt: skip
    pacsv.write_csv(table, tmp_path / "adult.csv")


def expect_error(result, message):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, result.stderr


FEATURES = "[[features]]\nname='workclass'\nmissing=['?']\n[[features]]\nname='education'\n"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("label='income'\n" + FEATURES, "holds text ('>50K', '<=50K'...); declare which values are positive"),
        ("label=\"income == >50K\"\n" + FEATURES, "is not a literal; quote text"),
        ("[label]\ncolumn='income'\npositive=[1]\n" + FEATURES, "compares it with [1]"),
        ("label=\"income == 'nope'\"\n" + FEATURES, "one class only"),
        ("label=\"income == '>50K'\"\n[split]\nfractions=[0.9, 0.3]\n" + FEATURES, "split fractions must be"),
        ("label=\"income == '>50K'\"\n" + FEATURES + "[[features]]\nname='age'\nkind='numeric'\nboundaries='deciles'\n", "quantiles:N"),
        *(("label=\"income == '>50K'\"\n" + FEATURES + f"head_share={share}\n",
           f"feature 'education': head_share must be a number at least 0 and below 1, got {shown}")
          for share, shown in (("-0.1", "-0.1"), ("1", "1"), ("'lots'", "'lots'"))),
    ],
)
def test_spec_errors_are_one_line(tmp_path, spec, message):
    adult_like(tmp_path)
    (tmp_path / "spec.toml").write_text(spec)
    expect_error(uembed("train", "--dataset", "adult.csv", "--spec", "spec.toml", "--epochs", "1", "--quiet", cwd=tmp_path), message)


def test_a_spec_error_comes_before_torch_is_imported(tmp_path):
    """The data file is read and checked against its spec before the training code loads: torch made unimportable,
    the spec's error is still the one printed."""
    adult_like(tmp_path)
    (tmp_path / "spec.toml").write_text("label='income'\n" + FEATURES)
    # torch stays installed (the CLI looks for it) but any import of it fails
    without_torch = (
        "import importlib.abc, importlib.machinery, sys\n"
        "class Refuse(importlib.abc.MetaPathFinder, importlib.abc.Loader):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        return importlib.machinery.ModuleSpec(name, self) if name.split('.')[0] == 'torch' else None\n"
        "    def create_module(self, spec):\n"
        "        raise ImportError('torch imported before the data was checked')\n"
        "    def exec_module(self, module):\n"
        "        pass\n"
        "sys.meta_path.insert(0, Refuse())\n"
        "from uembed.cli import main\n"
        "sys.exit(main())\n"
    )
    result = subprocess.run([sys.executable, "-c", without_torch, "train", "--dataset", "adult.csv", "--spec", "spec.toml",
                             "--quiet"], capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    expect_error(result, "declare which values are positive")
    (tmp_path / "spec.toml").write_text("label=\"income == '>50K'\"\n" + FEATURES)
    fine = subprocess.run([sys.executable, "-c", without_torch, "train", "--dataset", "adult.csv", "--spec", "spec.toml",
                           "--quiet"], capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert fine.returncode != 0 and "torch imported before the data was checked" in fine.stderr  # then training, torch


def test_an_options_error_still_comes_before_the_data_files(tmp_path):
    """The data file is read early, but after the options are checked: a missing policy file is named, not the
    spec's error."""
    adult_like(tmp_path)
    (tmp_path / "spec.toml").write_text("label='income'\n" + FEATURES)
    result = uembed("train", "--dataset", "adult.csv", "--spec", "spec.toml", "--embedding", "seo-applier", "--policy",
                    "nope.json", "--quiet", cwd=tmp_path)  # fmt: skip
    expect_error(result, "nope.json")
    assert "positive" not in result.stderr


def test_label_rules_missing_markers_quantiles_and_split_column_train(tmp_path):
    adult_like(tmp_path)
    (tmp_path / "spec.toml").write_text(
        "label=\"income == '>50K'\"\n[split]\ncolumn='fold'\n" + FEATURES
        + "[[features]]\nname='age'\nkind='numeric'\nboundaries='quantiles:4'\nmissing=['?']\n"
    )  # fmt: skip
    result = uembed("train", "--dataset", "adult.csv", "--spec", "spec.toml", "--embedding", "unified", "--budget", "0.5",
                    "--epochs", "1", "--quiet", "--name", "r", "--runs-dir", "runs", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    import json

    doc = json.loads((tmp_path / "runs" / "r" / "config.json").read_text())
    assert doc["split"] == {"train": 180, "validation": 60, "test": 60}
    age = next(f for f in doc["dataset"]["spec"]["features"] if f["name"] == "age")
    assert age["quantiles"] == 4 and len(age["boundaries"]) == 3 and age["missing"] == ["?"]
    assert doc["dataset"]["spec"]["label"]["operator"] == "=="
    # '?' is the missing value, not a value of its own
    assert "?" not in doc["sample_values"]["workclass"]


def test_budget_error_gives_the_minimum_and_single_row_features_warn(tmp_path):
    adult_like(tmp_path)
    (tmp_path / "spec.toml").write_text("[label]\ncolumn='income'\npositive=['>50K']\n" + FEATURES)
    small = uembed("train", "--dataset", "adult.csv", "--spec", "spec.toml", "--budget-rows", "1", "--quiet", cwd=tmp_path)
    expect_error(small, "needs at least 2 rows (--budget-rows 2")
    one_row = uembed("train", "--dataset", "adult.csv", "--spec", "spec.toml", "--embedding", "separate", "--budget-rows", "2",
                     "--epochs", "1", "--quiet", "--runs-dir", "runs", cwd=tmp_path)  # fmt: skip
    assert one_row.returncode == 0, one_row.stderr
    assert "warning: feature 'workclass' gets a single row" in one_row.stderr and "embedding is a constant" in one_row.stderr
    multi = uembed("train", "--dataset", "adult.csv", "--spec", "spec.toml", "--embedding", "multi-size-unified",
                   "--budget-rows", "8", "--epochs", "1", "--quiet", "--runs-dir", "runs", cwd=tmp_path)  # fmt: skip
    assert multi.returncode == 0 and "identical to unified" in multi.stderr


def test_a_criteo_file_and_a_folder_of_shards_train_through_the_same_cli(tmp_path):
    shape = CriteoShape(vocabulary=CRITEO_PRESETS["criteo-tiny"], seed=1)
    write_criteo_shards(tmp_path / "shards", 20_000, shape, progress=False)
    write_criteo_shards(tmp_path / "text", 20_000, shape, text_format=True, progress=False)
    common = ["--embedding", "unified", "--budget", "0.2", "--dim", "4", "--network", "mlp", "--hidden", "8", "--epochs", "1",
              "--batch-size", "1024", "--shuffle-buffer", "8192", "--read-rows", "4096", "--quiet", "--runs-dir", "runs"]  # fmt: skip
    folder = uembed("train", "--dataset", "shards", "--name", "p", *common, cwd=tmp_path)
    text = uembed("train", "--dataset", "text/train.txt", "--name", "t", *common, cwd=tmp_path)
    for result in (folder, text):
        assert result.returncode == 0, result.stderr
        assert "test AUC" in result.stdout and "examples/s" in result.stdout
    # the same rows, read from Parquet or from the Criteo text format, train the same model
    auc = lambda out: out.split("test AUC ")[1].split()[0]  # noqa: E731
    assert auc(folder.stdout) == auc(text.stdout)
    exported = uembed("export", "runs/p", "--out", "bundles", "--name", "criteo", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr


def test_a_csv_file_streams_with_the_same_spec(tmp_path):
    adult_like(tmp_path, rows=2000)
    (tmp_path / "spec.toml").write_text("label=\"income == '>50K'\"\n[split]\ncolumn='fold'\n" + FEATURES)
    result = uembed("train", "--dataset", "adult.csv", "--spec", "spec.toml", "--stream", "--embedding", "unified",
                    "--budget", "0.5", "--epochs", "1", "--quiet", "--name", "s", "--runs-dir", "runs", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    import json

    stats = json.loads((tmp_path / "runs" / "s" / "stats" / "stats.json").read_text())
    assert stats["examples"] == {"train": 1200, "validation": 400, "test": 400}
    assert stats["vocabulary"]["workclass"] == 2  # '?' is missing, not a value


def yes_no_labels(rows=60):
    """A label column that mixes two spellings: yes/no and 1/0."""
    return pa.array([["yes", "no", "1", "0"][i % 4] for i in range(rows)])


def test_a_positive_list_that_leaves_values_unexplained_is_an_error_listing_them():
    with pytest.raises(DataError, match=r"holds '0', '1', 'no', values that are not positive .*negative = \['0', '1', 'no'\]"):
        LabelSpec(column="answer", positive=("yes",)).binarise(yes_no_labels(), "clicks.csv")
    with pytest.raises(DataError, match=r"holds '1', in neither positive nor negative"):
        LabelSpec(column="answer", positive=("yes",), negative=("no", "0")).binarise(yes_no_labels(), "clicks.csv")


def test_a_positive_list_with_one_other_value_or_the_negatives_listed_binarises():
    yes_no = pa.array(["yes", "no", "no", "yes"])
    assert LabelSpec(column="answer", positive=("yes",)).binarise(yes_no, "s").tolist() == [1, 0, 0, 1]
    listed = LabelSpec.from_dict({"column": "answer", "positive": ["yes", "1"], "negative": ["no", "0"]})
    assert listed.binarise(yes_no_labels(8), "s").tolist() == [1, 0, 1, 0] * 2
    assert LabelSpec.from_dict(listed.to_dict()) == listed  # the negatives travel with a run and a bundle
    both = LabelSpec.parse("answer in ['yes', '1']")  # `in` is a positive list: the other values are 'no' and '0'
    with pytest.raises(DataError, match="holds '0', 'no'"):
        both.binarise(yes_no_labels(), "s")


@pytest.mark.parametrize(
    ("raw", "message"),
    [({"column": "a", "negative": ["no"]}, "goes with positive"), ({"column": "a", "positive": ["x"], "negative": ["x"]}, "in both")],
)
def test_a_negative_list_needs_a_positive_one_and_no_overlap(raw, message):
    with pytest.raises(SpecError, match=message):
        LabelSpec.from_dict(raw)


def test_a_mixed_label_column_stops_training_from_the_cli(tmp_path):
    table = pa.table({"user": [f"u{i % 9}" for i in range(120)], "answer": yes_no_labels(120)})
    pacsv.write_csv(table, tmp_path / "clicks.csv")
    (tmp_path / "spec.toml").write_text("[label]\ncolumn='answer'\npositive=['yes']\n[[features]]\nname='user'\n")
    expect_error(uembed("train", "--dataset", "clicks.csv", "--spec", "spec.toml", "--quiet", cwd=tmp_path), "'0', '1', 'no'")
