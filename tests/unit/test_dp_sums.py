"""Intervals of a sum of independent discrete Laplace variables (``fedtre.dp.sum_halfwidth``),
checked against brute-force convolution of the exact probability mass functions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.signal import fftconvolve

from fedtre.dp import (
    _ALIAS_MASS,
    _chernoff_reach,
    _sum_halfwidth,
    discrete_laplace_halfwidth,
    ratio_estimate,
    sum_halfwidth,
    sum_interval,
)


def _pmf(scale: float) -> np.ndarray:
    alpha = math.exp(-1.0 / scale)
    k = np.arange(-math.ceil(45 * scale) - 1, math.ceil(45 * scale) + 2)
    return (1 - alpha) / (1 + alpha) * alpha ** np.abs(k)  # tails beyond: < 3e-20


def _brute_coverage(scales: list[float]) -> np.ndarray:
    """P(|X_1 + ... + X_n| <= k) for k = 0, 1, ..., by convolving the exact pmfs."""
    out = np.array([1.0])
    for scale in scales:
        pmf = _pmf(scale)
        big = len(out) * len(pmf) > 5e7
        out = fftconvolve(out, pmf) if big else np.convolve(out, pmf)
    centre = len(out) // 2
    right = out[centre + 1 :]
    return np.concatenate(([out[centre]], out[centre] + 2 * np.cumsum(right)))


def _brute_halfwidth(scales: list[float], confidence: float) -> tuple[int, np.ndarray]:
    coverage = _brute_coverage(scales)
    return int(np.flatnonzero(coverage >= confidence)[0]), coverage


def _binned(scales: list[float], grid: int) -> bool:
    return 2 * _chernoff_reach(np.asarray(scales), _ALIAS_MASS) + 2 > grid


@pytest.mark.parametrize("scale", [0.05, 0.5, 1, 4, 20, 250, 1e5])
@pytest.mark.parametrize("confidence", [0.5, 0.95, 0.999])
def test_one_scale_is_the_single_halfwidth(scale, confidence):
    assert sum_halfwidth([scale], confidence) == discrete_laplace_halfwidth(scale, confidence)


@pytest.mark.parametrize(
    "scales",
    [[1, 1], [4, 4, 4], [3, 5, 7], [0.5, 20, 2], [10] * 5, [40, 40, 40], [0.1, 0.2], [0.01, 300]],
)
@pytest.mark.parametrize("confidence", [0.5, 0.9, 0.95, 0.99])
def test_unbinned_equals_brute_force(scales, confidence):
    assert not _binned(scales, 1 << 16)
    expected, coverage = _brute_halfwidth(scales, confidence)
    k = sum_halfwidth(scales, confidence)
    assert k == expected
    assert coverage[k] >= confidence


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0.05, 60.0), min_size=2, max_size=5),
    st.floats(0.5, 0.999),
)
def test_stated_coverage_holds_under_the_exact_distribution(scales, confidence):
    expected, coverage = _brute_halfwidth(scales, confidence)
    k = sum_halfwidth(scales, confidence)
    assert coverage[k] >= confidence
    assert k == expected  # no binning at these scales: the smallest such k


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(5.0, 300.0), min_size=2, max_size=4),
    st.floats(0.5, 0.999),
    st.sampled_from([256, 1024, 4096]),
)
def test_binned_intervals_never_cover_less(scales, confidence, grid):
    """Forcing a coarse lattice (binning) may widen the interval, never narrow it."""
    expected, coverage = _brute_halfwidth(scales, confidence)
    k = _sum_halfwidth(tuple(sorted(scales)), confidence, grid)
    assert k >= expected
    assert coverage[k] >= confidence


@pytest.mark.parametrize(
    "scales", [[100, 200, 300], [150] * 4, [40, 400], [2000, 3000, 5000], [1e4, 1e4]]
)
def test_binned_intervals_are_within_two_percent(scales):
    grid = 4096 if max(scales) < 1000 else 1 << 16  # the default lattice for large scales
    assert _binned(scales, grid)
    expected, coverage = _brute_halfwidth(scales, 0.95)
    k = _sum_halfwidth(tuple(sorted(scales)), 0.95, grid)
    assert coverage[k] >= 0.95
    assert expected <= k <= 1.02 * expected
    if grid == 1 << 16:
        assert k == sum_halfwidth(scales)


def test_many_large_scales_are_close_to_the_normal_approximation():
    scales = [1e5] * 20  # sd of the sum: 1e5 * sqrt(40) (discrete Laplace sd ≈ scale * sqrt 2)
    k = sum_halfwidth(scales)
    normal = 1.959964 * math.sqrt(sum(2 * (s * s) for s in scales))
    assert normal <= k <= 1.02 * normal


def test_halfwidth_grows_with_more_noise():
    base = sum_halfwidth([10, 10])
    assert sum_halfwidth([10, 10, 10]) > base
    assert sum_halfwidth([10, 20]) > base
    assert sum_halfwidth([10, 10], 0.99) > base


def test_order_of_scales_does_not_matter():
    assert sum_halfwidth([3, 70, 0.4]) == sum_halfwidth([70, 0.4, 3])


def test_sum_interval_is_value_plus_minus_the_halfwidth():
    k = sum_halfwidth([4, 4, 4])
    interval = sum_interval(100, [4, 4, 4])
    assert (interval.low, interval.high) == (100 - k, 100 + k)


@pytest.mark.parametrize(
    ("scales", "confidence"),
    [([], 0.95), ([1, 0], 0.95), ([1, -2], 0.95), ([1, math.nan], 0.95), ([1, math.inf], 0.95)]
    + [([1, 1], c) for c in (0.0, 1.0, -0.5, 0.9999999)],
)
def test_nonsense_is_refused(scales, confidence):
    with pytest.raises(ValueError):
        sum_halfwidth(scales, confidence)


def test_ratio_estimate_confidence_defaults_to_95_percent():
    default = ratio_estimate(1000, 50, 100, 10, 0, 180)
    assert default == ratio_estimate(1000, 50, 100, 10, 0, 180, 0.95)
    _, wider = ratio_estimate(1000, 50, 100, 10, 0, 180, 0.99)
    assert default[1] is not None and wider is not None
    assert wider.high - wider.low == pytest.approx(
        (default[1].high - default[1].low) * 2.5758293 / 1.9599640, rel=1e-6
    )
