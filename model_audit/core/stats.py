"""Statistics used across stages: rank correlations, set overlap, chance levels, exact tests.

The tests themselves are scipy.stats; the functions here add the tool's conventions (finite
pairs only, None where a statistic is undefined instead of NaN and a warning).
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence, Set, Tuple

import numpy as np
import scipy.stats


def _valid_pairs(x: Sequence[float], y: Sequence[float]) -> Tuple[np.ndarray, np.ndarray]:
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    return a[keep], b[keep]


def _defined(a: np.ndarray, b: np.ndarray) -> bool:
    """A rank correlation is defined on 3 or more pairs with neither side constant."""
    return len(a) >= 3 and np.ptp(a) > 0 and np.ptp(b) > 0


def spearman(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """``scipy.stats.spearmanr`` over the finite pairs; None where it is undefined (fewer than
    3 finite pairs, or a constant vector: scipy would warn and return NaN).

    Examples:
        >>> spearman([1, 2, 3, 4], [10, 20, 30, 40])
        1.0
    """
    a, b = _valid_pairs(x, y)
    if not _defined(a, b):
        return None
    return float(np.clip(scipy.stats.spearmanr(a, b)[0], -1.0, 1.0))


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """``scipy.stats.kendalltau`` (tau-b, ties corrected) over the finite pairs; None where it
    is undefined (as :func:`spearman`).

    Examples:
        >>> kendall_tau_b([1, 2, 3], [3, 2, 1])
        -1.0
    """
    a, b = _valid_pairs(x, y)
    if not _defined(a, b):
        return None
    return float(np.clip(scipy.stats.kendalltau(a, b)[0], -1.0, 1.0))


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


def hypergeom_sf(x: int, total: int, a: int, b: int) -> float:
    """P(|A & B| >= x) for a random b-subset B of ``total`` items against a fixed a-subset A:
    the one-sided p-value of an overlap at least this large by chance
    (``scipy.stats.hypergeom``).

    Examples:
        >>> round(hypergeom_sf(2, 7, 2, 2), 4)   # both of 2 flags among 7 groups: 1 / C(7, 2)
        0.0476
    """
    return float(min(1.0, scipy.stats.hypergeom.sf(x - 1, total, a, b)))


def mcnemar_exact(b: int, c: int, alternative: str = "two-sided") -> float:
    """Exact McNemar test of ``b`` vs ``c`` discordant pairs (a sign test).

    Under the null hypothesis each of the ``n = b + c`` discordant pairs goes either way with
    probability 1/2: ``scipy.stats.binomtest(b, n, 0.5, alternative).pvalue``, and 1.0 when
    there is no discordant pair. Used for "fixed vs broken" (is the net change more than
    churn?), for two repairs of the same model on the same images, and one-sided
    (``alternative="greater"``: are there more fixes than breaks?) for fix's validation.

    Examples:
        >>> round(mcnemar_exact(9, 1), 4), mcnemar_exact(5, 5)
        (0.0215, 1.0)
    """
    b, c = int(b), int(c)
    if b < 0 or c < 0:
        raise ValueError(f"counts must be >= 0, got {b}, {c}")
    if b + c == 0:
        return 1.0
    return float(min(1.0, scipy.stats.binomtest(b, b + c, 0.5,
                                                alternative=alternative).pvalue))


#: Up to this many images that change, the sign-flip test enumerates every flip (exact).
SIGN_FLIP_EXACT_UP_TO = 16
#: Random sign flips of the sign-flip test beyond that.
SIGN_FLIP_RESAMPLES = 9999


def max_sign_flip_p(differences: np.ndarray, observed: Optional[float] = None, *,
                    resamples: int = SIGN_FLIP_RESAMPLES, seed: int = 0) -> float:
    """One-sided p-value of the largest of K paired gains, corrected for having picked it.

    ``differences`` is (images, K): per image and per candidate state, +1 (wrong before,
    right in that state), -1 (right before, wrong in it) or 0. The statistic is the largest
    column sum (the best state's net; ``observed``, when given, is used instead, e.g. the best
    state among those allowed). Under the null hypothesis that no state is better than the
    original, each image's row is as likely to be negated (its before and after swapped):
    the p-value is the share of sign flips of the rows whose largest column sum reaches the
    observed one. This is the max-statistic permutation test of Westfall and Young (1993):
    it controls the error of picking the best of K states exactly, and loses far less power
    than Bonferroni when the states are correlated (the checkpoints of one repair are).

    Every flip is enumerated when at most :data:`SIGN_FLIP_EXACT_UP_TO` images change (an
    exact p-value); otherwise ``resamples`` random flips (seeded) and
    ``(1 + hits) / (1 + resamples)``. ``scipy.stats.permutation_test`` with
    ``permutation_type="samples"`` computes the same (tested) but holds every resample of the
    whole matrix in memory at once: tens of seconds for 1,000 images and 8 states.

    Examples:
        >>> max_sign_flip_p(np.array([[1], [1], [1]]))   # 3 fixes, no break: 1 flip in 8
        0.125
    """
    d = np.asarray(differences, dtype=np.float64)
    if d.ndim == 1:
        d = d[:, None]
    d = d[np.any(d != 0, axis=1)]
    if observed is None:
        observed = float(d.sum(0).max()) if len(d) else 0.0
    m = len(d)
    if m == 0:
        return 1.0
    if m <= SIGN_FLIP_EXACT_UP_TO:
        codes = np.arange(2 ** m)[:, None] >> np.arange(m)[None, :] & 1
        null = ((1 - 2 * codes) @ d).max(axis=1)
        return float(np.mean(null >= observed - 1e-9))
    rng = np.random.default_rng(seed)
    hits, left = 0, int(resamples)
    while left > 0:
        batch = min(left, 2000)
        signs = rng.integers(0, 2, size=(batch, m)) * 2 - 1
        hits += int(((signs @ d).max(axis=1) >= observed - 1e-9).sum())
        left -= batch
    return (1 + hits) / (1 + int(resamples))


def p_value(value: Optional[float]) -> str:
    """A p-value for tables: two significant digits, ``<0.001`` below that, ``-`` for None.

    >>> p_value(0.0412), p_value(0.00001), p_value(None)
    ('0.041', '<0.001', '-')
    """
    if value is None:
        return "-"
    return f"{value:.2g}" if value >= 0.001 else "<0.001"


def percentile_interval(values: Iterable[Optional[float]], level: float = 0.95):
    """The central ``level`` percentile interval of the finite values, or None."""
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return None
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(arr, [tail, 100.0 - tail])
    return [float(lo), float(hi)]
