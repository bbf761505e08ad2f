"""saefast.eval.confidence: Student-t intervals on hand-computed cases (scipy's t.interval as an oracle), the
conservative comparison, formatting, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from saefast.eval import compare_intervals, format_ci, mean_ci, summarize

T_975_2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)
"""``t_{0.975, 2}`` = 4.3027, the 97.5 % quantile of Student's t with 2 degrees of freedom, by its closed form for
two degrees of freedom: ``t_{p, 2} = (2p − 1) / √(2p(1 − p))``."""


def test_mean_ci_of_one_two_three_by_hand():
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0
    # s = 1 (deviations −1, 0, 1; Σ² = 2; /(n − 1) = 1), half = t · s/√n
    assert half == pytest.approx(T_975_2 / math.sqrt(3), abs=1e-12)
    assert half == pytest.approx(2.4841377, abs=1e-6)


def test_mean_ci_matches_scipy_interval_at_several_levels():
    from scipy import stats

    values = np.array([0.81, 0.79, 0.84, 0.80, 0.83, 0.78])
    for level in (0.5, 0.9, 0.95, 0.99):
        mean, half = mean_ci(values, level)
        low, high = stats.t.interval(level, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
        assert mean == pytest.approx(values.mean(), abs=1e-15)
        assert (mean - half, mean + half) == pytest.approx((low, high), abs=1e-12)


def test_tensor_input_and_one_value():
    assert mean_ci(torch.tensor([1.0, 2.0, 3.0]))[1] == pytest.approx(T_975_2 / math.sqrt(3))
    mean, half = mean_ci([0.7])
    assert mean == 0.7 and math.isnan(half)
    assert mean_ci([5.0, 5.0, 5.0]) == (5.0, 0.0)


def test_summarize():
    summary = summarize([1, 2, 3])
    assert set(summary) == {"mean", "ci95", "n", "values"}
    assert summary["mean"] == 2.0 and summary["n"] == 3 and summary["values"] == [1.0, 2.0, 3.0]
    assert summary["ci95"] == pytest.approx(T_975_2 / math.sqrt(3))


def test_compare_intervals_claims_only_without_overlap():
    low, high = [1.0, 2.0, 3.0], [10.0, 11.0, 12.0]  # intervals 2 ± 2.48 and 11 ± 2.48: disjoint
    assert compare_intervals(high, low) == "A > B"
    assert compare_intervals(low, high) == "A < B"
    # means 2 and 5, each ± 2.48: a difference of 3 but the intervals overlap, so no claim
    assert compare_intervals([4.0, 5.0, 6.0], low) == "not distinguishable"
    assert compare_intervals(low, low) == "not distinguishable"
    # a single run has no interval
    assert compare_intervals([100.0], low) == "not distinguishable"
    # at a looser level the same data separate
    assert compare_intervals([5.0, 5.1, 5.2], [4.0, 4.1, 4.2], level=0.95) == "A > B"


def test_format_ci():
    assert format_ci(0.81234, 0.01412) == "0.812 ± 0.014"
    assert format_ci(2.0, 2.4841377, digits=2) == "2.00 ± 2.48"
    assert format_ci(0.5, float("nan")) == "0.500 ± nan"


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"NaN or Inf at positions \[1, 3\]"):
        mean_ci([0.1, float("nan"), 0.3, float("inf")])
    with pytest.raises(ValueError, match="empty"):
        mean_ci([])
    with pytest.raises(ValueError, match="1-D"):
        mean_ci([[1.0, 2.0]])
    with pytest.raises(ValueError, match="level"):
        mean_ci([1.0, 2.0], level=1.0)
    with pytest.raises(ValueError, match="b_values holds NaN"):
        compare_intervals([1.0, 2.0], [1.0, float("nan")])
