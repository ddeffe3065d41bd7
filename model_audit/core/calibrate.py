"""Calibrating a planted defect: the severity at which it costs a given accuracy drop.

The drop is measured on the probe; the search brackets the target by doubling the severity
and narrows it by regula falsi (:func:`calibrate`). The defects themselves are in
:mod:`model_audit.core.plant`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from .. import distributed
from ..errors import ConfigError
from ..io.probe import BatchCache, ProbeSet
from .layers import LayerGroup
from .plant import Planter, SwapData, resolve_defects, swap_pair


@torch.inference_mode()
def accuracy(model: nn.Module, batches: BatchCache, device: str = "cpu") -> float:
    """Top-1 accuracy of ``model`` (eval mode) over ``batches`` (over every rank's shard when
    the cache is sharded)."""
    model.eval()
    right = total = 0
    sharded = getattr(batches, "sharded", False)
    with distributed.agree(sharded):
        for _, x, y in batches:
            right += int((model(x.to(device)).argmax(1).cpu() == y).sum())
            total += len(y)
    if sharded:
        right, total = (int(v) for v in distributed.sum_values(right, total))
    return right / total if total else 0.0


@dataclass(frozen=True)
class PlantResult:
    """One calibrated planted defect."""

    group: str
    defect: str
    seed: int
    severity: float
    target_drop: float
    accuracy_before: float
    accuracy_after: float
    reached: bool              # the drop is within the tolerance of the target
    evaluations: int           # probe evaluations the calibration took
    changed: Tuple[str, ...]   # state-dict entries that differ from the original model
    details: Dict[str, Any] = field(default_factory=dict)

    @property
    def drop(self) -> float:
        return self.accuracy_before - self.accuracy_after

    def to_dict(self) -> Dict[str, Any]:
        return {"group": self.group, "defect": self.defect, "seed": self.seed,
                "severity": self.severity, "target_drop": self.target_drop,
                "accuracy_before": self.accuracy_before, "accuracy_after": self.accuracy_after,
                "drop": self.drop, "reached": self.reached, "evaluations": self.evaluations,
                "changed": list(self.changed), **({"details": self.details} if self.details
                                                  else {})}


@dataclass(frozen=True)
class Planted:
    """A calibrated defect and the damaged copy of the model (in memory only)."""

    result: PlantResult
    model: nn.Module


def changed_tensors(before: nn.Module, after: nn.Module) -> Tuple[str, ...]:
    """Names of the state-dict entries whose values differ between two models."""
    a, b = before.state_dict(), after.state_dict()
    return tuple(k for k in a if not torch.equal(a[k].cpu(), b[k].cpu()))


class _DropCurve:
    """The accuracy drop at each severity, evaluated once per severity (the search's cost)."""

    def __init__(self, planter: Planter, cache: BatchCache, device: str, acc0: float) -> None:
        self.planter, self.cache, self.device, self.acc0 = planter, cache, device, acc0
        self.seen: Dict[float, float] = {}
        self.evals = 0

    def __call__(self, s: float) -> float:
        if s not in self.seen:
            self.evals += 1
            self.seen[s] = self.acc0 - accuracy(self.planter.apply(s), self.cache, self.device)
        return self.seen[s]


def _search_severity(drop_at: _DropCurve, drop: float, tolerance: float,
                     max_evaluations: int) -> None:
    """Bracket the target drop by doubling the severity, then narrow it by regula falsi
    (bisection when the curve is flat); every evaluation lands in ``drop_at.seen``."""
    planter = drop_at.planter
    lo, f_lo = 0.0, 0.0
    hi = planter.max_severity if planter.spec.bounded else planter.spec.start
    f_hi = drop_at(hi)
    while f_hi < drop - tolerance and hi < planter.max_severity and drop_at.evals < max_evaluations:
        lo, f_lo = hi, f_hi
        hi = min(hi * 2.0, planter.max_severity)
        f_hi = drop_at(hi)
    if f_hi < drop - tolerance:
        return
    while abs(f_hi - drop) > tolerance and drop_at.evals < max_evaluations:
        width = hi - lo
        s = lo + ((drop - f_lo) * width / (f_hi - f_lo) if f_hi > f_lo else width / 2)
        s = min(max(s, lo + 0.1 * width), hi - 0.1 * width)
        f = drop_at(s)
        if abs(f - drop) <= tolerance:
            return
        if f < drop:
            lo, f_lo = s, f
        else:
            hi, f_hi = s, f


def calibrate(model: nn.Module, probe: ProbeSet, group: LayerGroup, defect: str, *,
              drop: float = 0.10, tolerance: float = 0.01, seed: int = 0,
              max_evaluations: int = 14, batch_size: int = 128, device: str = "cpu",
              swap: Optional[SwapData] = None, base_accuracy: Optional[float] = None,
              batches: Optional[BatchCache] = None, **planter_options: Any) -> Planted:
    """Plant ``defect`` in ``group`` with the severity that costs ``drop`` accuracy on ``probe``.

    Args:
        model: the trained model (never modified).
        probe: the images the drop is measured on.
        group: the layer group to damage.
        defect: a name of :data:`DEFECTS`.
        drop: target accuracy drop (a fraction, in (0, 1)).
        tolerance: the drop is accepted within this distance of the target.
        seed: seed of the defect's random direction (and the labelswap pair and batches).
        max_evaluations: most probe evaluations the search may take.
        swap: data for ``labelswap`` (default: the probe itself, with a seeded class pair).
        base_accuracy, batches: the model's accuracy on the probe and the probe's batches, when
            the caller already has them (they are the same for every case of one model).

    Returns:
        :class:`Planted`: the result and the damaged copy.

    Raises:
        ConfigError: ``drop`` outside (0, 1), an unknown defect, or one that does not apply.
    """
    if not 0 < drop < 1:
        raise ConfigError(f"the accuracy drop must be in (0, 1), got {drop}")
    if tolerance <= 0:
        raise ConfigError(f"the calibration tolerance must be > 0, got {tolerance}")
    resolve_defects(defect)
    cache = batches or BatchCache(probe, list(range(len(probe))), batch_size)
    if defect == "labelswap" and swap is None:
        # the fine-tune that plants the defect sees the whole probe on every rank
        whole = BatchCache(probe, cache.positions, batch_size) if cache.sharded else cache
        x = torch.cat([b[1] for b in whole])
        y = torch.cat([b[2] for b in whole])
        swap = SwapData(x, y, swap_pair(y, seed))
    planter = Planter(model, group, defect, seed=seed, swap=swap, device=device,
                      **planter_options)
    # Severity 0 is the original model exactly (the working copy, not the caller's model).
    acc0 = accuracy(planter.apply(0.0), cache, device) if base_accuracy is None else base_accuracy
    curve = _DropCurve(planter, cache, device, acc0)
    _search_severity(curve, drop, tolerance, max_evaluations)
    seen, evals = curve.seen, curve.evals
    best = min(seen, key=lambda s: (abs(seen[s] - drop), s))
    damaged = planter.apply(best)
    result = PlantResult(group.name, defect, seed, float(best), drop, acc0, acc0 - seen[best],
                         abs(seen[best] - drop) <= tolerance, evals,
                         changed_tensors(model, damaged.cpu()), dict(planter.details))
    return Planted(result, damaged)
