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


def test_the_fit_passes_through_rising_points_and_joins_them_in_log_fraction():
    fractions = [0.02, 0.05, 0.1, 0.5]
    points = [{"fraction": f, "auc": {"float32": 0.7 + 0.02 * math.log(f), "int8": 0.7 + 0.02 * math.log(f) - 0.001}} for f in fractions]
    line = fit_family(points, ["float32", "int8"])
    assert (line.low, line.high) == (0.02, 0.5)
    for f in (0.02, 0.03, 0.07, 0.5):  # through the points and, between them, on the log line they lie on
        assert line.auc(f, "float32") == pytest.approx(0.7 + 0.02 * math.log(f))
        assert line.auc(f, "int8") == pytest.approx(0.7 + 0.02 * math.log(f) - 0.001)
    assert line.auc(0.9, "float32") == pytest.approx(line.auc(0.5, "float32"))  # no extrapolation
    assert line.fewest("float32", 0.7 + 0.02 * math.log(0.07)) == pytest.approx(0.07)
    assert line.fewest("float32", 0.69) is None and line.fewest("int8", 0.0) == 0.02


def test_a_saturating_family_is_not_predicted_above_its_best_measured_point():
    # A line through these would pass above the last point: the curve is concave in log fraction.
    aucs = {0.08: 0.50, 0.1: 0.494, 0.25: 0.795, 0.5: 0.885}
    line = fit_family([{"fraction": f, "auc": {"float32": a}} for f, a in aucs.items()], ["float32"])
    assert line.auc(0.5, "float32") == pytest.approx(0.885) and line.auc(0.25, "float32") == pytest.approx(0.795)
    assert line.auc(0.08, "float32") == pytest.approx(0.497) == line.auc(0.1, "float32")  # a fall is pooled: noise


def test_a_codec_never_gains_and_may_cost_more_at_fewer_rows():
    points = [{"fraction": 0.05, "auc": {"float32": 0.70, "int2": 0.66, "int4": 0.71}},
              {"fraction": 0.5, "auc": {"float32": 0.80, "int2": 0.799, "int4": 0.81}}]  # fmt: skip
    line = fit_family(points, ["float32", "int2", "int4"])
    assert line.curves["int4"] == line.curves["float32"]  # measured above float32: noise, not a gain
    assert line.auc(0.05, "int2") == pytest.approx(0.66) and line.auc(0.5, "int2") == pytest.approx(0.799)
    falling = [{"fraction": f, "auc": {"float32": 0.7 - 0.01 * math.log(f)}} for f in (0.02, 0.1, 0.5)]
    flat = fit_family(falling, ["float32"])
    assert flat.curves["float32"] == pytest.approx([np.mean([p["auc"]["float32"] for p in falling])] * 3)


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
    """Log lines with known slopes: the larger the dim, the higher and steeper."""
    fractions, shifts = [0.02, 0.1, 0.5], {"float32": 0.0, "int8": -0.002, "int4": -0.01}
    return {f: Fit(fractions, {c: [0.6 + f.dim / 200 + 0.01 * f.dim / 8 * math.log(x) + shift for x in fractions]
                               for c, shift in shifts.items()}, 3) for f in families}  # fmt: skip


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
