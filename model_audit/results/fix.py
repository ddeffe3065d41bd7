"""A repair's configuration and result: the validation evidence of each run, the targeted
confusion, the controls' comparison with the selection (exact McNemar tests) and the verdict;
``FixResult.to_dict()`` is ``fix.json``."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..core.evaluate import EvaluationResult
from ..core.schedules import SCHEDULES
from ..core.stats import mcnemar_exact
from ..errors import ConfigError
from ..io.files import header
from ..io.probe import ProbeSet
from ..models.checkpoint import LoadedCheckpoint
from ..options import AuditOptions
from .repair import Target, Validation, check_share, target_summary
from .display import Displayable

#: The controls a repair is compared with (``--controls``).
CONTROLS = ("all", "random", "rgn")
#: ``--batchnorm``: all BatchNorm layers frozen, or those of the retrained groups in train mode.
BATCHNORM_MODES = ("frozen", "train")
#: Temperature of the preservation term (Hinton et al. 2015; Li and Hoiem's learning without
#: forgetting uses 2).
PRESERVE_TEMPERATURE = 2.0
#: ``--head-rows``: with a target, which rows of a retrained classifier head may change.
HEAD_ROWS = ("target", "all")


@dataclass(frozen=True)
class FixConfig:
    """Options of a repair (the model/probe options live in ``options``)."""

    options: AuditOptions = field(default_factory=AuditOptions)
    layers: Union[str, Tuple[str, ...]] = "auto"   # "auto" or group names
    steps: Optional[int] = 200          # optimizer steps (or give epochs)
    epochs: Optional[float] = None      # passes over the repair data (overrides steps)
    batch_size: int = 64                # images per step
    wrong_fraction: Optional[float] = None  # share of each batch drawn from the errors;
                                        # None ("natural"): sample the repair data uniformly
    lr: float = 0.01                    # peak learning rate (cosine to 0)
    schedule: str = "beta"              # momentum: beta | hybrid | constant
    batchnorm: str = "train"            # frozen: all BN in eval mode; train: BN layers of the
                                        # retrained groups normalise with batch statistics and
                                        # update their running statistics
    controls: Tuple[str, ...] = CONTROLS
    allow_overlap: bool = False
    train_limit: Optional[int] = None   # class-stratified subset of the repair data
    validation: float = 0.2             # share of the repair data held out to judge the repair
    preserve: float = 1.0               # weight of the preservation term (0: off); 1 measured
                                        # best of 0, 1, 3 (bench/RESULTS.md, "fix: repair
                                        # settings", 2026-12-07)
    target: Tuple[str, ...] = ()        # "TRUE:PRED" confusions, or ("auto",)
    target_fraction: float = 0.25       # with a target: share of each batch from its instances
                                        # (0.5, 0.25, 0.125 measured: bench/RESULTS.md,
                                        # "targeted repair", 2026-12-07)
    max_break: Optional[float] = None   # break budget: a kept state breaks at most this share
                                        # of the validation images the original gets right
    guard: bool = True                  # with a target: as many of the predicted class's right
                                        # images in each batch (the positive set)
    head_rows: str = "target"           # with a target, when the classifier head is retrained:
                                        # "target" changes only its rows (weights, bias) of the
                                        # confusions' predicted classes, "all" every row
                                        # (measured: bench/RESULTS.md, "targeted repair")
    write_anyway: bool = False          # write the best trained state even when not accepted
    evaluate_last: bool = False         # also evaluate each run's last state on the probe

    def validate(self) -> None:
        self.options.validate()
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        unknown = [c for c in self.controls if c not in CONTROLS]
        if unknown:
            raise ConfigError(f"unknown control(s) {', '.join(unknown)}; valid: "
                              f"{', '.join(CONTROLS)}, or none")
        if self.epochs is None and (self.steps is None or self.steps < 1):
            raise ConfigError("give steps >= 1 or epochs > 0")
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"epochs must be > 0, got {self.epochs}")
        if self.batch_size < 2:
            raise ConfigError(f"batch size must be >= 2, got {self.batch_size}")
        if self.batchnorm not in BATCHNORM_MODES:
            raise ConfigError(f"unknown batchnorm mode {self.batchnorm!r}; valid: "
                              f"{', '.join(BATCHNORM_MODES)}")
        if self.wrong_fraction is not None and not 0.0 <= self.wrong_fraction <= 1.0:
            raise ConfigError(f"wrong fraction must be between 0 and 1 (or natural), got "
                              f"{self.wrong_fraction}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"learning rate must be > 0, got {self.lr}")
        check_share(self.validation)
        if not (math.isfinite(self.preserve) and self.preserve >= 0):
            raise ConfigError(f"the preservation weight must be >= 0, got {self.preserve}")
        if self.max_break is not None and not 0.0 <= self.max_break < 1.0:
            raise ConfigError(f"the break budget must be in [0, 1) (a share of the images the "
                              f"model gets right, e.g. 0.005), got {self.max_break}")
        if self.head_rows not in HEAD_ROWS:
            raise ConfigError(f"unknown head rows {self.head_rows!r}; valid: "
                              f"{', '.join(HEAD_ROWS)}")
        if not 0.0 < self.target_fraction <= 1.0:
            raise ConfigError(f"the target fraction must be in (0, 1], got {self.target_fraction}")

    def to_dict(self) -> Dict[str, Any]:
        return {"layers": self.layers if isinstance(self.layers, str) else list(self.layers),
                "steps": self.steps, "epochs": self.epochs, "batch_size": self.batch_size,
                "wrong_fraction": self.wrong_fraction, "batchnorm": self.batchnorm,
                "lr": self.lr, "schedule": self.schedule, "controls": list(self.controls),
                "allow_overlap": self.allow_overlap, "train_limit": self.train_limit,
                "validation": self.validation, "preserve": self.preserve,
                "preserve_temperature": PRESERVE_TEMPERATURE, "target": list(self.target),
                "target_fraction": self.target_fraction, "guard": self.guard,
                "head_rows": self.head_rows,
                "max_break": self.max_break,
                "write_anyway": self.write_anyway,
                "evaluate_last": self.evaluate_last, "options": self.options.to_dict()}


#: Level of the exact McNemar tests in the verdict ("significantly" better/worse, net != 0).
SIGNIFICANCE_LEVEL = 0.05


@dataclass(frozen=True)
class RepairRun:
    """One retraining run (the selection or a control) and its effect on the probe."""

    name: str
    groups: Tuple[str, ...]
    trainable: int
    share: float
    steps: int
    seconds: float
    after: EvaluationResult
    before: EvaluationResult
    diverged: Optional[str] = None   # the message when this run's loss became NaN/Inf
    disjoint: Optional[bool] = None  # random control: trains no parameter of the selection
    validation: Optional[Validation] = None  # the trajectory on the validation part
    last: Optional[EvaluationResult] = None  # the last trained state on the probe, if asked
    head_rows: Tuple[str, ...] = ()  # the head retrained in these classes' rows only

    @cached_property
    def fixed(self) -> List[int]:
        return torch.nonzero((self.before.predictions != self.before.labels)
                             & (self.after.predictions == self.after.labels)).flatten().tolist()

    @cached_property
    def broken(self) -> List[int]:
        return torch.nonzero((self.before.predictions == self.before.labels)
                             & (self.after.predictions != self.after.labels)).flatten().tolist()

    @property
    def net(self) -> int:
        return len(self.fixed) - len(self.broken)

    def summary(self) -> Dict[str, Any]:
        return {"name": self.name, "groups": list(self.groups),
                "head_rows": list(self.head_rows) or None, "trainable_params": self.trainable,
                "params_percent": 100.0 * self.share, "steps": self.steps,
                "compute_param_steps": self.steps * self.trainable,
                "seconds": round(self.seconds, 3), "accuracy_before": self.before.accuracy,
                "accuracy_after": self.after.accuracy, "fixed": len(self.fixed),
                "broken": len(self.broken), "net": self.net,
                # exact McNemar (sign) test of fixed vs broken: how likely a net at least this
                # far from 0 is if each changed image were as likely to break as to be fixed
                "net_p_value": mcnemar_exact(len(self.fixed), len(self.broken)),
                "diverged": self.diverged, "disjoint_from_selection": self.disjoint,
                "accepted": self.validation.accepted if self.validation else None,
                "kept_step": self.validation.chosen if self.validation else None,
                "validation": self.validation.to_dict() if self.validation else None,
                "last_state": self._last()}

    def _last(self) -> Optional[Dict[str, Any]]:
        """The last trained state on the probe (what an unvalidated repair would have kept)."""
        if self.last is None:
            return None
        right0 = self.before.predictions == self.before.labels
        right1 = self.last.predictions == self.last.labels
        fixed, broken = int((~right0 & right1).sum()), int((right0 & ~right1).sum())
        return {"accuracy": self.last.accuracy, "fixed": fixed, "broken": broken,
                "net": fixed - broken, "net_p_value": mcnemar_exact(fixed, broken)}


def verdict(controls: Sequence[Dict[str, Any]], net_p_value: float,
            alpha: float = SIGNIFICANCE_LEVEL) -> Dict[str, Any]:
    """Did the flagged selection beat each control (and significantly, at ``alpha``)?

    ``controls`` are :meth:`FixResult.control_summaries`; ``net_p_value`` is the McNemar test
    of the selection's own fixed vs broken.
    """
    judged = [c for c in controls if c["flagged_beat_it"] is not None]
    return {"beat_all_controls": all(c["flagged_beat_it"] for c in judged) if judged else None,
            "beat": [c["name"] for c in controls if c["flagged_beat_it"]],
            "did_not_beat": [c["name"] for c in controls if c["flagged_beat_it"] is False],
            "diverged": [c["name"] for c in controls if c["diverged"]],
            "significance_level": alpha,
            "beat_significantly": [c["name"] for c in controls if c["flagged_beat_it"]
                                   and c["vs_flagged"]["p_value"] < alpha],
            "worse_significantly": [c["name"] for c in controls
                                    if c["flagged_beat_it"] is False
                                    and c["vs_flagged"]["p_value"] < alpha],
            "net_significant": net_p_value < alpha}


@dataclass(frozen=True, repr=False)
class FixResult(Displayable):
    """The repair, its controls and the written checkpoint."""

    checkpoint: LoadedCheckpoint
    probe: ProbeSet
    train_source: str
    train_n: int
    train_wrong: int
    selection: RepairRun
    controls: Tuple[RepairRun, ...]
    config: FixConfig
    output: Optional[str]
    output_sha256: Optional[str]
    verified_identical: int
    device: str
    timing: Dict[str, float]
    warnings: Tuple[str, ...] = ()
    selection_source: str = "names"
    written: bool = False                    # the repaired checkpoint was written
    holdout: Dict[str, Any] = field(default_factory=dict)  # the validation part
    target: Optional[Target] = None
    selection_scores: Optional[Dict[str, float]] = None  # the scan's score of every group
    #: the repaired model (a copy; the state validation kept), when a repair was found or
    #: written anyway; None otherwise
    repaired: Optional[nn.Module] = field(default=None, repr=False, compare=False)

    def rows(self) -> List[Dict[str, Any]]:
        """One row per run (the selection, then each control): groups, parameters, the
        state kept, fixed, broken, net and its McNemar p-value on the probe."""
        keys = ("name", "groups", "params_percent", "kept_step", "accepted", "fixed", "broken",
                "net", "net_p_value", "seconds")
        return [{k: run.summary()[k] for k in keys} for run in (self.selection, *self.controls)]

    @property
    def repair_found(self) -> bool:
        """Whether the flagged repair beat the original on validation by more than noise."""
        return bool(self.selection.validation and self.selection.validation.accepted)

    def control_summaries(self) -> List[Dict[str, Any]]:
        """Each control's summary, whether the flagged selection beat it, and the paired
        McNemar test against the selection on the same probe images."""
        sel = self.selection
        sel_right = sel.after.predictions == sel.after.labels
        controls = []
        for run in self.controls:
            s = run.summary()
            # a control that diverged produced no model to compare with
            s["flagged_beat_it"] = None if run.diverged else sel.net > run.net
            s["vs_flagged"] = None
            if not run.diverged:
                # paired on the same probe images: sel.net - run.net = only_flagged - only_control
                ctl_right = run.after.predictions == run.after.labels
                b = int((sel_right & ~ctl_right).sum())
                c = int((~sel_right & ctl_right).sum())
                s["vs_flagged"] = {"only_flagged_right": b, "only_control_right": c,
                                   "p_value": mcnemar_exact(b, c)}
            controls.append(s)
        return controls

    def per_class(self) -> List[Dict[str, Any]]:
        """Accuracy before and after, fixed and broken, for each class on the probe."""
        sel = self.selection
        before, after = sel.before, sel.after
        out = []
        for c, name in enumerate(self.probe.classes):
            mask = before.labels == c
            n = int(mask.sum())
            if n == 0:
                continue
            out.append({
                "class": name, "n": n,
                "accuracy_before": float((before.predictions[mask] == c).float().mean()),
                "accuracy_after": float((after.predictions[mask] == c).float().mean()),
                "fixed": sum(1 for i in sel.fixed if int(before.labels[i]) == c),
                "broken": sum(1 for i in sel.broken if int(before.labels[i]) == c)})
        return out

    def images(self) -> Dict[str, List[Dict[str, Any]]]:
        """The probe images the repair fixed, broke, and left wrong."""
        sel = self.selection
        before, after = sel.before, sel.after

        def item(i: int) -> Dict[str, Any]:
            return {"index": i, "label": int(before.labels[i]),
                    "before": int(before.predictions[i]), "after": int(after.predictions[i]),
                    "confidence_before": float(before.confidences[i]),
                    "confidence_after": float(after.confidences[i])}

        still = torch.nonzero((before.predictions != before.labels)
                              & (after.predictions != after.labels)).flatten().tolist()
        out = {"fixed": [item(i) for i in sel.fixed], "broken": [item(i) for i in sel.broken],
               "still_wrong": [item(i) for i in still]}
        if self.target is not None:  # the targeted confusion's probe instances
            inside = self.target.mask(before.labels, before.predictions)
            right = after.predictions == after.labels
            out["target_fixed"] = [item(i) for i in torch.nonzero(inside & right).flatten().tolist()]
            out["target_still_wrong"] = [
                item(i) for i in torch.nonzero(inside & ~right).flatten().tolist()]
        return out

    def to_dict(self) -> Dict[str, Any]:
        sel = self.selection
        sel_summary = sel.summary()
        controls = self.control_summaries()
        full = next((r for r in self.controls if r.name == "all"), None)
        saving = (1.0 - sel.trainable / full.trainable) if full and full.trainable else None
        return {
            **header(),
            "model": self.checkpoint.to_dict(),
            "probe": {**self.probe.describe(), "n": len(self.probe)},
            "train": {"source": self.train_source, "n": self.train_n, "wrong": self.train_wrong},
            "config": self.config.to_dict(),
            "selection": {**sel_summary, "source": self.selection_source,
                          "total_params": self.checkpoint.parameters,
                          "scan_scores": self.selection_scores},
            "accuracy": {"before": sel.before.accuracy, "after": sel.after.accuracy},
            "fixed": len(sel.fixed), "broken": len(sel.broken), "net": sel.net,
            "compute": {"steps": sel.steps, "trainable_params": sel.trainable,
                        "param_steps": sel.steps * sel.trainable, "seconds": round(sel.seconds, 3),
                        "param_steps_saving_vs_full": saving},
            "per_class": self.per_class(),
            "controls": controls,
            "verdict": verdict(controls, sel_summary["net_p_value"]),
            "validation": {**self.holdout, "repair_found": self.repair_found,
                           "reason": (sel.validation.reason if sel.validation
                                      else "no validation")},
            "target": (target_summary(self.target, self.probe.classes, sel.before, sel.after)
                       if self.target is not None else None),
            "images": self.images(),
            "output": {"path": self.output, "written": self.written,
                       "forced": self.written and not self.repair_found,
                       "sha256": self.output_sha256,
                       "verified_identical_tensors": self.verified_identical},
            "device": self.device, "timing": self.timing, "seed": self.config.options.seed,
            "warnings": list(self.warnings),
        }
