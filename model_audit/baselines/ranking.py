"""Agreement of a baseline's per-group scores with the own metric's: rank correlations and
the overlap of the top groups (:func:`agreement`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

import numpy as np

from ..core.stats import kendall_tau_b, spearman


@dataclass(frozen=True)
class Agreement:
    """Rank agreement of a baseline with the own metric over the groups."""

    spearman: Optional[float]       # Spearman's rho (average ranks for ties)
    kendall: Optional[float]        # Kendall's tau-b
    topk_overlap: Optional[float]   # |top-k by the baseline & flagged| / k, k = #flagged
    n: int = 0                      # groups compared (both scores finite)
    k: int = 0                      # flagged groups

    def to_dict(self) -> Dict[str, Any]:
        return {"spearman": self.spearman, "kendall": self.kendall,
                "topk_overlap": self.topk_overlap, "n": self.n, "k": self.k}


def agreement(own_scores: Sequence[float], other_scores: Sequence[float],
              flagged: Sequence[bool]) -> Agreement:
    """How far a baseline's group scores agree with the own metric's.

    ``spearman`` and ``kendall`` (tau-b) compare the two rankings over the groups where both
    scores are finite (NaN, e.g. a bare-parameter group under a layer method, is dropped
    pairwise); fewer than 3 such groups, or a constant vector, gives None. ``topk_overlap`` is
    the fraction of the own metric's ``k`` flagged groups that are among the baseline's ``k``
    highest-scoring groups (NaN scores are never among them; ties at the k-th place are broken
    by group order); None when nothing is flagged.
    """
    own = np.asarray(own_scores, dtype=np.float64).ravel()
    other = np.asarray(other_scores, dtype=np.float64).ravel()
    flags = np.asarray(flagged, dtype=bool).ravel()
    if not (len(own) == len(other) == len(flags)):
        raise ValueError(f"lengths differ: own {len(own)}, other {len(other)}, "
                         f"flagged {len(flags)}")
    valid = np.isfinite(own) & np.isfinite(other)
    n = int(valid.sum())
    rho = tau = None
    if n >= 3:
        rho = spearman(own[valid], other[valid])
        tau = kendall_tau_b(own[valid], other[valid])
    k = int(flags.sum())
    overlap = None
    if k > 0:
        key = np.where(np.isfinite(other), other, -np.inf)
        order = np.argsort(-key, kind="mergesort")
        top = [j for j in order[:k] if np.isfinite(other[j])]
        overlap = float(flags[top].sum()) / k
    return Agreement(rho, tau, overlap, n, k)
