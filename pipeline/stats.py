"""Uncertainty over questions: bootstrap intervals and a paired test (the evaluator and the report).

The evaluator's ``<headline>/ci95_low|high`` (``evaluate.bootstrap`` resamples, ``evaluate.seed``) and the
report's headline intervals (``report.bootstrap``, ``report.seed``) are both :func:`mean_interval`: with the
same resamples and seed they are the same numbers. The report shows only its own intervals.

Every comparison in the report is *paired*: two conditions answer the same questions, so with per-question
scores x_i (δ-mem) and y_i (a baseline), i = 1…n, we resample question indices, not the two lists apart.

* Mean interval (percentile bootstrap): draw B index vectors I_b ~ Uniform{1…n}^n and take the
  α/2 and 1−α/2 quantiles of  m_b = mean(x[I_b]).
* Paired difference: d_b = mean(x[I_b]) − mean(y[I_b]) → interval of Δ = x̄ − ȳ.
* Ratio (how the paper reports δ-mem, "1.10× the backbone"): ρ_b = mean(x[I_b]) / mean(y[I_b]) →
  interval of ρ = x̄ / ȳ. A resample whose baseline mean is 0 gives ρ_b = +∞ when its δ-mem mean is > 0
  and 1 when both are 0 (equal scores), so "the interval excludes 1.0×" keeps its meaning when the
  baseline scores nothing. The ratio itself is undefined when x̄ = ȳ = 0 (0/0: both score nothing): then
  ρ and its interval are NaN, which every output shows as "n/a", never as 1.00×.
* Paired permutation (sign-flip) test of H0 "the two conditions are exchangeable per question": with
  d_i = x_i − y_i, the statistic |mean(s ⊙ d)| over random signs s ∈ {±1}^n (all 2^n when n ≤ 16);
  p = (1 + #{|T_b| ≥ |T_obs|}) / (1 + B), two-sided.

Quantiles are nearest-rank order statistics (no interpolation), so infinite resamples are handled exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    """A point estimate with its ``confidence`` interval ``[low, high]``."""

    value: float
    low: float
    high: float
    confidence: float = 0.95

    def excludes(self, x: float) -> bool:
        """True when ``x`` lies outside ``[low, high]``."""
        return bool(self.low > x or self.high < x)


def _quantiles(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    s = np.sort(samples[~np.isnan(samples)])
    if s.size == 0:
        return math.nan, math.nan
    alpha = (1.0 - confidence) / 2.0
    lo = s[max(0, math.ceil(alpha * s.size) - 1)]
    hi = s[min(s.size - 1, math.ceil((1.0 - alpha) * s.size) - 1)]
    return float(lo), float(hi)


def _indices(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _as_array(values: Sequence[float], name: str) -> np.ndarray:
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"{name}: expected a non-empty list of per-question scores, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name}: per-question scores must be finite numbers")
    return x


def ratio(num: float, den: float) -> float:
    """``num / den`` with ``x/0 = +∞`` for x > 0 and ``0/0 = NaN`` (undefined: shown as "n/a")."""
    if den == 0:
        return math.inf if num > 0 else (math.nan if num == 0 else -math.inf)
    return num / den


def mean_interval(values: Sequence[float], resamples: int = 2000, seed: int = 0, confidence: float = 0.95) -> Interval:
    """Percentile-bootstrap interval of the mean of ``values``."""
    x = _as_array(values, "values")
    means = x[_indices(x.size, resamples, seed)].mean(axis=1)
    lo, hi = _quantiles(means, confidence)
    return Interval(float(x.mean()), lo, hi, confidence)


@dataclass(frozen=True)
class PairedComparison:
    """δ-mem (``x``) against a baseline (``y``) on the same ``n`` questions."""

    n: int
    mean_x: float
    mean_y: float
    difference: Interval  # x̄ − ȳ
    ratio: Interval  # x̄ / ȳ
    p_value: float  # two-sided paired permutation test


def paired_comparison(
    x: Sequence[float],
    y: Sequence[float],
    resamples: int = 2000,
    permutations: int = 10000,
    seed: int = 0,
    confidence: float = 0.95,
) -> PairedComparison:
    """Paired bootstrap intervals of the difference and the ratio of means, and the permutation p-value."""
    xa, ya = _as_array(x, "x"), _as_array(y, "y")
    if xa.size != ya.size:
        raise ValueError(f"paired scores must have the same length, got {xa.size} and {ya.size}")
    idx = _indices(xa.size, resamples, seed)
    mx, my = xa[idx].mean(axis=1), ya[idx].mean(axis=1)
    diff = mx - my
    with np.errstate(divide="ignore", invalid="ignore"):
        rat = np.where(
            my == 0, np.where(mx > 0, np.inf, np.where(mx == 0, 1.0, -np.inf)), mx / np.where(my == 0, 1, my)
        )
    d_lo, d_hi = _quantiles(diff, confidence)
    r_lo, r_hi = _quantiles(rat, confidence)
    x_bar, y_bar = float(xa.mean()), float(ya.mean())
    return PairedComparison(
        n=int(xa.size),
        mean_x=x_bar,
        mean_y=y_bar,
        difference=Interval(x_bar - y_bar, d_lo, d_hi, confidence),
        ratio=Interval(*((math.nan,) * 3 if x_bar == y_bar == 0 else (ratio(x_bar, y_bar), r_lo, r_hi)), confidence),
        p_value=sign_flip_p_value(xa - ya, permutations, seed),
    )


def sign_flip_p_value(d: Sequence[float] | np.ndarray, permutations: int = 10000, seed: int = 0) -> float:
    """Two-sided paired permutation test of mean(d) = 0 (exact enumeration when n ≤ 16)."""
    da = np.asarray(d, dtype=float)
    observed = abs(da.mean())
    if not np.any(da):
        return 1.0
    tol = 1e-12 * max(1.0, float(np.abs(da).max()))
    if da.size <= 16:
        signs = 1 - 2 * ((np.arange(2**da.size)[:, None] >> np.arange(da.size)) & 1)
        stats = np.abs((signs * da).mean(axis=1))
        return float(np.mean(stats >= observed - tol))
    rng = np.random.default_rng(seed)
    signs = rng.choice(np.array([-1.0, 1.0]), size=(permutations, da.size))
    stats = np.abs((signs * da).mean(axis=1))
    return float((1 + np.sum(stats >= observed - tol)) / (1 + permutations))
