"""The node's OpenDP discrete Laplace release: scale, spread, centre and shape of the noise.

Tolerances come from the sampling distributions, at about 4-6 standard errors, so a correct
mechanism fails far less than once in ten thousand runs:

* the sample sd of N discrete Laplace draws has relative sd ≈ ½·√((κ-1)/N), κ ≈ 6 the kurtosis:
  0.5% at N = 50,000, so ±3% is about 6 standard errors;
* the sample mean has sd σ/√N; we allow 5 of them;
* a coverage proportion p of N draws has sd √(p(1-p)/N).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from fedtre.dp import (
    discrete_laplace_halfwidth,
    discrete_laplace_std,
    discrete_laplace_tail,
    units_to_epsilon,
)
from fedtre.plan import Aggregate, AggregateKind
from fedtre.result import ReleasedStatistic
from fedtre.statistics import Statistic
from node.release import (
    MECHANISM,
    PlannedAggregate,
    PlannedStatistic,
    ReleasePlan,
    laplace_measurement,
    release,
)

N = 50_000
SETTINGS = [  # (L1 sensitivity, ε in units)
    (1, 100_000),  # ε 0.1: scale 10
    (25, 1_000_000),  # ε 1: scale 25 (a count on conditions)
    (1, 1_000_000),  # ε 1: scale 1
    (13, 50_000),  # ε 0.05: scale 260 (grouped distinct persons on conditions)
    (3, 333_333),  # an ε that is not a round number
]


def release_statistic(kind: str, values: list[int], l1: int, units: int) -> ReleasedStatistic:
    """One statistic through the node's ``release``, with a plan of that one measurement."""
    meas, scale = laplace_measurement(l1, units)
    planned = PlannedStatistic(Statistic(kind), l1, units, scale, meas)
    aggregate = PlannedAggregate(Aggregate(AggregateKind.COUNT, "n"), (planned,), None, None)
    return release(ReleasePlan((aggregate,), units), [values])[0].statistics[0]


def _ids(setting: tuple[int, int]) -> str:
    return f"l1={setting[0]}-eps={units_to_epsilon(setting[1]):g}"


@pytest.fixture(scope="module", params=SETTINGS, ids=_ids)
def released(request):
    l1, units = request.param
    return l1, units, release_statistic("count", [0] * N, l1, units)


def test_reported_scale_is_sensitivity_over_epsilon(released):
    l1, units, stat = released
    nominal = l1 / units_to_epsilon(units)
    assert nominal <= stat.noise_scale <= nominal * (1 + 1e-12)  # nudged up by a few ulps at most
    assert stat.noise_std == pytest.approx(discrete_laplace_std(stat.noise_scale), rel=1e-12)
    assert stat.sensitivity == l1
    assert stat.epsilon_units == units
    assert stat.mechanism == MECHANISM
    # OpenDP's own privacy map confirms the cost is within the ε that would be debited
    meas, scale = laplace_measurement(l1, units)
    assert scale == stat.noise_scale
    assert meas.map(l1) <= units_to_epsilon(units)


def test_values_are_integers(released):
    _, _, stat = released
    assert len(stat.values) == N
    assert all(type(v) is int for v in stat.values)


def test_empirical_sd_matches_reported_noise_std(released):
    _, _, stat = released
    x = np.asarray(stat.values, dtype=np.float64)
    ratio = x.std(ddof=1) / stat.noise_std
    assert abs(ratio - 1) < 0.03, f"empirical sd / reported = {ratio:.4f}"


def test_noise_is_centred_on_zero(released):
    _, _, stat = released
    x = np.asarray(stat.values, dtype=np.float64)
    assert abs(x.mean()) < 5 * stat.noise_std / math.sqrt(N)
    assert abs(np.median(x)) <= max(1.0, 0.05 * stat.noise_std)


def test_reported_interval_covers_as_claimed(released):
    _, _, stat = released
    x = np.asarray(stat.values)
    k = discrete_laplace_halfwidth(stat.noise_scale)
    expected = 1 - discrete_laplace_tail(stat.noise_scale, k)
    assert expected >= 0.95
    covered = float(np.mean(np.abs(x) <= k))
    se = math.sqrt(expected * (1 - expected) / N)
    assert abs(covered - expected) < 5 * se, (covered, expected)


def test_shape_is_discrete_laplace(released):
    """χ² goodness of fit to P(X = k) ∝ exp(-|k|/scale), binned on |k| with tails pooled."""
    _, _, stat = released
    a = 1 / stat.noise_scale
    x = np.abs(np.asarray(stat.values))
    # bins of |k|: equal-probability-ish edges from the distribution's own quantiles
    edges = sorted({0, *(int(v) for v in np.quantile(x, np.linspace(0.05, 0.95, 19)))})
    bounds = [*edges, math.inf]
    observed, expected = [], []
    dist = stats.dlaplace(a)
    for lo, hi in itertools.pairwise(bounds):
        # P(lo <= |X| < hi)
        upper = 1.0 if hi == math.inf else dist.cdf(hi - 1) - dist.cdf(-hi)
        lower = 0.0 if lo == 0 else dist.cdf(lo - 1) - dist.cdf(-lo)
        expected.append((upper - lower) * N)
        observed.append(int(np.sum((x >= lo) & (x < hi))))
    assert sum(observed) == N
    assert min(expected) >= 5
    chi2 = stats.chisquare(observed, np.asarray(expected) * N / sum(expected))
    assert chi2.pvalue > 1e-4, (observed, [round(e) for e in expected])


def test_noise_is_added_to_the_true_values_and_independent_across_cells():
    truth = [1000, 0, 250, 7] * 12_500
    stat = release_statistic("count", truth, 1, 200_000)  # scale 5
    x = np.asarray(stat.values, dtype=np.float64) - np.asarray(truth)
    se = stat.noise_std / math.sqrt(len(truth) / 4)
    for offset in range(4):  # centred on each cell's truth
        assert abs(x[offset::4].mean()) < 5 * se
    # neighbouring cells get independent noise
    r = np.corrcoef(x[:-1], x[1:])[0, 1]
    assert abs(r) < 5 / math.sqrt(len(truth))


def test_each_release_draws_fresh_noise():
    a = release_statistic("count", [0] * 1000, 1, 100_000).values
    b = release_statistic("count", [0] * 1000, 1, 100_000).values
    assert a != b
    assert sum(x == y for x, y in zip(a, b, strict=True)) < 100  # P(equal) ≈ 3% per cell


@pytest.mark.parametrize("scale", [0.1, 0.5, 1.0, 3.3, 10.0, 20.0, 260.0, 12_345.6, 1e6])
@pytest.mark.parametrize("confidence", [0.5, 0.9, 0.95, 0.99])
def test_halfwidth_is_the_smallest_that_covers(scale, confidence):
    k = discrete_laplace_halfwidth(scale, confidence)
    miss = 1 - confidence
    assert discrete_laplace_tail(scale, k) <= miss + 1e-15
    if k > 0:
        assert discrete_laplace_tail(scale, k - 1) > miss
    # and the tail formula agrees with scipy's discrete Laplace
    dist = stats.dlaplace(1 / scale)
    assert discrete_laplace_tail(scale, k) == pytest.approx(
        dist.sf(k) + dist.cdf(-k - 1), rel=1e-6, abs=1e-12
    )
