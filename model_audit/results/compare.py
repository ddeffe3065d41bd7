"""The comparison of two scans and the exact bisection of a regression between two releases:
what ``compare`` returns and ``compare.json`` holds."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from ..errors import ConfigError
from ..io.files import header, read_result
from .display import Displayable


@dataclass(frozen=True)
class Swap:
    """The candidate with the baseline's tensors of ``groups``: what it recovers and loses."""

    groups: Tuple[str, ...]
    recovered: int      # regression images right again
    lost_fixes: int     # the candidate's new fixes wrong again

    def to_dict(self) -> Dict[str, Any]:
        return {"name": "+".join(self.groups), "groups": list(self.groups),
                "recovered": self.recovered, "lost_fixes": self.lost_fixes}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Swap":
        return cls(tuple(d["groups"]), int(d["recovered"]), int(d["lost_fixes"]))


@dataclass(frozen=True)
class Regression:
    """The regression set of two releases and what swapping each group back recovers."""

    n: int                      # probe images
    regressed: int              # baseline right, candidate wrong
    new_fixes: int              # baseline wrong, candidate right
    groups: Tuple[Swap, ...]    # one per group, the most recovered first
    pairs: Tuple[Swap, ...] = ()

    @property
    def best(self) -> Optional[Swap]:
        """The single group that recovers the most of the regression (None without one)."""
        return self.groups[0] if self.groups and self.regressed else None

    def share(self, swap: Swap) -> Optional[float]:
        return swap.recovered / self.regressed if self.regressed else None

    def summary(self) -> str:
        """One line: the group that recovers the most, with its share (for the gate)."""
        if not self.regressed:
            return (f"no regression: every probe image the baseline gets right the candidate "
                    f"gets right too ({self.new_fixes} new fixes)")
        best = self.best
        text = (f"{self.regressed} probe images regressed; putting back the baseline's "
                f"{best.groups[0]} recovers {best.recovered} ({100 * self.share(best):.0f}%) "
                f"and loses {best.lost_fixes} of the candidate's {self.new_fixes} new fixes")
        if self.pairs:
            pair = self.pairs[0]
            text += (f"; no group alone recovers half: the pair {' + '.join(pair.groups)} "
                     f"recovers {pair.recovered} ({100 * self.share(pair):.0f}%)")
        return text

    def to_dict(self) -> Dict[str, Any]:
        return {"exact": True, "n": self.n, "regressed": self.regressed,
                "new_fixes": self.new_fixes, "groups": [s.to_dict() for s in self.groups],
                "pairs": [s.to_dict() for s in self.pairs], "summary": self.summary()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Regression":
        return cls(int(d["n"]), int(d["regressed"]), int(d["new_fixes"]),
                   tuple(Swap.from_dict(s) for s in d["groups"]),
                   tuple(Swap.from_dict(s) for s in d.get("pairs", ())))


@dataclass(frozen=True)
class CompareConfig:
    """Options of a comparison."""

    allow_partial: bool = False   # compare only the groups both scans have
    resamples: int = 1000         # bootstrap resamples (0: no intervals)
    seed: int = 0

    def validate(self) -> None:
        if self.resamples < 0:
            raise ConfigError(f"resamples must be >= 0, got {self.resamples}")


@dataclass(frozen=True, repr=False)
class CompareResult(Displayable):
    """Everything ``compare.json`` holds."""

    a: Dict[str, Any]
    b: Dict[str, Any]
    groups: Tuple[str, ...]
    left_out: Dict[str, List[str]]
    flagged_a: Tuple[str, ...]
    flagged_b: Tuple[str, ...]
    jaccard: Optional[float]
    overlap_coefficient: Optional[float]
    top_k: Dict[int, float]
    correlation: Dict[str, Dict[str, Optional[float]]]
    chance: Dict[str, Any]
    intervals: Dict[str, Any]
    scores: List[Dict[str, Any]]
    config: CompareConfig = field(default_factory=CompareConfig)
    regression: Optional[Regression] = None   # bisection, when both models were at hand
    regression_note: Optional[str] = None     # why there is none

    def rows(self) -> List[Dict[str, Any]]:
        """One row per shared group: parameters, both scores, both flags."""
        return [dict(s) for s in self.scores]

    @property
    def intersection(self) -> Tuple[str, ...]:
        return tuple(g for g in self.groups if g in self.flagged_a and g in self.flagged_b)

    def to_dict(self) -> Dict[str, Any]:
        return {
            **header(),
            "a": self.a, "b": self.b,
            "groups": list(self.groups), "left_out": self.left_out,
            "flagged": {"a": list(self.flagged_a), "b": list(self.flagged_b),
                        "both": list(self.intersection)},
            "jaccard": self.jaccard, "overlap_coefficient": self.overlap_coefficient,
            "top_k_overlap": {str(k): v for k, v in self.top_k.items()},
            "correlation": self.correlation, "chance": self.chance,
            "intervals": self.intervals, "scores": self.scores,
            "config": {"allow_partial": self.config.allow_partial,
                       "resamples": self.config.resamples, "seed": self.config.seed},
            "regression": (self.regression.to_dict() if self.regression is not None
                           else {"note": self.regression_note}),
        }

    @property
    def new_flags(self) -> Tuple[str, ...]:
        """Groups B flags and A does not (for the gate: newly flagged since the baseline)."""
        return tuple(g for g in self.flagged_b if g not in self.flagged_a)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CompareResult":
        """A ``compare.json`` read back (:meth:`read`), or ``to_dict()``'s output."""
        config = d.get("config") or {}
        return cls(dict(d["a"]), dict(d["b"]), tuple(d["groups"]),
                   {k: list(v) for k, v in d["left_out"].items()},
                   tuple(d["flagged"]["a"]), tuple(d["flagged"]["b"]),
                   d["jaccard"], d["overlap_coefficient"],
                   {int(k): v for k, v in d["top_k_overlap"].items()},
                   {k: dict(v) for k, v in d["correlation"].items()}, dict(d["chance"]),
                   dict(d["intervals"]), [dict(s) for s in d["scores"]],
                   CompareConfig(bool(config.get("allow_partial", False)),
                                 int(config.get("resamples", 0)), int(config.get("seed", 0))),
                   *_regression_from(d.get("regression")))

    @classmethod
    def read(cls, path: Union[str, os.PathLike]) -> "CompareResult":
        """Read and check a ``compare.json`` written by ``compare``.

        Raises:
            ConfigError: missing, unreadable, or not a compare.json of this schema version.
        """
        what = "a compare.json written by model-audit compare"
        data = read_result(path, what, ("a", "b", "groups", "flagged", "correlation", "scores"))
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"{path} is not {what}: {type(exc).__name__} {exc}") from exc


def _regression_from(d: Optional[Mapping[str, Any]]
                     ) -> Tuple[Optional[Regression], Optional[str]]:
    if not d:
        return None, None
    return (Regression.from_dict(d), None) if "regressed" in d else (None, d.get("note"))
