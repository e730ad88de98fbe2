"""Budget units, ε shares and the discrete Laplace arithmetic behind intervals."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedtre.dp import (
    discrete_laplace_halfwidth,
    discrete_laplace_tail,
    epsilon_to_units,
    split_units,
    split_units_weighted,
)
from fedtre.errors import QueryRefused


@given(st.integers(1, 10**9), st.integers(1, 16))
def test_split_units_adds_up_exactly(total, parts):
    if total < parts:
        with pytest.raises(QueryRefused):
            split_units(total, parts)
        return
    shares = split_units(total, parts)
    assert sum(shares) == total and min(shares) >= 1 and max(shares) - min(shares) <= 1


@given(st.integers(2, 10**9), st.lists(st.floats(0.01, 1e6), min_size=1, max_size=4))
def test_weighted_split_adds_up_exactly_and_follows_weights(total, weights):
    if total < len(weights):
        return
    shares = split_units_weighted(total, weights)
    assert sum(shares) == total and min(shares) >= 1
    if total > 10**6 and min(weights) / max(weights) > 0.01:
        for share, w in zip(shares, weights, strict=True):
            assert share / total == pytest.approx(w / sum(weights), abs=0.01)


@pytest.mark.parametrize("scale", [0.5, 1, 2.5, 10, 40, 250])
def test_halfwidth_is_the_smallest_with_95_percent_coverage(scale):
    k = discrete_laplace_halfwidth(scale)
    assert discrete_laplace_tail(scale, k) <= 0.05
    assert k == 0 or discrete_laplace_tail(scale, k - 1) > 0.05


def test_halfwidth_approaches_continuous_laplace_for_large_scales():
    assert discrete_laplace_halfwidth(1000) == pytest.approx(1000 * math.log(20), rel=0.01)


@pytest.mark.parametrize(("eps", "units"), [(1.0, 1_000_000), (0.1, 100_000), (0.0000015, 2)])
def test_epsilon_units(eps, units):
    assert epsilon_to_units(eps) == units
