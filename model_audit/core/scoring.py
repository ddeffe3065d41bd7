"""Scoring localisation: where a method ranks the group that holds a known fault.

Used by ``model-audit sanity`` (faults planted by :mod:`model_audit.core.plant`) and by the
localisation benchmark: the rank of the planted group under each method, top-1, MRR and
their chance levels, and the evidence a scan reads to choose its method. The summaries over
planted cases and the per-method scores of a scan are in :mod:`model_audit.results.sanity`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .attribution import METRIC_NAME
from .layers import LayerGroup
from .stats import max_sign_flip_p, p_value

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


#: ``--method auto`` leaves the default ranking for the method with the best MRR on this model's
#: planted faults when its lead passes :meth:`MethodEvidence.choice`'s test at this level. It
#: is a selection, not a discovery: the level asks that chance, with the best of the
#: alternatives picked, give such a lead less often than not. At 0.05 the default sanity run
#: (about a dozen faults) would have kept the default on the digits sample, where the localize
#: bench finds ``alone_net`` far better (top-1 0.73 against 0.47 on 59 faults); at 0.5 it keeps
#: the default on the reference SGD ResNet-18, where Auto-RGN's lead of 0.004 MRR on 13 faults
#: is chance (p 0.77) and the bench finds it worse (0.59 against 0.69). bench/RESULTS.md,
#: section 2.
AUTO_ALPHA = 0.5


@dataclass(frozen=True)
class MethodChoice:
    """Which method ``--method auto`` ranks with, and the test behind the choice.

    The reference is the scan's default ranking. The method with the highest MRR on the
    planted faults replaces it when its reciprocal ranks of the planted groups beat the
    reference's, fault by fault, by more than chance gives: the max-statistic sign-flip test
    of :func:`~model_audit.core.stats.max_sign_flip_p` (one-sided, exact up to 16 faults that
    differ), corrected for having picked the best of the alternatives, at level
    :data:`AUTO_ALPHA`. A lead of a few thousandths of MRR on a dozen faults does not move the
    ranking away from the default.
    """

    method: str                 # the method chosen
    reference: str              # the default ranking it had to beat
    rival: Optional[str]        # the alternative with the highest MRR (None: no alternative)
    p_value: Optional[float]    # of the rival's gain over the reference; None: not tested
    n: int                      # planted faults paired
    gain: Optional[float] = None  # the rival's MRR minus the reference's, on those faults
    alpha: float = AUTO_ALPHA

    def sentence(self) -> str:
        """One clause: why this method (for the scan's trust line and sanity's verdict)."""
        if self.rival is None:
            return f"{self.reference} was the only method measured"
        if self.p_value is None:
            return (f"kept {self.reference}: the evidence has no per-fault ranks to test "
                    f"{self.rival} against it")
        test = (f"one-sided sign-flip test over {self.n} faults, corrected for picking the "
                f"best of the other methods: p {p_value(self.p_value)}")
        if self.method != self.reference:
            return (f"{self.method} beat the default {self.reference} on this model's planted "
                    f"faults (MRR +{self.gain:.3f}; {test} < {self.alpha})")
        if (self.gain or 0.0) <= 0:
            return (f"kept the default {self.reference}: no other method localised the planted "
                    f"faults better (the closest, {self.rival}: MRR {self.gain:+.3f} over "
                    f"{self.n} faults)")
        return (f"kept the default {self.reference}: the lead of the best other method, "
                f"{self.rival} (MRR {self.gain:+.3f}), is within chance ({test} >= "
                f"{self.alpha})")

    def to_dict(self) -> Dict[str, Any]:
        return {"method": self.method, "reference": self.reference, "rival": self.rival,
                "p_value": self.p_value, "n": self.n, "gain": self.gain, "alpha": self.alpha,
                "test": "max-statistic sign-flip, one-sided, per planted fault"}


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
    # per method, the reciprocal rank of the planted group in each fault that reached its
    # drop (one order of faults for every method; NaN where a method was not computed)
    reciprocal: Mapping[str, Tuple[float, ...]] = field(default_factory=dict)

    def best(self, available: Sequence[str] = ()) -> str:
        """The method ``--method auto`` ranks with (:meth:`choice`)."""
        return self.choice(available).method

    def choice(self, available: Sequence[str] = ()) -> MethodChoice:
        """The default ranking, unless another method localised the planted faults better
        beyond noise (:class:`MethodChoice`). Baselines count only when ``available``
        (computable on this probe) names them; the random ranking never. Without the default
        among the measured methods, the own metric is the reference."""
        names = [m for m, s in self.summary.items()
                 if m != RANDOM and s.mrr is not None and (m == self.own or m in available)]
        if not names:
            return MethodChoice(self.own, self.own, None, None, 0)
        reference = DEFAULT_METHOD if DEFAULT_METHOD in names else (
            self.own if self.own in names else names[0])
        others = [m for m in names if m != reference]
        if not others:
            return MethodChoice(reference, reference, None, None, 0)

        def by_summary(m: str) -> Tuple[float, float, bool]:
            s = self.summary[m]
            return (s.mrr or 0.0, s.top1 or 0.0, m == self.own)

        if not all(m in self.reciprocal for m in names):
            rival = max(others, key=by_summary)
            return MethodChoice(reference, reference, rival, None, 0)
        rr = np.array([self.reciprocal[m] for m in [reference] + others], dtype=np.float64).T
        rr = rr[np.all(np.isfinite(rr), axis=1)]
        gains = rr[:, 1:] - rr[:, :1]                  # (faults, alternatives)
        sums = gains.sum(axis=0)
        j = max(range(len(others)), key=lambda k: (round(float(sums[k]), 9),
                                                   *by_summary(others[k])[1:]))
        rival, n = others[j], len(rr)
        p = max_sign_flip_p(gains) if n else 1.0
        gain = float(sums[j]) / n if n else 0.0
        chosen = rival if (n and gain > 0 and p < AUTO_ALPHA) else reference
        return MethodChoice(chosen, reference, rival, p, n, gain)

    @classmethod
    def from_dict(cls, d: Dict[str, Any], source: str) -> "MethodEvidence":
        """The evidence of a ``sanity.json`` (KeyError/TypeError/ValueError when it is not
        one)."""
        summary = {m: MethodSummary(v.get("top1"), v.get("mrr"), int(v.get("n", 0)),
                                    v.get("top1_sd"), v.get("mrr_sd"), v.get("flag_hit"),
                                    v.get("flagged_size"))
                   for m, v in d["methods"].items()}
        probe = d.get("probe") or {}
        cases = [c for c in d.get("cases") or () if c.get("reached", True)]
        reciprocal = {m: tuple(float((c.get("reciprocal_rank") or {}).get(m, np.nan))
                               for c in cases)
                      for m in summary} if cases else {}
        return cls(summary, (float(d["chance"]["top1"]), float(d["chance"]["mrr"])),
                   (d.get("model") or {}).get("sha256"), int(probe.get("n", 0)),
                   tuple(probe.get("classes") or ()), str(d.get("metric") or METRIC_NAME),
                   source, reciprocal)


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


