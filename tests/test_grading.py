"""Runs that differ only in their seed form one group; a difference is graded against the noise."""

import math

import pytest

from slimtune.grading import Group, grade, group_by_config, threshold


def rows_and_combos():
    combos = {"base": {}, "seed-1": {"train.seed": 1}, "seed-2": {"train.seed": 2},
              "r-2": {"method.r": 2}, "r-2_seed-1": {"method.r": 2, "train.seed": 1}}
    loss = {"base": 1.70, "seed-1": 1.72, "seed-2": 1.68, "r-2": 1.50, "r-2_seed-1": 1.52}
    return [{"run": k, "eval_loss": v, "kl": None} for k, v in loss.items()], combos


def test_runs_group_by_their_overrides_without_the_seed():
    rows, combos = rows_and_combos()
    groups = group_by_config(rows, combos, ["eval_loss", "kl"])
    assert set(groups) == {"base", "r-2"}
    assert groups["base"].runs == ["base", "seed-1", "seed-2"] and groups["r-2"].n == 2
    assert groups["base"].mean("eval_loss") == pytest.approx(1.70)
    assert groups["base"].sd("eval_loss") == pytest.approx(0.02)  # sample sd of 1.70, 1.72, 1.68
    assert groups["base"].mean("kl") is None and groups["r-2"].overrides == {"method.r": 2}
    assert Group("x", {}, ["a"], {"m": [1.0]}).sd("m") is None  # one seed: no sd


def test_threshold_is_two_standard_errors_of_the_difference():
    assert threshold(0.1, 1, 1) == pytest.approx(2 * 0.1 * math.sqrt(2))
    assert threshold(0.1, 5, 3) == pytest.approx(2 * 0.1 * math.sqrt(1 / 5 + 1 / 3))


@pytest.mark.parametrize("claim,sd,want", [
    ("<", 0.01, "holds"),          # 1.51 vs 1.70 with sd 0.01: far beyond
    (">", 0.01, "contradicted"),   # the other way
    ("=", 0.01, "contradicted"),   # a claimed tie that is not one
    ("<", 0.5, "within noise"),    # the same gap inside a wide noise
    ("=", 0.5, "holds"),
])
def test_grades(claim, sd, want):
    rows, combos = rows_and_combos()
    g = group_by_config(rows, combos, ["eval_loss"])
    got, diff, bar = grade(g["r-2"], g["base"], "eval_loss", claim, sd)
    assert got == want
    assert diff == pytest.approx(1.51 - 1.70) and bar == pytest.approx(threshold(sd, 2, 3))


def test_a_bad_claim_or_a_missing_metric_raises():
    rows, combos = rows_and_combos()
    g = group_by_config(rows, combos, ["eval_loss", "kl"])
    with pytest.raises(ValueError, match="claim"):
        grade(g["r-2"], g["base"], "eval_loss", "<=", 0.1)
    with pytest.raises(ValueError, match="kl"):
        grade(g["r-2"], g["base"], "kl", "<", 0.1)
