"""Faults planted on purpose and how each method ranked their groups: what ``sanity`` returns
and ``sanity.json`` holds, with the per-method summaries and scores computed from them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..core.attribution import METRIC_NAME, combined_scores
from ..core.calibrate import PlantResult
from ..core.layers import LayerGroup
from ..core.plant import resolve_defects
from ..core.scoring import COMBINED, RANDOM, MethodSummary
from ..errors import ConfigError
from ..io.files import header
from .scan import ScanConfig, ScanResult
from .display import Displayable


@dataclass(frozen=True)
class SanityConfig:
    """What to plant, where, and how to scan the damaged copies."""

    defects: Tuple[str, ...] = ("noise", "reinit")
    drop: float = 0.10               # accuracy drop every defect is calibrated to cost
    tolerance: float = 0.01          # accepted distance of the drop from the target
    groups: Optional[Tuple[str, ...]] = None   # None: auto (every group, or an even spread)
    max_groups: int = 8              # auto: at most this many groups
    repeats: int = 1                 # seeds per (group, defect): seed, seed+1, ...
    max_evaluations: int = 14        # probe evaluations per calibration
    scan: Optional[ScanConfig] = None   # default: the scan's defaults

    def validate(self, groups: Sequence[LayerGroup]) -> None:
        resolve_defects(self.defects)
        if not 0 < self.drop < 1:
            raise ConfigError(f"--drop must be in (0, 1), got {self.drop}")
        if self.repeats < 1:
            raise ConfigError(f"--repeats must be >= 1, got {self.repeats}")
        if len(groups) < 2:
            raise ConfigError(
                f"the model has a single layer group ({groups[0].name if groups else 'none'}): "
                "there is nothing to localise; use --granularity block or module")
        if self.groups is not None:
            names = [g.name for g in groups]
            unknown = [g for g in self.groups if g not in names]
            if unknown:
                raise ConfigError(f"unknown group {', '.join(map(repr, unknown))}; valid: "
                                  f"{', '.join(names)}")
            if not self.groups:
                raise ConfigError("no group given; valid: auto or a comma-separated list of "
                                  f"{', '.join(names)}")


@dataclass(frozen=True)
class SanityCase:
    """One planted defect and how each method ranked its group."""

    plant: PlantResult
    ranks: Dict[str, float]          # expected rank of the planted group, per method
    top1: Dict[str, float]
    reciprocal: Dict[str, float]
    top_group: Dict[str, str]        # the group each method ranked first
    flagged: Tuple[str, ...]         # the own metric's flagged groups on the damaged copy
    scores: Dict[str, List[Optional[float]]]
    seconds: float

    def to_dict(self) -> Dict[str, Any]:
        return {**self.plant.to_dict(), "ranks": self.ranks, "top1": self.top1,
                "reciprocal_rank": self.reciprocal, "top_group": self.top_group,
                "flagged": list(self.flagged), "scores": self.scores,
                "seconds": round(self.seconds, 3)}


@dataclass(frozen=True)
class NullCase:
    """The unmodified model's scan: what scores and flags look like with nothing planted."""

    accuracy: float
    flagged: Tuple[str, ...]
    scores: Dict[str, List[Optional[float]]]
    top_group: Dict[str, str]
    score_high: Tuple[float, ...] = ()   # the own metric's bootstrap 97.5th percentiles

    def to_dict(self) -> Dict[str, Any]:
        return {"accuracy": self.accuracy, "flagged": list(self.flagged),
                "scores": self.scores, "top_group": self.top_group,
                "score_high": list(self.score_high)}


@dataclass(frozen=True, repr=False)
class SanityResult(Displayable):
    """Every case, the null scan, and each method's localisation against chance."""

    groups: Tuple[str, ...]          # every group of the model
    planted_groups: Tuple[str, ...]  # the groups defects were planted in
    selection: str                   # how they were chosen ("all", "given", an even spread)
    defects: Tuple[str, ...]
    drop: float
    cases: Tuple[SanityCase, ...]
    null: Optional[NullCase]
    methods: Tuple[str, ...]
    summary: Dict[str, MethodSummary]
    chance: Tuple[float, float]
    seconds: float
    not_applicable: Tuple[Tuple[str, str], ...] = ()   # (group, defect) pairs skipped by rule
    extra: Dict[str, Any] = field(default_factory=dict)

    def rows(self) -> List[Dict[str, Any]]:
        """One row per method (and chance): top-1 and MRR over the planted faults."""
        out: List[Dict[str, Any]] = [{"method": m, **s.to_dict()} for m, s in self.summary.items()]
        return out + [{"method": "chance", "top1": self.chance[0], "mrr": self.chance[1],
                       "n": None}]

    @property
    def unreached(self) -> Tuple[SanityCase, ...]:
        return tuple(c for c in self.cases if not c.plant.reached)

    def to_dict(self) -> Dict[str, Any]:
        """The content of ``sanity.json``."""
        return {**header(),
                "model": self.extra.get("model", {}), "probe": self.extra.get("probe", {}),
                "groups": list(self.groups), "planted_groups": list(self.planted_groups),
                "group_selection": self.selection, "defects": list(self.defects),
                "drop": self.drop, "metric": self.extra.get("metric", METRIC_NAME),
                "methods_order": list(self.methods),
                "methods": {m: s.to_dict() for m, s in self.summary.items()},
                "chance": {"top1": self.chance[0], "mrr": self.chance[1]},
                "cases": [c.to_dict() for c in self.cases],
                "not_reached": [{"group": c.plant.group, "defect": c.plant.defect,
                                 "seed": c.plant.seed, "drop": c.plant.drop}
                                for c in self.unreached],
                "not_applicable": [{"group": g, "defect": d} for g, d in self.not_applicable],
                "null": self.null.to_dict() if self.null else None,
                "seconds": round(self.seconds, 3), "options": self.extra.get("options", {})}


def summarize(cases: Sequence[SanityCase], methods: Sequence[str],
              own: str = METRIC_NAME) -> Dict[str, MethodSummary]:
    """Top-1 and MRR per method over the cases whose defect reached its target drop.

    The spread is the standard deviation of the per-seed means (when there are several seeds);
    the flag hit and flagged-set size are reported for the own metric ``own``.
    """
    used = [c for c in cases if c.plant.reached]
    out: Dict[str, MethodSummary] = {}
    seeds = sorted({c.plant.seed for c in used})
    for m in methods:
        rows = [c for c in used if m in c.top1]
        if not rows:
            out[m] = MethodSummary(None, None, 0)
            continue
        top1 = float(np.mean([c.top1[m] for c in rows]))
        mrr = float(np.mean([c.reciprocal[m] for c in rows]))
        sd_t = sd_m = None
        if len(seeds) > 1:
            by_seed = [[c for c in rows if c.plant.seed == s] for s in seeds]
            by_seed = [b for b in by_seed if b]
            sd_t = float(np.std([np.mean([c.top1[m] for c in b]) for b in by_seed], ddof=1))
            sd_m = float(np.std([np.mean([c.reciprocal[m] for c in b]) for b in by_seed],
                                ddof=1))
        hit = size = None
        if m == own:
            hit = float(np.mean([c.plant.group in c.flagged for c in rows]))
            size = float(np.mean([len(c.flagged) for c in rows]))
        out[m] = MethodSummary(top1, mrr, len(rows), sd_t, sd_m, hit, size)
    return out


def scores_by_method(result: ScanResult, *, units: Optional[np.ndarray] = None,
                     random_seed: int = 0) -> Dict[str, np.ndarray]:
    """Every method's per-group scores from one :class:`~model_audit.results.scan.ScanResult`.

    The own metric (named after the scan's ``metric``) and its size-normalised variants
    (``<metric>_per_param``: mean loss reduction per parameter of the group;
    ``<metric>_per_sqrt_param``: per square root of its parameter count), each
    baseline that ran, its per-output-unit form (``<name>_per_unit``) when ``units`` is given,
    and ``random`` (seeded uniform scores).
    """
    params = np.array([layer.params for layer in result.layers], dtype=np.float64)
    reduction = np.array([layer.reduction for layer in result.layers], dtype=np.float64)
    own = result.config.metric
    out: Dict[str, np.ndarray] = {
        own: result.metric_shares(),   # the metric's own shares (its score may be combined)
        f"{own}_per_param": reduction / params,
        f"{own}_per_sqrt_param": reduction / np.sqrt(params),
    }
    for name, b in result.baselines.items():
        out[name] = np.asarray(b.scores, dtype=np.float64)
        if units is not None and name != "auto_rgn" and len(b.raw) == len(units):
            out[f"{name}_per_unit"] = np.asarray(b.raw, dtype=np.float64) / units
    if "auto_rgn" in result.baselines:
        out[COMBINED] = combined_scores(out[own], out["auto_rgn"])
    out[RANDOM] = np.random.default_rng(random_seed).random(len(params))
    return out
