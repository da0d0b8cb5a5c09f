"""Wilson intervals and the exact McNemar test against scipy and hand computations."""

from __future__ import annotations

import doctest
import json
import math

import pytest
from scipy.stats import binomtest

from revlens import stats
from revlens.stats import McNemar, Rate, mcnemar_exact, wilson_interval

GRID = [(k, n) for n in (1, 2, 3, 5, 10, 37) for k in range(n + 1)] + [
    (k, 200) for k in (0, 1, 2, 17, 84, 100, 163, 199, 200)
]


@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_wilson_matches_scipy(confidence):
    for k, n in GRID:
        expected = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
        low, high = wilson_interval(k, n, confidence)
        assert low == pytest.approx(float(expected.low), rel=1e-12, abs=1e-14), (k, n)
        assert high == pytest.approx(float(expected.high), rel=1e-12, abs=1e-14), (k, n)
        assert 0.0 <= low <= k / n <= high <= 1.0


def test_wilson_ends_are_exact():
    assert wilson_interval(0, 7)[0] == 0.0
    assert wilson_interval(7, 7)[1] == 1.0
    assert wilson_interval(0, 7)[1] > 0.0 and wilson_interval(7, 7)[0] < 1.0


def test_wilson_hand_computation():
    # k=1, n=4, z from the normal quantile: the closed form written out independently of the module.
    z = 1.959963984540054
    p, n = 0.25, 4
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert wilson_interval(1, 4) == pytest.approx((center - half, center + half), rel=1e-12)


@pytest.mark.parametrize(
    "k, n, confidence, match",
    [
        (0, 0, 0.95, "at least one trial"),
        (3, 2, 0.95, "outside 0..n"),
        (-1, 5, 0.95, "outside 0..n"),
        (1, 5, 1.0, "strictly between 0 and 1"),
        (1, 5, 0.0, "strictly between 0 and 1"),
        (1.5, 5, 0.95, "whole counts"),
    ],
)
def test_wilson_errors(k, n, confidence, match):
    with pytest.raises(ValueError, match=match):
        wilson_interval(k, n, confidence)


def test_rate_of_and_from_counts():
    outcomes = [True] * 84 + [False] * 116
    r = Rate.of(outcomes)
    expected = binomtest(84, 200).proportion_ci(confidence_level=0.95, method="wilson")
    assert (r.k, r.n, r.rate) == (84, 200, 0.42)
    assert (r.low, r.high) == pytest.approx((float(expected.low), float(expected.high)), rel=1e-12)
    assert Rate.from_counts(84, 200) == r
    assert str(r) == f"0.420 [{float(expected.low):.3f}, {float(expected.high):.3f}] (84/200)"
    d = r.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert set(d) == {"k", "n", "rate", "low", "high", "confidence"}
    r90 = Rate.of(outcomes, confidence=0.9)
    assert r90.confidence == 0.9 and r.low < r90.low < r90.high < r.high
    with pytest.raises(ValueError, match="no outcomes"):
        Rate.of([])


def _pairs(only_a: int, only_b: int, both: int, neither: int) -> tuple[list[bool], list[bool]]:
    a = [True] * only_a + [False] * only_b + [True] * both + [False] * neither
    b = [False] * only_a + [True] * only_b + [True] * both + [False] * neither
    return a, b


def test_mcnemar_matches_scipy_binomtest():
    for only_a in range(0, 13):
        for only_b in (0, 1, 2, 5, 9, 30):
            if only_a + only_b == 0:
                continue
            a, b = _pairs(only_a, only_b, both=3, neither=4)
            got = mcnemar_exact(a, b)
            expected = binomtest(min(only_a, only_b), only_a + only_b, 0.5).pvalue
            assert (got.only_a, got.only_b) == (only_a, only_b)
            assert got.p_value == pytest.approx(float(expected), rel=1e-12), (only_a, only_b)
            assert got.significant == (float(expected) < 0.05)


def test_mcnemar_large_counts_match_scipy():
    a, b = _pairs(620, 540, both=10, neither=10)
    expected = binomtest(540, 1160, 0.5).pvalue
    assert mcnemar_exact(a, b).p_value == pytest.approx(float(expected), rel=1e-9)


def test_mcnemar_hand_computed():
    # 4 prompts only a, 1 only b: X ~ Binomial(5, 1/2), p = 2 * (C(5,0) + C(5,1)) / 2^5 = 12/32.
    a, b = _pairs(4, 1, both=2, neither=3)
    assert mcnemar_exact(a, b) == McNemar(only_a=4, only_b=1, p_value=0.375, significant=False)
    # 6 against 0: p = 2 / 64, significant at 0.05 but not at 0.01.
    a, b = _pairs(6, 0, both=0, neither=0)
    assert mcnemar_exact(a, b).p_value == 0.03125 and mcnemar_exact(a, b).significant
    assert not mcnemar_exact(a, b, alpha=0.01).significant
    # no discordant pairs
    assert mcnemar_exact([True, False], [True, False]) == McNemar(0, 0, 1.0, False)
    # order of the arguments swaps the counts, not the p-value
    swapped = mcnemar_exact(*reversed(_pairs(4, 1, both=0, neither=0)))
    assert (swapped.only_a, swapped.only_b, swapped.p_value) == (1, 4, 0.375)


def test_mcnemar_errors():
    with pytest.raises(ValueError, match=r"a has 3 and b has 2"):
        mcnemar_exact([True, False, True], [True, False])
    with pytest.raises(ValueError, match="no pairs"):
        mcnemar_exact([], [])
    with pytest.raises(ValueError, match="alpha"):
        mcnemar_exact([True], [False], alpha=1.5)


def test_docstring_examples_run():
    result = doctest.testmod(stats, raise_on_error=False)
    assert result.attempted > 0 and result.failed == 0
