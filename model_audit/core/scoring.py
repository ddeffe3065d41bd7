"""Scoring localisation: where a method ranks the group that holds a known fault.

Used by ``model-audit sanity`` (faults planted by :mod:`model_audit.core.plant`) and by the
localisation benchmark: the rank of the planted group under each method, top-1, MRR and
their chance levels, and the evidence a scan reads to choose its method. The summaries over
planted cases and the per-method scores of a scan are in :mod:`model_audit.results.sanity`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .attribution import METRIC_NAME
from .layers import LayerGroup

#: The random ranking's name among the methods (the chance level every method must beat).
RANDOM = "random"


# ------------------------------------------------------------------------------------------
# Ranking and scoring


def rank_stats(scores: Sequence[float], true_index: int) -> Tuple[float, float, float]:
    """``(expected rank, top-1 hit, reciprocal rank)`` of group ``true_index`` under ``scores``.

    Ties are broken at random on average (see the module docstring); NaN scores rank last.

    >>> rank_stats([0.1, 0.7, 0.2], 1)
    (1.0, 1.0, 1.0)
    >>> rank_stats([0.5, 0.5, 0.0], 0)
    (1.5, 0.5, 0.75)
    """
    s = np.asarray(scores, dtype=np.float64)
    s = np.where(np.isfinite(s), s, -np.inf)
    mine = s[true_index]
    greater = int((s > mine).sum())
    tied = int((s == mine).sum())  # including the group itself
    positions = np.arange(greater + 1, greater + tied + 1, dtype=np.float64)
    return (float(positions.mean()), (1.0 / tied) if greater == 0 else 0.0,
            float((1.0 / positions).mean()))


def chance_levels(n_groups: int) -> Tuple[float, float]:
    """Top-1 and MRR of a uniformly random ranking of ``n_groups`` groups: ``1/G``, ``H_G/G``.

    >>> [round(v, 3) for v in chance_levels(7)]
    [0.143, 0.37]
    """
    if n_groups < 1:
        raise ValueError("at least one group is needed")
    harmonic = sum(1.0 / k for k in range(1, n_groups + 1))
    return 1.0 / n_groups, harmonic / n_groups


@dataclass(frozen=True)
class MethodSummary:
    """One method's localisation over the cases: top-1 and MRR, with their spread."""

    top1: Optional[float]
    mrr: Optional[float]
    n: int
    top1_sd: Optional[float] = None   # standard deviation over repeats (seeds), when > 1
    mrr_sd: Optional[float] = None
    flag_hit: Optional[float] = None  # the planted group among the flagged (own metric only)
    flagged_size: Optional[float] = None

    def to_dict(self) -> Dict[str, Any]:
        out = {"top1": self.top1, "mrr": self.mrr, "n": self.n}
        for key in ("top1_sd", "mrr_sd", "flag_hit", "flagged_size"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


#: ``ScanConfig.method`` values besides a baseline's name: the own metric, and the method that
#: localised best on this model (from sanity evidence).
OWN, AUTO = "own", "auto"

#: The method that ranks by the geometric mean of the own metric's and Auto-RGN's shares
#: (:func:`~model_audit.core.attribution.combined_scores`): the scan's default, chosen by the
#: localize benchmark (bench/RESULTS.md section 2).
COMBINED = "combined"
DEFAULT_METHOD = COMBINED


@dataclass(frozen=True)
class MethodEvidence:
    """How well each method localised faults planted in one model, scanned on one probe: the
    summary of a ``sanity`` run, with what identifies its checkpoint and probe."""

    summary: Dict[str, MethodSummary]   # by method: the own metric's name or a baseline's
    chance: Tuple[float, float]         # top-1 and MRR of a random ranking
    sha256: Optional[str]               # of the checkpoint the faults were planted in
    probe_n: int
    probe_classes: Tuple[str, ...]
    own: str = METRIC_NAME              # the own metric's key in ``summary``
    source: str = "sanity"              # where it came from (a sanity.json path)

    def best(self, available: Sequence[str] = ()) -> str:
        """The method that localised best: the highest MRR, then top-1 (as sanity's verdict
        reads them); on a tie the default ranking, then the own metric. Baselines count only when ``available``
        (computable on this probe) names them; the random ranking never."""
        names = [m for m, s in self.summary.items()
                 if m != RANDOM and s.mrr is not None and (m == self.own or m in available)]
        if not names:
            return self.own
        return max(names, key=lambda m: (self.summary[m].mrr, self.summary[m].top1 or 0.0,
                                         m == DEFAULT_METHOD, m == self.own))

    @classmethod
    def from_dict(cls, d: Dict[str, Any], source: str) -> "MethodEvidence":
        """The evidence of a ``sanity.json`` (KeyError/TypeError/ValueError when it is not
        one)."""
        summary = {m: MethodSummary(v.get("top1"), v.get("mrr"), int(v.get("n", 0)),
                                    v.get("top1_sd"), v.get("mrr_sd"), v.get("flag_hit"),
                                    v.get("flagged_size"))
                   for m, v in d["methods"].items()}
        probe = d.get("probe") or {}
        return cls(summary, (float(d["chance"]["top1"]), float(d["chance"]["mrr"])),
                   (d.get("model") or {}).get("sha256"), int(probe.get("n", 0)),
                   tuple(probe.get("classes") or ()), str(d.get("metric") or METRIC_NAME),
                   source)


# ------------------------------------------------------------------------------------------
# Per-case scores


def group_output_units(model: nn.Module, groups: Sequence[LayerGroup], x: torch.Tensor
                       ) -> np.ndarray:
    """Output elements per image of each group's module (NaN for a group without a module).

    Used to put the layer baselines in a size-normalised form (mean |attribution| per output
    unit instead of the sum, which favours the wide early layers).
    """
    units = np.full(len(groups), np.nan)
    hooks = []
    modules = dict(model.named_modules())

    def hook(j: int) -> Callable[..., None]:
        def record(_m: nn.Module, _i: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor):
                units[j] = out[0].numel()
        return record

    try:
        for j, g in enumerate(groups):
            if g.name in modules:
                hooks.append(modules[g.name].register_forward_hook(hook(j)))
        with torch.inference_mode():
            model.eval()(x[:1])
    finally:
        for h in hooks:
            h.remove()
    return units


