"""Differential-privacy arithmetic shared by node and coordinator. No noise is drawn here.

* Budget is kept in integer micro-epsilon units so that ledgers add up exactly.
* The spread and interval of OpenDP's discrete Laplace (integer inputs to ``make_laplace``):
  P(X = k) ∝ α^|k| with α = exp(-1/scale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedtre.errors import QueryRefused, Refusal

UNITS_PER_EPSILON = 1_000_000
MAX_EPSILON = 100.0
Z95 = 1.959963984540054


def epsilon_to_units(epsilon: float) -> int:
    """Turn a requested ε into ledger units, refusing anything that is not a sane positive ε."""
    if isinstance(epsilon, bool) or not isinstance(epsilon, int | float):
        raise QueryRefused(Refusal.INVALID_EPSILON, "ε must be a number.")
    if not math.isfinite(epsilon) or epsilon <= 0:
        raise QueryRefused(Refusal.INVALID_EPSILON, "ε must be a positive, finite number.")
    if epsilon > MAX_EPSILON:
        raise QueryRefused(Refusal.INVALID_EPSILON, f"ε above {MAX_EPSILON:g} is never accepted.")
    units = round(epsilon * UNITS_PER_EPSILON)
    if units < 1:
        raise QueryRefused(Refusal.INVALID_EPSILON, "ε must be at least 0.000001.")
    return units


def units_to_epsilon(units: int) -> float:
    return units / UNITS_PER_EPSILON


def split_units(total: int, parts: int) -> list[int]:
    """Split a budget into ``parts`` integer shares that add up exactly to ``total``."""
    if parts < 1 or total < parts:
        raise QueryRefused(
            Refusal.INVALID_EPSILON, "ε is too small to share between the requested aggregates."
        )
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def split_units_weighted(total: int, weights: list[float]) -> list[int]:
    """Split a budget into integer shares proportional to ``weights``, adding up exactly."""
    if not weights or total < len(weights) or any(w <= 0 for w in weights):
        raise QueryRefused(
            Refusal.INVALID_EPSILON, "ε is too small to share between the requested aggregates."
        )
    scale = total / sum(weights)
    shares = [max(1, math.floor(w * scale)) for w in weights]
    shares[shares.index(max(shares))] += total - sum(shares)
    return shares


def discrete_laplace_std(scale: float) -> float:
    """Standard deviation of the discrete Laplace with the given scale."""
    alpha = math.exp(-1.0 / scale)
    return math.sqrt(2.0 * alpha) / (1.0 - alpha)


def discrete_laplace_tail(scale: float, k: int) -> float:
    """P(|X| > k) for the discrete Laplace."""
    alpha = math.exp(-1.0 / scale)
    return 2.0 * alpha ** (k + 1) / (1.0 + alpha)


def discrete_laplace_halfwidth(scale: float, confidence: float = 0.95) -> int:
    """Smallest whole k with P(|X| <= k) >= confidence: the interval value ± k covers the truth
    with at least that probability (exactly, not by approximation)."""
    miss = 1.0 - confidence
    alpha = math.exp(-1.0 / scale)
    k = max(0, math.ceil(math.log(miss * (1.0 + alpha) / 2.0) / math.log(alpha)) - 1)
    while k > 0 and discrete_laplace_tail(scale, k - 1) <= miss:
        k -= 1
    while discrete_laplace_tail(scale, k) > miss:
        k += 1
    return k


@dataclass(frozen=True)
class Interval:
    low: float
    high: float


def count_interval(value: int, scale: float, confidence: float = 0.95) -> Interval:
    k = discrete_laplace_halfwidth(scale, confidence)
    return Interval(value - k, value + k)


def ratio_estimate(
    noisy_sum: float, sum_std: float, noisy_count: float, count_std: float, lower: int, upper: int
) -> tuple[float | None, Interval | None]:
    """A mean as a ratio of noisy sum and noisy count, clamped to the column bounds, with an
    approximate 95% interval (delta method). None when the noisy count is not positive."""
    if noisy_count <= 0:
        return None, None
    mean = min(max(noisy_sum / noisy_count, lower), upper)
    std = math.sqrt(sum_std**2 + (mean * count_std) ** 2) / noisy_count
    half = Z95 * std
    return mean, Interval(max(lower, mean - half), min(upper, mean + half))
