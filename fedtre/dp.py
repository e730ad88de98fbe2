"""Differential-privacy arithmetic shared by node and coordinator. No noise is drawn here.

* Budget is kept in integer micro-epsilon units so that ledgers add up exactly.
* The spread and interval of OpenDP's discrete Laplace (integer inputs to ``make_laplace``):
  P(X = k) ∝ α^|k| with α = exp(-1/scale).
* The interval of a sum of independent discrete Laplace variables (a federated count: one noisy
  answer per trust, added up), computed numerically but conservatively (``sum_halfwidth``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from fedtre.errors import QueryRefused, Refusal

UNITS_PER_EPSILON = 1_000_000
MAX_EPSILON = 100.0
Z95 = 1.959963984540054
DISCRETE_LAPLACE = "opendp.discrete_laplace"
"""The mechanism name nodes record on each released statistic (``node.release.MECHANISM``)."""


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
    noisy_sum: float,
    sum_std: float,
    noisy_count: float,
    count_std: float,
    lower: int,
    upper: int,
    confidence: float = 0.95,
) -> tuple[float | None, Interval | None]:
    """A mean as a ratio of noisy sum and noisy count, clamped to the column bounds, with an
    approximate interval (delta method; 95% unless asked otherwise). None when the noisy count
    is not positive."""
    if noisy_count <= 0:
        return None, None
    z = Z95 if confidence == 0.95 else NormalDist().inv_cdf(0.5 + confidence / 2)
    mean = min(max(noisy_sum / noisy_count, lower), upper)
    half = z * ratio_std_error(mean, sum_std, noisy_count, count_std)
    return mean, Interval(max(lower, mean - half), min(upper, mean + half))


def ratio_std_error(mean: float, sum_std: float, noisy_count: float, count_std: float) -> float:
    """The delta-method standard error of a mean estimated as noisy sum / noisy count."""
    return math.sqrt(sum_std**2 + (mean * count_std) ** 2) / noisy_count


# -- sums of independent discrete Laplace variables (a federated count) ------------------------
#
# The coordinator adds the trusts' noisy answers, so the error of a federated count is a sum of
# independent discrete Laplace variables with (possibly) different scales. Its distribution has
# no closed form; ``sum_halfwidth`` computes it numerically from the characteristic function
# (exact for each term) and errs only towards wider intervals:
#
# 1. Binning (large scales only). The sum is carried on a lattice of ``grid`` points. If its
#    spread does not fit, each term X_i is replaced by Y_i, X_i rounded to the nearest multiple
#    of an odd step h. The masses of Y_i/h have a closed form (the discrete Laplace's tail
#    formula: a point mass at 0 plus a geometric tail with ratio α^h), hence so does its
#    characteristic function. |X_i - Y_i| <= (h - 1)/2, so |S| <= |S'| + n(h - 1)/2 always,
#    and that many units are added to the half-width. With h = 1 nothing is binned.
# 2. Wrap-around. An inverse FFT of the characteristic function on L points gives the
#    distribution of S'/h folded modulo L, which can only add mass to [-k, k]; the added mass is
#    at most P(|S'/h| >= L/2), and L is chosen so that a Chernoff bound on it (from the exact
#    moment generating functions) is at most ``_ALIAS_MASS``. That much, and ``_FLOAT_SLACK``
#    for rounding in the transform and the running sums, is demanded on top of the confidence.

_SUM_GRID = 1 << 16
_ALIAS_MASS = 1e-10
_FLOAT_SLACK = 1e-10
_MAX_CONFIDENCE = 1.0 - 1e-6
_MAX_SCALE = 1e12


def sum_halfwidth(scales: Sequence[float], confidence: float = 0.95) -> int:
    """Smallest whole k with P(|X_1 + ... + X_n| <= k) >= confidence, for independent discrete
    Laplace X_i with the given scales, up to the conservative numerics described above: the
    interval value ± k never covers less than stated. With one scale it is
    ``discrete_laplace_halfwidth``; with several and no binning it is the exact k unless the
    coverage of k - 1 falls within about 2e-10 of the confidence; binning (scales in the
    thousands and above) adds a few tenths of a percent."""
    checked = _check_scales(scales)
    if not 0.0 < confidence <= _MAX_CONFIDENCE:
        raise ValueError(f"confidence must be in (0, {_MAX_CONFIDENCE}]")
    if len(checked) == 1:
        return discrete_laplace_halfwidth(checked[0], confidence)
    return _sum_halfwidth(tuple(sorted(checked)), confidence, _SUM_GRID)


def sum_interval(value: int, scales: Sequence[float], confidence: float = 0.95) -> Interval:
    """value ± ``sum_halfwidth``: covers the truth with at least ``confidence`` probability when
    ``value`` is the truth plus independent discrete Laplace noise of each scale."""
    k = sum_halfwidth(scales, confidence)
    return Interval(value - k, value + k)


def _check_scales(scales: Sequence[float]) -> list[float]:
    out = [float(s) for s in scales]
    if not out:
        raise ValueError("at least one noise scale is needed")
    if not all(math.isfinite(s) and 0.0 < s <= _MAX_SCALE for s in out):
        raise ValueError(f"noise scales must be positive, finite and at most {_MAX_SCALE:g}")
    return out


def _chernoff_reach(scales: np.ndarray, mass: float) -> int:
    """A whole K with P(|X_1 + ... + X_n| >= K) <= mass, from the discrete Laplace moment
    generating function M(t) = (1 - α)² / ((1 - α e^t)(1 - α e^-t)), t < 1/scale."""
    inv = 1.0 / scales
    t = (1.0 - np.geomspace(1e-3, 0.999, 96)) / scales.max()  # 0 < t < 1 / max scale
    log_m = (
        2.0 * np.log(-np.expm1(-inv))[:, None]
        - np.log(-np.expm1(t[None, :] - inv[:, None]))
        - np.log(-np.expm1(-t[None, :] - inv[:, None]))
    ).sum(axis=0)
    reach = (math.log(2.0 / mass) + log_m) / t
    return max(1, math.ceil(float(reach.min())))


@functools.lru_cache(maxsize=1024)
def _sum_halfwidth(scales: tuple[float, ...], confidence: float, grid: int) -> int:
    n = len(scales)
    b = np.asarray(scales, dtype=np.float64)
    reach = _chernoff_reach(b, _ALIAS_MASS)
    if 2 * reach + 2 <= grid:
        step, size = 1, max(64, 1 << (2 * reach + 1).bit_length())
    else:
        size = max(grid, 1 << (8 * n).bit_length())
        step = -(-(2 * reach - n) // (size - n))
        step += 1 - step % 2  # odd, so that bins are centred on their multiple of the step
    half = (step - 1) // 2
    # now step * size / 2 - n * half >= reach: |S'/step| >= size / 2 has probability <= mass

    inv = 1.0 / b
    alpha = np.exp(-inv)
    beta = np.exp(-step * inv)  # ratio of the binned tail, α^step
    one_minus_beta = -np.expm1(-step * inv)
    edge = np.exp(-(half + 1) * inv)  # α^(half + 1)
    first = edge * one_minus_beta / (1.0 + alpha)  # P(Y_i = ±step)
    # P(Y_i = 0) = P(|X_i| <= half) = 1 - 2 α^(half+1) / (1 + α), written without cancellation
    zero = (-np.expm1(-(half + 1) * inv) + alpha * -np.expm1(-half * inv)) / (1.0 + alpha)

    # characteristic function of each Y_i / step at t = 2πm/size, with s2 = sin²(t/2):
    # P(0) + 2 P(1) (1 - β - 2 s2) / ((1 - β)² + 4 β s2); multiplied term by term in place
    s2 = np.sin(np.arange(size // 2 + 1) * (math.pi / size)) ** 2
    two_s2 = 2.0 * s2
    cf = np.ones_like(s2)
    num = np.empty_like(s2)
    den = np.empty_like(s2)
    for i in range(n):
        np.multiply(s2, 4.0 * beta[i], out=den)
        den += one_minus_beta[i] ** 2
        np.subtract(one_minus_beta[i], two_s2, out=num)
        num *= 2.0 * first[i]
        num /= den
        num += zero[i]
        cf *= num
    pmf = np.fft.irfft(cf, n=size)  # the distribution of S'/step, folded modulo size
    covered = pmf[0] + 2.0 * np.concatenate(([0.0], np.cumsum(pmf[1 : size // 2])))
    enough = np.flatnonzero(covered >= confidence + _ALIAS_MASS + _FLOAT_SLACK)
    if enough.size == 0:  # cannot happen for confidence <= _MAX_CONFIDENCE; never guess
        raise ArithmeticError("the distribution of the sum could not be resolved")
    return step * int(enough[0]) + n * half
