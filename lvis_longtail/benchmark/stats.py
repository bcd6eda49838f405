"""Statistics of paired benchmark differences: Student-t intervals, a seed x class bootstrap,
and the number of seeds a target interval width needs.

Everything here is plain numpy (scipy is not a dependency). The Student-t quantile is found by
bisection on a numerically integrated t density, accurate to ~1e-6 for the degrees of freedom
a benchmark uses (1-100).
"""

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np


def t_pdf(x: np.ndarray, df: int) -> np.ndarray:
    """Density of Student's t with ``df`` degrees of freedom at ``x`` (any shape)."""
    logc = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return np.exp(logc - (df + 1) / 2 * np.log1p(np.asarray(x, dtype=np.float64) ** 2 / df))


def t_cdf(x: float, df: int) -> float:
    """P(T <= x) for Student's t (Simpson's rule on [0, |x|], by symmetry)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    n = 1200  # even
    grid = np.linspace(0.0, abs(x), n + 1)
    w = np.ones(n + 1)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    area = float((w * t_pdf(grid, df)).sum() * abs(x) / (3 * n))
    return 0.5 + math.copysign(area, x)


@functools.lru_cache(maxsize=1024)
def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t (``0 < p < 1``), by bisection on :func:`t_cdf`."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2 * hi
    for _ in range(40):  # hi - lo < 2^-40 * hi
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class PairedCI:
    """Mean of paired differences with a two-sided Student-t confidence interval.

    Attributes:
        mean: mean difference.
        std: sample standard deviation of the differences (ddof 1; nan for n = 1).
        n: number of pairs (seeds).
        low, high: interval bounds (nan for n < 2).
    """

    mean: float
    std: float
    n: int
    low: float
    high: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    @property
    def excludes_zero(self) -> bool:
        return self.n > 1 and (self.low > 0 or self.high < 0)


def paired_t_ci(diffs: Sequence[float], level: float = 0.95) -> PairedCI:
    """Paired-t interval of the mean of ``diffs`` (NaNs dropped)."""
    d = np.asarray([x for x in diffs if not math.isnan(x)], dtype=np.float64)
    n = int(d.size)
    if n == 0:
        nan = float("nan")
        return PairedCI(nan, nan, 0, nan, nan)
    mean = float(d.mean())
    if n == 1:
        return PairedCI(mean, float("nan"), 1, float("nan"), float("nan"))
    std = float(d.std(ddof=1))
    half = t_quantile(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    return PairedCI(mean, std, n, mean - half, mean + half)


def seeds_needed(std: float, half_width: float, level: float = 0.95, max_seeds: int = 100) -> int:
    """Smallest n >= 2 whose t interval ``t(n-1) * std / sqrt(n)`` is within ``half_width``.

    Returns ``max_seeds + 1`` when even ``max_seeds`` seeds are not enough (or std is nan).
    """
    if half_width <= 0:
        raise ValueError(f"half_width must be > 0, got {half_width}")
    if math.isnan(std):
        return max_seeds + 1
    for n in range(2, max_seeds + 1):
        if t_quantile(0.5 + level / 2, n - 1) * std / math.sqrt(n) <= half_width:
            return n
    return max_seeds + 1


def bootstrap_group_diff(
    method_ap: np.ndarray,
    base_ap: np.ndarray,
    num_samples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Optional[tuple]:
    """Percentile interval of a group-AP difference, resampling seeds and classes.

    Each bootstrap sample draws ``S`` seeds and ``C`` classes with replacement (the same draws
    for both methods, so the pairing is kept) and takes the mean over the drawn (seed, class)
    cells of ``method_ap - base_ap``. It adds the class-sampling noise of a small group (7
    rare classes) to the seed noise the t interval sees.

    Args:
        method_ap, base_ap: per-class AP, (S seeds, C classes); NaN cells (class not in a
            run's csv) are left out of each sample's mean.
        num_samples: bootstrap samples.
        level: interval coverage.
        seed: of the resampling generator (the interval is deterministic).

    Returns:
        (low, high), or None when there are fewer than 2 seeds or 2 classes or no values.
    """
    diff = np.asarray(method_ap, dtype=np.float64) - np.asarray(base_ap, dtype=np.float64)
    if diff.ndim != 2:
        raise ValueError(f"per-class AP must be (seeds, classes), got shape {diff.shape}")
    s, c = diff.shape
    if s < 2 or c < 2 or np.isnan(diff).all():
        return None
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, s, size=(num_samples, s, 1))
    classes = rng.integers(0, c, size=(num_samples, 1, c))
    cells = diff[seeds, classes]  # (B, S, C)
    with warnings.catch_warnings():  # a sample of only NaN cells gives NaN, left out below
        warnings.simplefilter("ignore", RuntimeWarning)
        means = np.nanmean(cells.reshape(num_samples, -1), axis=1)
    alpha = (1 - level) / 2
    low, high = np.nanquantile(means, [alpha, 1 - alpha])
    return float(low), float(high)
