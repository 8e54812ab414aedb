"""The planner's parts without training: calibration order, the fit, bytes as served, and the choice (issue #38, item 3)."""

import math

import numpy as np
import pytest

from uembed.bundle.codecs import ROW_DTYPES, encode_records
from uembed.model.planner import REFERENCE as REFERENCE_METHOD
from uembed.model.planner import (
    Family,
    Fit,
    Sizer,
    Target,
    calibration_order,
    choose,
    fit_family,
    record_bytes,
    served_bytes,
    weigh,
)
from uembed.model.train import TrainConfig


def test_every_family_gets_its_largest_and_smallest_fraction_before_any_between():
    families = [Family("unified", 8), Family("hashing-trick", 16)]
    order = calibration_order(families, [0.1, 0.02, 0.5, 0.05, 0.25])
    assert sorted(order, key=lambda run: (run[0].method, run[1])) == sorted(
        [(f, x) for f in families for x in (0.02, 0.05, 0.1, 0.25, 0.5)], key=lambda run: (run[0].method, run[1])
    )
    first_four = order[:4]
    assert {(f.method, x) for f, x in first_four} == {(f.method, x) for f in families for x in (0.02, 0.5)}
    assert order[4][1] == 0.1  # then the middle fraction


def test_the_fit_recovers_a_log_line_and_never_predicts_that_rows_cost_auc():
    fractions = [0.02, 0.05, 0.1, 0.5]
    points = [{"fraction": f, "auc": {"float32": 0.7 + 0.02 * math.log(f), "int8": 0.7 + 0.02 * math.log(f) - 0.001}} for f in fractions]
    line = fit_family(points, ["float32", "int8"])
    assert line.b == pytest.approx(0.02) and line.a == pytest.approx(0.7)
    assert line.codec_shift["int8"] == pytest.approx(-0.001) and (line.low, line.high) == pytest.approx((0.02, 0.5))
    gaining = fit_family([{**p, "auc": {**p["auc"], "int4": p["auc"]["float32"] + 0.01}} for p in points], ["int4"])
    assert gaining.codec_shift["int4"] == 0  # a codec measured above float32 is noise, not a gain
    falling = [{"fraction": f, "auc": {"float32": 0.7 - 0.01 * math.log(f)}} for f in fractions]
    flat = fit_family(falling, ["float32"])
    assert flat.b == 0 and flat.a == pytest.approx(np.mean([p["auc"]["float32"] for p in falling]))


@pytest.mark.parametrize("codec", [c for c in ROW_DTYPES if c != "pq"])
def test_a_record_is_as_many_bytes_as_the_codec_stores(codec):
    for dim in (3, 8, 16):
        rows = np.random.default_rng(0).normal(size=(5, dim)).astype(np.float32)
        assert record_bytes(codec, dim) == encode_records(rows, codec).shape[1]


def test_served_bytes_count_records_codebooks_and_biases(tiny_dataset):
    sizer = Sizer(tiny_dataset.spec, tiny_dataset.columns)
    plan = sizer.plan(Family("semantic-group", 8), 40)
    assert plan.bias_parameters > 0
    tables = sum(t.rows for t in plan.tables)
    assert served_bytes(plan, "int8") == tables * (8 + 8) + 4 * plan.bias_parameters
    assert served_bytes(plan, "pq") == tables * 4 + len(plan.tables) * 256 * 8 * 4 + 4 * plan.bias_parameters


def fits_for(families):
    """Lines with known slopes: the larger the dim, the higher and steeper."""
    return {f: Fit(0.6 + f.dim / 200, 0.01 * f.dim / 8, 0.02, 0.5, {"float32": 0.0, "int8": -0.002, "int4": -0.01}, 3) for f in families}


REFERENCE = {"method": "collisionless", "dim": 16, "auc": {"float32": 0.75, "int8": 0.7495, "int4": 0.74}}


def test_at_a_byte_budget_the_winner_fits_and_has_the_best_predicted_auc(tiny_dataset):
    sizer = Sizer(tiny_dataset.spec, tiny_dataset.columns)
    families = [Family(m, d) for m in ("unified", "hashing-trick") for d in (8, 16)]
    codecs = ["float32", "int8", "int4"]
    target = Target(bytes=2000)
    candidates = weigh(target, fits_for(families), REFERENCE, sizer, codecs)
    winner, why, ranked = choose(target, candidates, REFERENCE["auc"]["float32"])
    fitting = [c for c in candidates if c.bytes <= 2000]
    assert winner.bytes <= 2000 and winner.predicted_auc == max(c.predicted_auc for c in fitting)
    assert all(c.feasible == (c.bytes <= 2000) for c in candidates)
    assert ranked[0] is winner and "highest predicted AUC" in why
    for c in candidates:  # each hashed candidate takes the most rows within the bytes (or the fit's largest)
        if c.budget_rows is not None and c.feasible and c.fraction < 0.5:
            assert sizer.bytes(c.family, c.budget_rows + 1, c.codec) > 2000


def test_at_an_auc_loss_the_winner_is_the_cheapest_predicted_to_meet_it(tiny_dataset):
    sizer = Sizer(tiny_dataset.spec, tiny_dataset.columns)
    families = [Family(m, d) for m in ("unified", "hashing-trick") for d in (8, 16)]
    target = Target(max_auc_loss=0.05)
    candidates = weigh(target, fits_for(families), REFERENCE, sizer, ["float32", "int8", "int4"])
    winner, why, _ = choose(target, candidates, 0.75)
    meeting = [c for c in candidates if 0.75 - c.predicted_auc <= 0.05]
    assert winner.bytes == min(c.bytes for c in meeting) and "fewest bytes" in why
    assert not any(c.family.method == "collisionless" and c.codec == "float32" for c in candidates)  # the reference itself


def test_no_plan_meets_an_impossible_loss_and_the_closest_come_first(tiny_dataset):
    sizer = Sizer(tiny_dataset.spec, tiny_dataset.columns)
    families = [Family("unified", 8)]
    target = Target(max_auc_loss=0.0)
    candidates = weigh(target, fits_for(families), REFERENCE, sizer, ["float32", "int4"])
    winner, _, ranked = choose(target, candidates, 0.75)
    assert winner is None and not any(c.feasible for c in candidates)
    assert [c.predicted_auc for c in ranked] == sorted((c.predicted_auc for c in ranked), reverse=True)


@pytest.mark.parametrize("share", [0.2, "auto"])
def test_a_familys_runs_carry_the_head_share_and_the_collisionless_reference_none(share):
    base = TrainConfig(head_share=share)
    assert Family("unified", 8).config(base, 0.1).head_share == share
    assert Family(REFERENCE_METHOD, 8).config(base, None).head_share == 0.0
