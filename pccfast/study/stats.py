"""Paired statistics for the study's comparisons: mean difference, 95% t-interval, p-value.

Every comparison of the study is paired by seed: two arms of one seed share the data subset,
the validation split and the initial weights, so the per-seed differences carry the comparison
and their spread is the noise that matters. The interval is Student's t on those differences
(``scipy.stats``); with one pair there is no interval. The secondary comparisons are many, so
the report also gives each a Holm-adjusted p-value (:func:`holm`): those under 0.05 hold
together at a 5% family-wise error rate, whatever the others show.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LEVEL = 0.95


@dataclass(frozen=True)
class Paired:
    """Differences a - b paired by seed, in accuracy fractions (the report shows points)."""

    n: int
    mean: float
    sd: float        # sample standard deviation of the differences (0 for n = 1)
    low: float       # 95% t-interval of the mean difference (nan for n < 2)
    high: float
    p: float         # two-sided p-value of "mean difference = 0" (nan for n < 2 or sd = 0)
    # (for sd = 0, low = high = mean: ``no_spread`` says so, and the report prints no interval)

    @property
    def no_spread(self) -> bool:
        """Every seed gave the same difference (e.g. both arms exactly at chance): the t-interval
        collapses to a point and there is nothing to test, which is not certainty."""
        return self.n >= 2 and self.sd == 0

    @property
    def tested(self) -> bool:
        """Whether there is a p-value: two seeds or more, and some spread."""
        return self.n >= 2 and not self.no_spread and not math.isnan(self.p)

    @property
    def excludes_zero(self) -> bool:
        return self.tested and (self.low > 0 or self.high < 0)

    @property
    def bound(self) -> float:
        """The largest effect the interval leaves possible: max(|low|, |high|)."""
        return max(abs(self.low), abs(self.high))


def paired(differences: list[float]) -> Paired:
    """The statistics of per-seed differences (at least one)."""
    if not differences:
        raise ValueError("paired() needs at least one difference")
    values = [float(v) for v in differences]
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"paired(): differences must be finite, got {values}")
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return Paired(n, mean, 0.0, math.nan, math.nan, math.nan)
    from scipy import stats

    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.5 + LEVEL / 2, n - 1) * sd / math.sqrt(n)
    if sd > 0:
        p = float(2 * stats.t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))
    else:
        p = 0.0 if mean != 0 else math.nan
    return Paired(n, mean, sd, mean - half, mean + half, p)


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input's order: with the m finite p-values
    sorted ascending, the i-th (from 0) becomes ``max over j <= i of min(1, (m - j) p_(j))``.
    Rejecting every comparison whose adjusted p is under alpha keeps the chance of any false
    rejection under alpha (no independence needed). nan entries (nothing to test) stay nan
    and do not count in m."""
    values = [float(p) for p in pvalues]
    if any(not (math.isnan(p) or 0.0 <= p <= 1.0) for p in values):
        raise ValueError(f"holm(): p-values must lie in [0, 1] (or be nan), got {values}")
    order = sorted((i for i, p in enumerate(values) if not math.isnan(p)),
                   key=lambda i: values[i])
    adjusted = [math.nan] * len(values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * values[i]))
        adjusted[i] = running
    return adjusted


def pair_by_seed(a: dict, b: dict) -> list[float]:
    """``a[seed] - b[seed]`` over the seeds both have, in seed order."""
    return [a[s] - b[s] for s in sorted(set(a) & set(b))]


def scipy_missing() -> str | None:
    """Why the report has no intervals (scipy missing), else None."""
    import importlib.util

    return (None if importlib.util.find_spec("scipy")
            else "scipy is not installed (pip install scipy)")


def reading(stat: Paired, what: str) -> str:
    """One sentence saying what the interval allows, and nothing stronger."""
    if stat.n < 2:
        return (f"{what}: {100 * stat.mean:+.2f} points from one seed; no interval, so no "
                "conclusion.")
    if stat.no_spread:
        return (f"{what}: {100 * stat.mean:+.2f} points in every one of n = {stat.n} seeds; no "
                "spread, so no interval and no test.")
    text = (f"{what}: {100 * stat.mean:+.2f} points, 95% interval [{100 * stat.low:+.2f}, "
            f"{100 * stat.high:+.2f}], p = {stat.p:.3g}, n = {stat.n} seeds")
    if stat.excludes_zero:
        return text + " — the interval excludes 0."
    return (text + f" — no effect shown; effects from {100 * stat.low:+.2f} to "
            f"{100 * stat.high:+.2f} points remain possible, none larger than "
            f"{100 * stat.bound:.2f} points.")
