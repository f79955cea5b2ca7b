"""Wilson intervals against the formula and published values; eval-set sizing."""

from __future__ import annotations

import math

import pytest

from asft_core.evaluation.stats import Proportion, sample_size_for_margin, wilson_interval

Z = 1.959964


def wilson_reference(successes: int, total: int) -> tuple[float, float]:
    """Wilson's bounds in the textbook form (p + z^2/2n +- z sqrt(...)) / (1 + z^2/n)."""
    p = successes / total
    root = Z * math.sqrt(p * (1 - p) / total + Z**2 / (4 * total**2))
    return (
        (p + Z**2 / (2 * total) - root) / (1 + Z**2 / total),
        (p + Z**2 / (2 * total) + root) / (1 + Z**2 / total),
    )


@pytest.mark.parametrize(("successes", "total"), [(0, 10), (5, 10), (10, 10), (3, 47), (1, 1)])
def test_wilson_matches_the_formula(successes: int, total: int) -> None:
    result = wilson_interval(successes, total)
    low, high = wilson_reference(successes, total)
    assert result.value == pytest.approx(successes / total)
    assert result.low == pytest.approx(max(0.0, low), abs=1e-12)
    assert result.high == pytest.approx(min(1.0, high), abs=1e-12)
    assert 0.0 <= result.low <= result.value <= result.high <= 1.0


def test_wilson_published_values() -> None:
    # 95% Wilson intervals as tabulated by Newcombe (1998) and common calculators.
    zero = wilson_interval(0, 10)
    assert (zero.low, round(zero.high, 4)) == (0.0, 0.2775)
    half = wilson_interval(5, 10)
    assert (round(half.low, 4), round(half.high, 4)) == (0.2366, 0.7634)
    full = wilson_interval(10, 10)
    assert (round(full.low, 4), full.high) == (0.7225, 1.0)
    newcombe = wilson_interval(81, 263)
    assert (round(newcombe.low, 4), round(newcombe.high, 4)) == (0.2553, 0.3662)


def test_empty_sample_says_nothing() -> None:
    assert wilson_interval(0, 0) == Proportion(successes=0, total=0, value=0.0, low=0.0, high=1.0)


def test_interval_narrows_with_more_prompts() -> None:
    small, large = wilson_interval(5, 50), wilson_interval(100, 1000)
    assert small.value == large.value == 0.1
    assert large.high - large.low < (small.high - small.low) / 3


@pytest.mark.parametrize(("successes", "total"), [(-1, 10), (11, 10), (1, -1)])
def test_impossible_counts_are_rejected(successes: int, total: int) -> None:
    with pytest.raises(ValueError):
        wilson_interval(successes, total)


def test_to_dict() -> None:
    assert wilson_interval(1, 4).to_dict().keys() == {"successes", "total", "value", "low", "high"}
    assert wilson_interval(1, 4).to_dict()["value"] == 0.25


def test_sample_size_for_three_points_is_1068() -> None:
    assert sample_size_for_margin(0.03) == 1068
    assert sample_size_for_margin(0.05) == 385
    assert sample_size_for_margin(0.10) == 97


def test_sample_size_meets_its_margin_with_wilson() -> None:
    for margin in (0.02, 0.03, 0.05, 0.1):
        n = sample_size_for_margin(margin)
        worst = wilson_interval(n // 2, n)
        assert (worst.high - worst.low) / 2 <= margin
        # And one prompt fewer under the normal approximation would not.
        assert Z * math.sqrt(0.25 / (n - 1)) > margin


def test_sample_size_uses_the_expected_rate() -> None:
    assert sample_size_for_margin(0.03, p=0.1) < sample_size_for_margin(0.03)
    with pytest.raises(ValueError):
        sample_size_for_margin(0.0)
    with pytest.raises(ValueError):
        sample_size_for_margin(0.03, p=1.5)
