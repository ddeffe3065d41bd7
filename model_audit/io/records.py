"""Typed results read back from the files the tool writes.

A scan hands the next stage a :class:`~model_audit.results.scan.ScanResult` in memory; across
processes the same result travels as ``audit.json``. :class:`AuditRecord` is that file read
back: the fields compare, gate and fix use, typed, so that no module digs into another's JSON
with string keys. ``AuditRecord.data`` keeps the whole file for what is only rendered (the
HTML report) or written again (the gate's copy of the audit).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from ..errors import ConfigError
from .files import read_result

AUDIT_FILE = "an audit.json written by model-audit scan"


@dataclass(frozen=True)
class LayerScore:
    """One layer group's result in a scan."""

    name: str
    params: int
    share: float
    reduction: float
    score: float
    score_interval: Tuple[float, float]
    flag_frequency: float
    flagged: bool
    baselines: Dict[str, Optional[float]] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "params": self.params, "share": self.share,
                "score": self.score, "score_interval": list(self.score_interval),
                "reduction": self.reduction, "flag_frequency": self.flag_frequency,
                "flagged": self.flagged, "baselines": dict(self.baselines)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LayerScore":
        interval = d.get("score_interval") or (d["score"], d["score"])
        return cls(str(d["name"]), int(d["params"]), float(d["share"]),
                   float(d.get("reduction", d["score"])), float(d["score"]),
                   (float(interval[0]), float(interval[1])),
                   float(d.get("flag_frequency") or 0.0), bool(d.get("flagged", False)),
                   dict(d.get("baselines") or {}))


@dataclass(frozen=True)
class AuditRecord:
    """A scan as ``audit.json`` holds it (see :meth:`from_dict` and :meth:`read`)."""

    source: Optional[str]            # the file it was read from, else the checkpoint's path
    checkpoint: Optional[str]
    arch: Optional[str]
    sha256: Optional[str]
    probe_source: Optional[str]
    probe_n: int
    accuracy: Optional[float]
    misclassified: Optional[int]
    per_class_accuracy: Dict[str, Optional[float]]
    granularity: Optional[str]
    layers: Tuple[LayerScore, ...]
    flagged: Tuple[str, ...]
    baselines: Tuple[str, ...]       # the baselines the scan computed beside the own metric
    limit: Optional[int]
    seed: Optional[int]
    per_image_index: np.ndarray      # rows of per_image_reduction: probe positions
    per_image_reduction: np.ndarray  # r[i, g]: image i's loss reduction from group g
    per_image_prior: Optional[np.ndarray]  # the fixed shares the scores combine with, if any
    total_seconds: Optional[float]
    data: Mapping[str, Any] = field(repr=False, default_factory=dict)
    probe_kind: Optional[str] = None  # imagefolder, tensors (images) or inputs (other data)

    @property
    def probe_unit(self) -> str:
        """What the probe held, for messages: ``images``, or ``inputs`` for other data."""
        return "inputs" if self.probe_kind == "inputs" else "images"

    @property
    def names(self) -> Tuple[str, ...]:
        return tuple(layer.name for layer in self.layers)

    @property
    def misclassified_positions(self) -> Tuple[int, ...]:
        """The probe positions of the misclassified images (``misclassified`` in the file)."""
        return tuple(int(m["index"]) for m in self.data.get("misclassified") or ())

    def layer(self, name: str) -> LayerScore:
        return next(layer for layer in self.layers if layer.name == name)

    def to_dict(self) -> Dict[str, Any]:
        """The file's content, as read."""
        return dict(self.data)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: Optional[str] = None) -> "AuditRecord":
        """Type an audit dict (``ScanResult.to_dict()`` or a parsed ``audit.json``).

        Raises:
            ConfigError: a field the readers need is missing or of the wrong type.
        """
        try:
            return cls._from_dict(d, source)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            where = source or "the audit"
            raise ConfigError(f"{where} is not {AUDIT_FILE}: {type(exc).__name__} {exc}; "
                              "scan the checkpoint again") from exc

    @classmethod
    def _from_dict(cls, d: Mapping[str, Any], source: Optional[str]) -> "AuditRecord":
        model, probe = d["model"], d["probe"]
        options = d.get("options") or {}
        per = d.get("per_image") or {}
        timing = d.get("timing") or {}
        return cls(
            source=source or model.get("path"), checkpoint=model.get("path"),
            arch=model.get("arch"), sha256=model.get("sha256"),
            probe_source=probe.get("source"), probe_n=int(probe["n"]),
            accuracy=probe.get("accuracy"), misclassified=probe.get("misclassified"),
            per_class_accuracy=dict(probe.get("per_class_accuracy") or {}),
            granularity=d.get("granularity"),
            layers=tuple(LayerScore.from_dict(layer) for layer in d["layers"]),
            flagged=tuple(d["flagged"]), baselines=tuple(d.get("baselines") or ()),
            limit=options.get("limit"), seed=options.get("seed"),
            per_image_index=np.asarray(per.get("index", []), dtype=np.int64),
            per_image_reduction=np.asarray(per.get("reduction", []), dtype=np.float64),
            per_image_prior=(np.asarray(per["prior"], dtype=np.float64)
                             if per.get("prior") is not None else None),
            total_seconds=timing.get("total_s"), data=d, probe_kind=probe.get("kind"))

    @classmethod
    def read(cls, path: "os.PathLike[str] | str") -> "AuditRecord":
        """Read and check an ``audit.json`` written by ``scan``.

        Raises:
            ConfigError: missing file, not JSON, not an audit of this schema version.
        """
        data = read_result(path, AUDIT_FILE, ("model", "probe", "flagged", "layers"))
        return cls.from_dict(data, source=str(path))


SANITY_FILE = "a sanity.json written by `model-audit sanity`"


@dataclass(frozen=True)
class SanityRecord:
    """What the gate reads of a ``sanity.json``: the top-1 on planted faults of the scan's
    default ranking (``combined``, the own metric with Auto-RGN, when sanity scored it; else
    the own metric)."""

    metric: str                # the ranking read: combined, or the own metric's name
    top1: Optional[float]      # share of planted faults whose group it ranked first
    cases: int                 # planted faults that reached their accuracy drop
    chance_top1: Optional[float]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "the sanity result") -> "SanityRecord":
        methods = d.get("methods")
        metric = d.get("metric", "replay_reduction")
        if not isinstance(methods, dict) or not isinstance(methods.get(metric), dict):
            raise ConfigError(f"{source} is not {SANITY_FILE}")
        if isinstance(methods.get("combined"), dict):   # the scan's default ranking
            metric = "combined"
        own = methods[metric]
        return cls(metric, own.get("top1"), int(own.get("n", 0)),
                   (d.get("chance") or {}).get("top1"))

    @classmethod
    def read(cls, path: "os.PathLike[str] | str") -> "SanityRecord":
        """Read a ``sanity.json`` (for the gate's ``min_sanity_top1``).

        Raises:
            ConfigError: unreadable, or not a sanity.json of this tool.
        """
        return cls.from_dict(read_result(path, SANITY_FILE), source=str(path))
