"""Small statistics used across stages: rank correlations, set overlap, chance levels.

Implemented with numpy alone (scipy is not a runtime dependency) and tested against scipy.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence, Set

import numpy as np


def _valid_pairs(x: Sequence[float], y: Sequence[float]):
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    return a[keep], b[keep]


def rankdata(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties get the average of the ranks they span (``scipy.stats.rankdata``)."""
    a = np.asarray(values, dtype=np.float64).ravel()
    order = np.argsort(a, kind="mergesort")
    s = a[order]
    edges = np.flatnonzero(np.r_[True, s[1:] != s[:-1], True])
    average = (edges[:-1] + edges[1:] - 1) / 2.0 + 1.0
    tie_group = np.cumsum(np.r_[True, s[1:] != s[:-1]]) - 1
    ranks = np.empty(len(a))
    ranks[order] = average[tie_group]
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """Spearman's rho (Pearson correlation of average ranks); None when undefined.

    Undefined: fewer than 3 finite pairs, or a constant vector.

    Example:
        >>> spearman([1, 2, 3, 4], [10, 20, 30, 40])
        1.0
    """
    a, b = _valid_pairs(x, y)
    if len(a) < 3:
        return None
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra ** 2).sum() * (rb ** 2).sum()))
    if denom == 0:
        return None
    return float(np.clip((ra * rb).sum() / denom, -1.0, 1.0))


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """Kendall's tau-b (ties corrected); None when undefined.

    Example:
        >>> kendall_tau_b([1, 2, 3], [3, 2, 1])
        -1.0
    """
    a, b = _valid_pairs(x, y)
    n = len(a)
    if n < 3:
        return None
    da = np.sign(a[:, None] - a[None, :])
    db = np.sign(b[:, None] - b[None, :])
    iu = np.triu_indices(n, 1)
    s = float((da * db)[iu].sum())
    n0 = n * (n - 1) / 2
    ties_a = float((da[iu] == 0).sum())
    ties_b = float((db[iu] == 0).sum())
    denom = math.sqrt((n0 - ties_a) * (n0 - ties_b))
    if denom == 0:
        return None
    return float(np.clip(s / denom, -1.0, 1.0))


def jaccard(a: Set[str], b: Set[str]) -> Optional[float]:
    """|A & B| / |A | B|; None when both are empty."""
    union = a | b
    return len(a & b) / len(union) if union else None


def overlap_coefficient(a: Set[str], b: Set[str]) -> Optional[float]:
    """|A & B| / min(|A|, |B|) (Szymkiewicz-Simpson); None when either is empty."""
    smaller = min(len(a), len(b))
    return len(a & b) / smaller if smaller else None


def top_k(names: Sequence[str], scores: Sequence[float], k: int) -> Set[str]:
    """The ``k`` names with the highest scores (ties broken by order of appearance)."""
    order = sorted(range(len(names)), key=lambda i: (-float(scores[i]), i))
    return {names[i] for i in order[:k]}


def hypergeom_pmf(x: int, total: int, a: int, b: int) -> float:
    """P(|A & B| = x) for a random b-subset B of ``total`` items against a fixed a-subset A."""
    if x < max(0, a + b - total) or x > min(a, b):
        return 0.0
    return math.comb(a, x) * math.comb(total - a, b - x) / math.comb(total, b)


def hypergeom_sf(x: int, total: int, a: int, b: int) -> float:
    """P(|A & B| >= x) by chance (one-sided p-value of an overlap at least this large)."""
    return float(min(1.0, sum(hypergeom_pmf(k, total, a, b) for k in range(x, min(a, b) + 1))))


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar test of ``b`` vs ``c`` discordant pairs (a sign test).

    Under the null hypothesis each of the ``n = b + c`` discordant pairs goes either way with
    probability 1/2; the p-value is ``min(1, 2 * P(X <= min(b, c)))`` for ``X ~ Bin(n, 1/2)``,
    as ``scipy.stats.binomtest(b, n).pvalue``. Used for "fixed vs broken" (is the net change
    more than churn?) and for two repairs of the same model on the same images.

    Example:
        >>> round(mcnemar_exact(9, 1), 4), mcnemar_exact(5, 5)
        (0.0215, 1.0)
    """
    b, c = int(b), int(c)
    if b < 0 or c < 0:
        raise ValueError(f"counts must be >= 0, got {b}, {c}")
    n = b + c
    if n == 0 or b == c:
        return 1.0
    k = min(b, c)
    log_half_n = -n * math.log(2.0)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + log_half_n
             for i in range(k + 1)]
    top = max(terms)
    tail = math.exp(top) * sum(math.exp(t - top) for t in terms)
    return min(1.0, 2.0 * tail)


def percentile_interval(values: Iterable[Optional[float]], level: float = 0.95):
    """The central ``level`` percentile interval of the finite values, or None."""
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return None
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(arr, [tail, 100.0 - tail])
    return [float(lo), float(hi)]
