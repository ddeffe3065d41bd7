"""The scan's configuration and result: what ``scan`` returns and ``audit.json`` holds."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..baselines import BASELINES, DEFAULT_BASELINES, Agreement, BaselineResult, resolve_baselines
from ..core.alone import ALONE_METRIC_NAME
from ..core.attribution import (METRIC_NAME, NET_METRIC_NAME, GroupReductions, error_rows,
                                metric_shares)
from ..core.evaluate import EvaluationResult
from ..core.replay import ReplayConfig, ReplayResult
from ..core.scoring import (AUTO, COMBINED, DEFAULT_METHOD, OWN, RANDOM, MethodChoice,
                             MethodEvidence)
from ..errors import ConfigError
from ..io.files import header
from ..io.probe import ProbeSet
from ..io.records import AuditRecord, LayerScore
from ..models.checkpoint import LoadedCheckpoint
from ..options import AuditOptions
from .display import Displayable


METRIC_DOC = ("score = share of the misclassified images' cross-entropy removed when the group "
              "alone takes its beta-scheduled replay displacement")


NET_METRIC_DOC = ("score = share of the loss of the misclassified images and twice as many "
                  "correctly classified ones removed when the group alone takes its "
                  "beta-scheduled replay displacement, scaled by the best of 1, 4, 16, 64")


ALONE_METRIC_DOC = ("score = share of the loss of the misclassified images and twice as many "
                    "correctly classified ones removed when the group alone takes 3 gradient "
                    "steps on the misclassified images (its own step length)")


#: The own metric's formulations (``--metric``); see docs/method.md.
METRICS = {ALONE_METRIC_NAME: ALONE_METRIC_DOC, METRIC_NAME: METRIC_DOC,
           NET_METRIC_NAME: NET_METRIC_DOC}

COMBINED_DOC = ("ranked and flagged by sqrt(metric share x Auto-RGN share), normalised to sum "
                "1; the interval and flag frequency resample the metric's images, Auto-RGN's "
                "shares held fixed")


FLAG_RULE_DOC = ("flagged when score > max(parameter share, 1 / number of groups), or when "
                 "the group has the highest score (above 0)")


@dataclass(frozen=True)
class ScanConfig:
    """Everything a scan needs besides its two inputs."""

    options: AuditOptions = field(default_factory=AuditOptions)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    bootstrap: int = 200        # bootstrap resamples for the flag frequency (0: off)
    baselines: Tuple[str, ...] = DEFAULT_BASELINES   # Captum/Auto-RGN baselines beside the metric
    baseline_steps: int = 50    # n_steps of the path methods (conductance, IG, influence)
    metric: str = ALONE_METRIC_NAME   # the own metric: alone_net | replay_reduction | net_...
    method: str = DEFAULT_METHOD      # what ranks and flags: combined | own | a baseline | auto
    evidence: Optional[MethodEvidence] = None   # sanity evidence of this checkpoint and probe

    def validate(self) -> None:
        self.options.validate()
        self.replay.validate()
        if self.metric not in METRICS:
            raise ConfigError(f"unknown metric {self.metric!r}; valid: {', '.join(METRICS)}")
        if self.bootstrap < 0:
            raise ConfigError(f"bootstrap resamples must be >= 0, got {self.bootstrap}")
        resolve_baselines(list(self.baselines))
        if self.baseline_steps < 2:
            raise ConfigError(f"baseline steps must be >= 2, got {self.baseline_steps}")
        if self.method not in (OWN, AUTO, COMBINED) and self.method not in BASELINES:
            raise ConfigError(f"unknown method {self.method!r}; valid: {OWN} (the tool's "
                              f"metric), {AUTO} (the best on this model, from sanity evidence), "
                              f"{COMBINED} (the own metric with Auto-RGN) or a baseline: "
                              f"{', '.join(BASELINES)}")
        if self.method == AUTO and self.evidence is None:
            raise ConfigError("--method auto ranks with the method that localised best on this "
                              "model: give --sanity SANITY_JSON (written by `model-audit sanity` "
                              "on this checkpoint and probe), or let the CLI run sanity first "
                              "(scan --method auto without --sanity)")


@dataclass(frozen=True)
class Ranking:
    """What ranks and flags the groups of a scan, and how far that method is to be trusted on
    this model (its localisation of planted faults, when sanity evidence was given)."""

    method: str                     # the own metric's name or a baseline's
    chosen_by: str                  # default | given (--method NAME) | sanity (--method auto)
    evidence: Optional[MethodEvidence] = None
    order: Tuple[str, ...] = ()     # the groups, the most responsible first
    choice: Optional[MethodChoice] = None   # --method auto: the test behind the choice

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
        why = f"; {self.choice.sentence()}" if self.choice is not None else ""
        return (f"ranked by {self.method} ({how}): on {mine.n} faults planted in this model it "
                f"ranked the faulty group first in {_pct(mine.top1)} (top-1/MRR "
                f"{_pair(mine.top1, mine.mrr)}{others}; chance {_pair(*ev.chance)}){why}")

    def to_dict(self) -> Dict[str, Any]:
        ev = self.evidence
        out: Dict[str, Any] = {"method": self.method, "chosen_by": self.chosen_by,
                               "order": list(self.order), "trust": self.trust()}
        if ev is not None:
            out["evidence"] = {"source": ev.source, "chance": {"top1": ev.chance[0],
                                                               "mrr": ev.chance[1]},
                               "methods": {m: v.to_dict() for m, v in ev.summary.items()}}
        if self.choice is not None:
            out["choice"] = self.choice.to_dict()
        return out


def _pair(top1: Optional[float], mrr: Optional[float]) -> str:
    return ("-" if top1 is None else f"{top1:.2f}") + "/" + ("-" if mrr is None else f"{mrr:.2f}")


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


@dataclass(frozen=True, repr=False)
class ScanResult(Displayable):
    """The result of a scan; ``to_dict()`` is the content of ``audit.json``."""

    checkpoint: LoadedCheckpoint
    probe: ProbeSet
    evaluation: EvaluationResult
    layers: Tuple[LayerScore, ...]
    replay: Optional[ReplayResult]
    config: ScanConfig
    device: str
    timing: Dict[str, float]
    passes: Dict[str, int]
    warnings: Tuple[str, ...] = ()
    reductions: Optional[GroupReductions] = None
    baselines: Dict[str, BaselineResult] = field(default_factory=dict)
    agreement: Dict[str, Agreement] = field(default_factory=dict)
    metric_positions: Optional[Tuple[int, ...]] = None   # rows of ``reductions`` (net metric)
    ranking: Optional[Ranking] = None
    prior: Optional[Tuple[float, ...]] = None   # Auto-RGN's shares, when scores are combined

    @property
    def flagged(self) -> Tuple[str, ...]:
        return tuple(layer.name for layer in self.layers if layer.flagged)

    def rows(self) -> List[Dict[str, Any]]:
        """One row per layer group: parameters, score with its interval, flag frequency,
        flagged, and each baseline's share."""
        return [{"group": layer.name, "params": layer.params, "params_share": layer.share,
                 "score": layer.score, "score_low": layer.score_interval[0],
                 "score_high": layer.score_interval[1], "flag_frequency": layer.flag_frequency,
                 "flagged": layer.flagged, **dict(layer.baselines)} for layer in self.layers]

    def metric_shares(self) -> np.ndarray:
        """The own metric's per-group shares, not combined with a prior (what ``score`` is
        under ``--method own``)."""
        if self.reductions is None:
            return np.zeros(len(self.layers))
        rows = self.metric_positions
        return metric_shares(self.reductions.matrix.numpy(), None if rows is None
                             else error_rows(rows, self.evaluation.misclassified))

    def record(self) -> AuditRecord:
        """This scan as ``audit.json`` holds it: what compare, gate and fix read."""
        return AuditRecord.from_dict(self.to_dict())

    def cost(self) -> Dict[str, Dict[str, Any]]:
        """Wall time and passes of the own metric (replay + attribution) and each baseline."""
        own_s = self.timing.get("replay_s", 0.0) + self.timing.get("attribution_s", 0.0)
        own_fwd = self.passes["forward_images"] - self.evaluation.n
        costs = {self.config.metric: {"seconds": round(own_s, 4), "forward_images": own_fwd,
                               "backward_images": self.passes["backward_images"],
                               "relative_to_own": 1.0}}
        for name, b in self.baselines.items():
            costs[name] = {"seconds": round(b.seconds, 4), "forward_images": b.forward_images,
                           "backward_images": b.backward_images,
                           "relative_to_own": round(b.seconds / own_s, 4) if own_s > 0 else None}
        return costs

    def to_dict(self) -> Dict[str, Any]:
        ev = self.evaluation
        misclassified = [
            {"index": p, "source_index": int(self.probe.indices[p]), "label": int(ev.labels[p]),
             "prediction": int(ev.predictions[p]), "confidence": float(ev.confidences[p])}
            for p in ev.misclassified]
        model = self.checkpoint.to_dict()
        return {
            **header(),
            "model": model,
            "probe": {**self.probe.describe(), **ev.to_dict()},
            "metric": {"name": self.config.metric, "definition": METRICS[self.config.metric],
                       "flag_rule": FLAG_RULE_DOC,
                       **({"combined_with": "auto_rgn", "score": COMBINED_DOC}
                          if self.prior is not None else {})},
            "granularity": self.config.options.granularity,
            "layers": [layer.to_dict() for layer in self.layers],
            "flagged": list(self.flagged),
            "ranking": self.ranking.to_dict() if self.ranking else None,
            "replay": {**self.config.replay.to_dict(),
                       **(self.replay.to_dict() if self.replay else {"n": 0, "steps": []})},
            "damping": [s.to_dict() for s in self.replay.steps] if self.replay else [],
            "bootstrap": {"resamples": self.config.bootstrap, "seed": self.config.options.seed},
            "baselines": {name: {k: v for k, v in b.to_dict().items() if k not in ("scores", "raw")}
                          for name, b in self.baselines.items()},
            "agreement": {name: a.to_dict() for name, a in self.agreement.items()},
            "cost": self.cost(),
            "misclassified": misclassified,
            # r[i, g] per image (rows follow "index": the misclassified images, and for the
            # net reduction also the sampled correct ones): lets `compare` bootstrap over probe
            # samples from two audit.json files.
            "per_image": {
                "index": list(self.metric_positions) if self.metric_positions is not None
                else [m["index"] for m in misclassified],
                "reduction": ([[float(f"{v:.6g}") for v in row]
                               for row in self.reductions.matrix.tolist()]
                              if self.reductions is not None else []),
                # the fixed per-group share the scores are combined with (--method combined)
                **({"prior": [float(v) for v in self.prior]} if self.prior is not None else {}),
            },
            "timing": self.timing,
            "passes": self.passes,
            "seed": self.config.options.seed,
            "device": self.device,
            "options": self.config.options.to_dict(),
            "warnings": list(self.warnings),
        }
