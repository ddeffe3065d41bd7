"""What ranks and flags a scan's groups, and how far it is to be trusted on this model.

By default the tool's own metric ranks the groups and its flag rule flags them. ``--method
NAME`` ranks by a baseline instead; ``--method auto`` by the method that localised planted
faults best on this model and probe, read from a ``sanity`` run (:class:`~model_audit.core.
scoring.MethodEvidence`). Given evidence, the scan says next to its ranking how often that
method ranked a planted fault's group first on this model (:meth:`Ranking.trust`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from ..baselines import BASELINES
from ..core.attribution import METRIC_NAME
from ..core.scoring import AUTO, OWN, RANDOM, MethodEvidence
from ..errors import ConfigError
from ..io.probe import ProbeSet
from ..models.checkpoint import LoadedCheckpoint


@dataclass(frozen=True)
class Ranking:
    """What ranks and flags the groups of a scan, and how far that method is to be trusted on
    this model (its localisation of planted faults, when sanity evidence was given)."""

    method: str                     # the own metric's name or a baseline's
    chosen_by: str                  # default | given (--method NAME) | sanity (--method auto)
    evidence: Optional[MethodEvidence] = None
    order: Tuple[str, ...] = ()     # the groups, the most responsible first

    def trust(self) -> str:
        """One line: the method, and its measured localisation on this model."""
        how = {"default": "the default", "given": "as asked",
               "sanity": "chosen by sanity on this model"}[self.chosen_by]
        ev = self.evidence
        if ev is None or self.method not in ev.summary:
            return (f"ranked by {self.method} ({how}); how far it localises on this model is "
                    "not measured: run `model-audit sanity` and pass its sanity.json with "
                    "--sanity")
        mine = ev.summary[self.method]
        others = "".join(f"; {m} {_pair(v.top1, v.mrr)}" for m, v in ev.summary.items()
                         if m not in (self.method, RANDOM))
        return (f"ranked by {self.method} ({how}): on {mine.n} faults planted in this model it "
                f"ranked the faulty group first in {_pct(mine.top1)} (top-1/MRR "
                f"{_pair(mine.top1, mine.mrr)}{others}; chance {_pair(*ev.chance)})")

    def to_dict(self) -> Dict[str, Any]:
        ev = self.evidence
        out: Dict[str, Any] = {"method": self.method, "chosen_by": self.chosen_by,
                               "order": list(self.order), "trust": self.trust()}
        if ev is not None:
            out["evidence"] = {"source": ev.source, "chance": {"top1": ev.chance[0],
                                                               "mrr": ev.chance[1]},
                               "methods": {m: v.to_dict() for m, v in ev.summary.items()}}
        return out


def _pair(top1: Optional[float], mrr: Optional[float]) -> str:
    return ("-" if top1 is None else f"{top1:.2f}") + "/" + ("-" if mrr is None else f"{mrr:.2f}")


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def choose_method(method: str, ev: Optional[MethodEvidence], ckpt: LoadedCheckpoint,
                  probe: ProbeSet, metric: str = METRIC_NAME) -> Tuple[str, str]:
    """(the method that ranks and flags: the own metric's name ``metric`` or a baseline's,
    how it was chosen: default, given or sanity), after checking that the sanity evidence
    ``ev`` is of this checkpoint, probe and own metric.

    Raises:
        ConfigError: evidence of another checkpoint (sha256), another probe, or another
            formulation of the own metric.
    """
    if ev is not None:
        if ev.sha256 and ev.sha256 != ckpt.sha256:
            raise ConfigError(
                f"{ev.source} is of another checkpoint (sha256 {ev.sha256[:12]}..., this one "
                f"{ckpt.sha256[:12]}...): run `model-audit sanity` on this checkpoint and "
                "probe, and give its sanity.json")
        if ev.probe_n and (ev.probe_n != len(probe) or (
                ev.probe_classes and tuple(ev.probe_classes) != tuple(probe.classes))):
            raise ConfigError(
                f"{ev.source} was measured on another probe ({ev.probe_n} images, classes "
                f"{', '.join(ev.probe_classes[:5])}...; this probe: {len(probe)} images): "
                "give the sanity.json of this checkpoint and probe")
        if ev.own != metric:
            raise ConfigError(
                f"{ev.source} measured the own metric {ev.own}, this scan computes {metric}: "
                f"give --metric {ev.own}, or the sanity.json of a `sanity --metric {metric}` run")
    if method == AUTO:
        if ev is None:
            raise ConfigError("--method auto needs sanity evidence (--sanity SANITY_JSON)")
        usable = [n for n in BASELINES
                  if not (probe.integer_inputs and BASELINES[n].scales_input)]
        return ev.best(usable), "sanity"
    if method == OWN:
        return metric, "default"
    return method, "given"


def ranked(names: Sequence[str], scores: np.ndarray) -> Tuple[str, ...]:
    """``names`` by ``scores``, the highest first (non-finite scores last; ties in the given
    order)."""
    values = np.asarray(scores, dtype=np.float64)
    values = np.where(np.isfinite(values), values, -np.inf)
    return tuple(names[i] for i in np.argsort(-values, kind="stable"))
