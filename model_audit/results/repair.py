"""The evidence inside a repair's result: the states of a repair scored on the validation part
(which one was kept, and the test that accepted it), and the confusion a targeted repair aims
at with its probe counts."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..core.evaluate import EvaluationResult
from ..core.stats import SIGN_FLIP_EXACT_UP_TO, SIGN_FLIP_RESAMPLES
from ..errors import ConfigError


#: How a state is accepted (fix.json's ``validation.test``).
TEST = ("one-sided max-statistic sign-flip test over the trained states (Westfall-Young): "
        f"exact up to {SIGN_FLIP_EXACT_UP_TO} changed images, else {SIGN_FLIP_RESAMPLES:,} "
        "seeded resamples")


def check_share(share: float) -> None:
    """ConfigError unless the validation share is in (0, 0.5]."""
    if not (isinstance(share, (int, float)) and math.isfinite(share) and 0 < share <= 0.5):
        raise ConfigError(f"the validation share must be in (0, 0.5], got {share}: give e.g. "
                          "--validation 0.2 (a fifth of the repair data is held out)")


@dataclass(frozen=True)
class Candidate:
    """One state of a repair scored on the validation part (step 0: the original)."""

    step: int
    correct: int
    fixed: int       # validation images wrong at step 0 and right here
    broken: int      # right at step 0 and wrong here
    loss: float      # mean validation cross-entropy

    @property
    def net(self) -> int:
        return self.fixed - self.broken

    def to_dict(self) -> Dict[str, Any]:
        return {"step": self.step, "correct": self.correct, "fixed": self.fixed,
                "broken": self.broken, "net": self.net, "loss": self.loss}


@dataclass(frozen=True)
class Validation:
    """The validation evidence of one repair and the state it kept."""

    n: int
    candidates: Tuple[Candidate, ...]
    chosen: int              # the step kept (0: the original, nothing changed)
    best: int                # the best trained step, accepted or not (-1: none in budget)
    p_value: float           # one-sided max-statistic test over the trained states
    threshold: float         # alpha
    accepted: bool
    max_break: Optional[float] = None   # the break budget (share of the right images)
    p_single: Optional[float] = None    # the best state's own one-sided McNemar p (no pick)

    @property
    def reason(self) -> str:
        if self.best < 0:
            right = self.candidates[0].correct
            fewest = min(c.broken for c in self.candidates[1:])
            return (f"every state of the repair broke more than the budget of "
                    f"{100 * (self.max_break or 0):g}% of the {right} validation images the "
                    f"original gets right (the fewest: {fewest}); lower --lr, or allow more "
                    "with --max-break")
        best = next(c for c in self.candidates if c.step == self.best)
        budget = ("" if self.max_break is None else
                  f", the best within the break budget of {100 * self.max_break:g}%")
        if self.accepted:
            return (f"step {best.step}{budget} beat the original on {self.n} validation images: "
                    f"{best.fixed} fixed, {best.broken} broken (net {best.net:+d}, one-sided "
                    f"p = {self.p_value:.2g} < {self.threshold:.2g} for the best of "
                    f"{len(self.candidates) - 1} states)")
        if best.net <= 0:
            return (f"no state of the repair was better than the original on {self.n} "
                    f"validation images (the best, step {best.step}: {best.fixed} fixed, "
                    f"{best.broken} broken, net {best.net:+d})")
        return (f"the best state (step {best.step}: {best.fixed} fixed, {best.broken} broken, "
                f"net {best.net:+d} on {self.n} validation images) was not better than the "
                f"original by more than noise (one-sided p = {self.p_value:.2g} for the best "
                f"of {len(self.candidates) - 1} states, needed < {self.threshold:.2g})")

    def to_dict(self) -> Dict[str, Any]:
        right = self.candidates[0].correct
        return {"n": self.n, "chosen_step": self.chosen, "best_step": self.best,
                "accepted": self.accepted, "p_value": self.p_value,
                "threshold": self.threshold, "test": TEST, "p_single": self.p_single,
                "max_break": self.max_break,
                "reason": self.reason,
                "candidates": [{**c.to_dict(),
                                "over_budget": not within_budget(c, self.max_break, right)}
                               for c in self.candidates]}


def within_budget(cand: Candidate, max_break: Optional[float], right: int) -> bool:
    """Whether ``cand`` breaks at most ``max_break`` of the ``right`` validation images the
    original gets right (always, without a budget)."""
    return max_break is None or cand.broken <= max_break * right


@dataclass(frozen=True)
class Target:
    """The confusions a repair targets, as class indices: ``pairs`` of (true, predicted)."""

    pairs: Tuple[Tuple[int, int], ...]
    auto: bool = False

    def mask(self, labels: torch.Tensor, predictions: torch.Tensor) -> torch.Tensor:
        """Which images are in one of the confusions (label TRUE, prediction PRED)."""
        out = torch.zeros(len(labels), dtype=torch.bool)
        for t, p in self.pairs:
            out |= (labels == t) & (predictions == p)
        return out

    def names(self, classes: Sequence[str]) -> List[str]:
        return [f"{classes[t]}:{classes[p]}" for t, p in self.pairs]


def target_summary(target: Target, classes: Sequence[str], before: EvaluationResult,
                   after: EvaluationResult) -> Dict[str, Any]:
    """fix.json's ``target``: the confusion's probe counts before and after, the repair rate
    on its probe instances and the break rate on the probe images right before."""
    inside = target.mask(before.labels, before.predictions)
    right_before = before.predictions == before.labels
    right_after = after.predictions == after.labels
    n_inside, n_right = int(inside.sum()), int(right_before.sum())
    pairs = []
    for t, p in target.pairs:
        one = Target(((t, p),))
        was = one.mask(before.labels, before.predictions)
        pairs.append({"true": classes[t], "pred": classes[p], "probe_before": int(was.sum()),
                      "probe_after": int(one.mask(after.labels, after.predictions).sum()),
                      "repaired": int((was & right_after).sum())})
    fixed = int((~right_before & right_after).sum())
    broken = int((right_before & ~right_after).sum())
    single = len(pairs) == 1
    return {
        "true": pairs[0]["true"] if single else [q["true"] for q in pairs],
        "pred": pairs[0]["pred"] if single else [q["pred"] for q in pairs],
        "auto": target.auto,
        "probe_before": n_inside,
        "probe_after": int(target.mask(after.labels, after.predictions).sum()),
        "repair_rate": (int((inside & right_after).sum()) / n_inside) if n_inside else None,
        "break_rate": (int((right_before & ~right_after).sum()) / n_right) if n_right else None,
        "net": fixed - broken,
        "pairs": pairs,
    }
