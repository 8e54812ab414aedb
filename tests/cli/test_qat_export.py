"""`uembed train --qat` and `uembed export` of its run (#37, item 3), and `export --evaluate` of a streamed run
(#37, item 7), through the command line in process."""

import json
import re

import pytest

from uembed.cli import main
from uembed.model.data.synthetic import CRITEO_PRESETS, CriteoShape, write_criteo_shards


@pytest.fixture(scope="module")
def streamed_qat_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("streamed-qat")
    write_criteo_shards(root / "data", 12_000, CriteoShape(vocabulary=CRITEO_PRESETS["criteo-tiny"], seed=5), progress=False)
    options = ["--dataset", str(root / "data"), "--epochs", "1", "--dim", "4", "--network", "mlp", "--hidden", "16",
               "--batch-size", "512", "--shuffle-buffer", "4096", "--read-rows", "2048", "--quiet", "--runs-dir", str(root / "runs")]  # fmt: skip
    assert main(["train", *options, "--name", "r", "--qat", "int4"]) == 0
    return root, options


def test_export_evaluate_streams_a_streamed_runs_test_split_with_the_bundle(streamed_qat_run, capsys):
    root, _ = streamed_qat_run
    capsys.readouterr()
    assert main(["export", str(root / "runs" / "r"), "--out", str(root / "bundles"), "--name", "c", "--evaluate"]) == 0
    out = capsys.readouterr().out
    assert f"bundle {root / 'bundles' / 'c' / '1'}: int4 rows" in out  # the run's codec, without --dtype
    auc, logloss, examples = re.search(r"bundle test AUC (\S+)  test LogLoss (\S+)  \(([\d,]+) examples\)", out).groups()
    metrics = json.loads((root / "runs" / "r" / "metrics.json").read_text())
    assert int(examples.replace(",", "")) == metrics["test_examples"] > 0
    assert float(auc) == pytest.approx(metrics["test_auc"], abs=2e-5)  # the bundle's int4 rows are the run's
    assert float(logloss) == pytest.approx(metrics["test_logloss"], abs=2e-5)


def test_qat_options_are_refused_in_one_line(streamed_qat_run, capsys):
    root, options = streamed_qat_run
    capsys.readouterr()
    assert main(["export", str(root / "runs" / "r"), "--out", str(root / "other"), "--dtype", "int8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {root / 'runs' / 'r'} was trained with --qat int4: export it with --dtype int4 (the rows it learned with), not int8"]
    assert main(["train", *options, "--name", "bad", "--qat", "int3"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: unknown --qat 'int3'; choose one of int8, int4, int2, pq"]
    assert main(["train", *options, "--name", "bad", "--qat", "int4", "--pq-subvectors", "2"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --pq-subvectors 2 is for --qat pq (an export takes its own --pq-subvectors)"]  # fmt: skip
    assert main(["train", *options, "--name", "bad", "--qat", "pq", "--pq-subvectors", "3"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: --pq-subvectors 3 does not divide --dim 4"]
    assert main(["train", *options, "--name", "bad", "--qat", "pq", "--dim", "5"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: pq's default of 2 sub-vectors does not divide --dim 5"]
    assert not (root / "runs" / "bad").exists()


def test_a_pq_qat_run_exports_its_own_codebooks_and_scores_as_the_run(streamed_qat_run, capsys):
    root, options = streamed_qat_run
    assert main(["train", *options, "--name", "pq", "--qat", "pq", "--pq-subvectors", "1"]) == 0
    capsys.readouterr()
    run = root / "runs" / "pq"
    assert main(["export", str(run), "--out", str(root / "bundles"), "--name", "pq", "--pq-subvectors", "2"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {run} was trained with --qat pq in 1 sub-vectors: leave out --pq-subvectors 2"]  # fmt: skip
    assert main(["export", str(run), "--out", str(root / "bundles"), "--name", "pq", "--evaluate"]) == 0
    out = capsys.readouterr().out
    assert f"bundle {root / 'bundles' / 'pq' / '1'}: pq rows" in out
    auc = float(re.search(r"bundle test AUC (\S+)", out).group(1))
    assert auc == pytest.approx(json.loads((run / "metrics.json").read_text())["test_auc"], abs=2e-5)
    manifest = json.loads((root / "bundles" / "pq" / "1" / "manifest.json").read_text())
    assert {t["subvectors"] for t in manifest["tables"]} == {1}
