"""Paired statistics: Student-t quantiles, intervals computed by hand, verdicts, retained gain."""

import math

import pytest

from ecoadapt.task import stats


@pytest.mark.parametrize(
    ("df", "table"),  # two-sided 95% critical values of Student's t, from any statistics table
    [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (29, 2.045), (120, 1.980)],
)
def test_t_quantiles_match_the_published_table(df, table):
    assert stats.t_quantile(0.975, df) == pytest.approx(table, abs=5e-4)
    assert stats.t_quantile(0.025, df) == pytest.approx(-table, abs=5e-4)


def test_the_paired_interval_against_a_hand_computed_case():
    base = {0: 0.50, 1: 0.60, 2: 0.55, 3: 0.52, 4: 0.58}
    adapted = {0: 0.52, 1: 0.64, 2: 0.58, 3: 0.57, 4: 0.59}  # gains .02 .04 .03 .05 .01
    gain, per_seed = stats.paired_gain(base, adapted)
    assert per_seed == pytest.approx({0: 0.02, 1: 0.04, 2: 0.03, 3: 0.05, 4: 0.01})
    # By hand: mean 0.03; deviations -.01 .01 0 .02 -.02, squares sum 1e-3, variance 2.5e-4,
    # std 0.0158114, standard error 0.0070711, t(4) = 2.776445: half-width 0.0196324.
    assert gain.mean == pytest.approx(0.03)
    assert gain.low == pytest.approx(0.03 - 0.0196324, abs=1e-6)
    assert gain.high == pytest.approx(0.03 + 0.0196324, abs=1e-6)
    v = stats.verdict(gain, 0.55, 0.58, floor=0.3)
    assert v.word == "helped" and "+0.0300 (95% CI +0.0104 to +0.0496, 5 seeds)" in v.text


def test_pairing_finds_a_consistent_gain_that_two_independent_means_would_miss():
    base = {0: 0.50, 1: 0.60, 2: 0.55}
    adapted = {s: v + 0.01 for s, v in base.items()}  # +0.01 on every seed
    gain, _ = stats.paired_gain(base, adapted)
    assert stats.verdict(gain, 0.55, 0.56, floor=None).word == "helped"
    unpaired = stats.mean_interval(list(adapted.values()))  # the adapted mean's own interval
    assert unpaired.low < stats.mean_interval(list(base.values())).mean  # overlaps the base mean


def test_verdicts_for_hurt_no_effect_one_seed_and_the_floor():
    assert stats.verdict(stats.mean_interval([-0.03, -0.02, -0.025]), 0.6, 0.575, None).word == "hurt"
    none = stats.verdict(stats.mean_interval([0.01, -0.01, 0.004]), 0.6, 0.6, None)
    assert none.word == "no detectable effect"
    one = stats.verdict(stats.mean_interval([0.05]), 0.6, 0.65, None)
    assert one.word == "cannot tell" and "set task.seeds to 3 or more" in one.text
    # 7 classes, the majority 49% of the test set: predicting it scores macro-F1 0.0940.
    counts = {"a": 49, "b": 11, "c": 10, "d": 9, "e": 8, "f": 7, "g": 6}
    floor = stats.trivial_score("macro_f1", counts)
    assert floor == pytest.approx(2 * 0.49 / 1.49 / 7)
    assert stats.trivial_score("accuracy", counts) == pytest.approx(0.49)
    floored = stats.verdict(stats.mean_interval([0.003, 0.002, 0.001]), 0.106, 0.108, floor)
    assert floored.word == "cannot tell" and "raise task.epochs" in floored.text


def test_retained_gain_is_the_ratio_of_paired_means_with_an_interval():
    baseline = {0: 0.04, 1: 0.06, 2: 0.05, 3: 0.05}
    exact = stats.retained_gain({s: g / 2 for s, g in baseline.items()}, baseline)
    assert exact is not None and exact.mean == pytest.approx(0.5)
    assert exact.low == pytest.approx(0.5) and exact.high == pytest.approx(0.5)  # no spread around the ratio
    noisy = stats.retained_gain({0: 0.03, 1: 0.05, 2: 0.06, 3: 0.02}, baseline)
    assert noisy is not None and noisy.mean == pytest.approx(0.16 / 0.20)
    assert noisy.low < noisy.mean < noisy.high and math.isfinite(noisy.high)
    assert stats.retained_gain({0: 0.1, 1: 0.2}, {0: -0.01, 1: 0.0}) is None  # no baseline gain to share
    assert stats.retained_gain({0: 0.1}, {0: 0.1}) is None  # one seed: no interval
