import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from tests.conftest import tiny_spec, tiny_table
from uembed.contract.errors import DataError, SpecError
from uembed.contract.features import DatasetSpec, FeatureSpec, LabelSpec, load_spec
from uembed.model.data import encode_values, from_table, load_file, synthetic

SPEC_TOML = """
[label]
column = "rating"
threshold = 3

[[features]]
name = "user"

[[features]]
name = "genres"
kind = "multivalent"
separator = "|"

[[features]]
name = "age"
kind = "numeric"
boundaries = [18, 30]

[groups]
person = ["user", "age"]
"""


def write_csv(path, rows):
    pacsv.write_csv(pa.table(rows), path)
    return path


def test_spec_file_and_csv_with_separator_lists(tmp_path):
    (tmp_path / "spec.toml").write_text(SPEC_TOML)
    spec = load_spec(tmp_path / "spec.toml")
    assert spec.group_of("age") == "person" and spec.feature("genres").multivalent
    data = write_csv(
        tmp_path / "ratings.csv",
        {"user": ["007", "7", "007"], "genres": ["Drama|Comedy", "", "Drama"], "age": [17, None, 45], "rating": [5, 1, 3]},
    )
    dataset = load_file(data, spec)
    users = dataset.columns["user"]
    assert users.uniques[users.codes[0, 0]] == b"007" != users.uniques[users.codes[1, 0]]
    genres = dataset.columns["genres"]
    assert [[genres.uniques[c] for c in row if c >= 0] for row in genres.codes] == [[b"Drama", b"Comedy"], [b""], [b"Drama"]]
    ages = dataset.columns["age"]
    assert [ages.uniques[c] for c in ages.codes[:, 0]] == [b"0", b"", b"2"]
    assert dataset.labels.tolist() == [1.0, 0.0, 1.0]


def test_parquet_with_list_column(tmp_path):
    pq.write_table(tiny_table(50), tmp_path / "tiny.parquet")
    dataset = load_file(tmp_path / "tiny.parquet", tiny_spec())
    assert len(dataset) == 50 and dataset.columns["tags"].codes.shape[1] == 3


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not toml [", "not valid TOML"),
        ("[[features]]\nname='a'\n", r"\[label\] needs a column"),
        ("label='y'\n[[features]]\nname='a'\nkind='weird'\n", "kind must be one of"),
        ("label='y'\n[[features]]\nname='a'\ncolour='red'\n", "unknown key"),
        ("label='y'\n[[features]]\nname='a'\n[[features]]\nname='a'\n", "repeated: a"),
        ("label='y'\n[[features]]\nname='a'\n[groups]\ng=['b']\n", "unknown feature 'b'"),
        ("label='y'\n[[features]]\nname='x'\nkind='numeric'\n", "needs bucket boundaries"),
        ("label='y'\n", "declares no features"),
    ],
)
def test_bad_spec_files_name_the_problem(tmp_path, text, message):
    (tmp_path / "spec.toml").write_text(text)
    with pytest.raises(SpecError, match=message):
        load_spec(tmp_path / "spec.toml")


def test_missing_spec_file(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "nope.toml")


def test_bad_data_names_the_problem(tmp_path):
    spec = DatasetSpec(features=(FeatureSpec("user"),), label=LabelSpec("rating"))
    with pytest.raises(DataError, match="unknown column"):
        load_file(write_csv(tmp_path / "a.csv", {"who": ["a", "b"], "rating": [0, 1]}), spec)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="is empty"):
        load_file(tmp_path / "empty.csv", spec)
    (tmp_path / "header.csv").write_text("user,rating\n")
    with pytest.raises(DataError, match="no rows"):
        load_file(tmp_path / "header.csv", spec)
    with pytest.raises(DataError, match="not binary"):
        load_file(write_csv(tmp_path / "b.csv", {"user": ["a", "b"], "rating": [1, 5]}), spec)
    with pytest.raises(DataError, match="one class only"):
        load_file(write_csv(tmp_path / "c.csv", {"user": ["a", "b"], "rating": [1, 1]}), spec)
    with pytest.raises(DataError, match="unknown format"):
        (tmp_path / "d.xlsx").write_text("x")
        load_file(tmp_path / "d.xlsx", spec)


def test_encode_values_dedupes_and_pads():
    column = encode_values(FeatureSpec("tags", kind="multivalent"), [["a", "b"], [], None, ["b"]])
    assert column.uniques == [b"", b"a", b"b"]
    assert column.codes.tolist() == [[1, 2], [0, -1], [0, -1], [2, -1]]
    with pytest.raises(TypeError, match="takes one value"):
        encode_values(FeatureSpec("user"), [["a"]])


def test_synthetic_noise_feature_and_labels():
    data = synthetic({"signal": 100, "noise": 100}, 5000, seed=3, noise_features=["noise"])
    assert set(np.unique(data.labels)) == {0.0, 1.0}
    counts = np.bincount(data.columns["signal"].codes[:, 0])
    assert counts[1] > counts[50] > 0  # rank 1 is the most frequent value (power law)
    with pytest.raises(DataError, match="not in the vocabulary"):
        synthetic({"a": 3}, 10, noise_features=["b"])


def test_from_table_reports_a_bad_value(tmp_path):
    table = pa.table({"user": [["a"], ["b"]], "y": [0, 1]})
    spec = DatasetSpec(features=(FeatureSpec("user"),), label=LabelSpec("y"))
    with pytest.raises(DataError, match="column 'user'.*takes one value"):
        from_table(table, spec, "t")
