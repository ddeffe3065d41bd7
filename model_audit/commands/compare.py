"""``compare``: do two checkpoints flag the same layer groups?

Inputs are two scans (``ScanResult`` objects or ``audit.json`` files). The comparison reports
both flagged sets, their Jaccard index and overlap coefficient, the top-k overlap of the
scores for k = 1..3, Spearman and Kendall rank correlation of the per-group scores (the own
metric and every baseline both scans have), and the per-group scores side by side.

Uncertainty, so that "100% overlap" can be judged:

* **Bootstrap over probe samples.** Each resample draws the probe's images with replacement;
  each scan's per-image reductions (``per_image`` in ``audit.json``) are re-weighted, its
  scores and flags recomputed with the scan's own rule, and the overlap and correlations
  computed again. When both scans used the same probe (same source, size and subset) the
  resample is *paired* (the same images for both); otherwise each scan is resampled on its
  own. The replay trajectories are kept fixed.
* **Chance level.** If the second flagged set were a random set of the same size, the overlap
  ``X = |A & B|`` would be hypergeometric: ``E[X] = |A| |B| / G`` over ``G`` shared groups,
  and ``P(X >= observed)`` is the probability of an overlap at least as large by chance.

Example:
    >>> result = compare("sgd/audit.json", "adam/audit.json")  # doctest: +SKIP
    >>> result.jaccard, result.chance["p_value"]  # doctest: +SKIP
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import numpy as np

from ..io.files import SCHEMA_VERSION, atomic_write_files, json_bytes, refuse_inputs
from ..core.attribution import flag_rule, scores_from_reductions
from ..errors import AuditError, ConfigError
from ..core.stats import (hypergeom_sf, jaccard, kendall_tau_b, overlap_coefficient,
                    percentile_interval, spearman, top_k)



class CompareError(AuditError):
    """The two scans cannot be compared (different architectures or layer groups)."""


@dataclass(frozen=True)
class CompareConfig:
    """Options of a comparison."""

    allow_partial: bool = False   # compare only the groups both scans have
    resamples: int = 1000         # bootstrap resamples (0: no intervals)
    seed: int = 0

    def validate(self) -> None:
        if self.resamples < 0:
            raise ConfigError(f"resamples must be >= 0, got {self.resamples}")


@dataclass(frozen=True)
class CompareResult:
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

    @property
    def intersection(self) -> Tuple[str, ...]:
        return tuple(g for g in self.groups if g in self.flagged_a and g in self.flagged_b)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
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
        }


def load_audit(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Read and check an ``audit.json`` written by ``scan``.

    Raises:
        ConfigError: missing file, not JSON, or not an audit of a known schema.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"audit file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION or "layers" not in data:
        raise ConfigError(f"{path} is not an audit.json written by model-audit scan "
                          "(schema_version 1 with layers)")
    for key in ("model", "probe", "flagged"):
        if key not in data:
            raise ConfigError(f"{path}: audit.json lacks {key!r}")
    data.setdefault("_source", str(path))
    return data


def _as_dict(scan: Any) -> Dict[str, Any]:
    if isinstance(scan, dict):
        return scan
    if isinstance(scan, (str, os.PathLike)):
        return load_audit(scan)
    return scan.to_dict()


def _summary(d: Dict[str, Any]) -> Dict[str, Any]:
    model, probe = d["model"], d["probe"]
    return {"source": d.get("_source", model.get("path")), "checkpoint": model.get("path"),
            "arch": model.get("arch"), "sha256": model.get("sha256"),
            "probe": probe.get("source"), "n": probe.get("n"),
            "accuracy": probe.get("accuracy"), "misclassified": probe.get("misclassified"),
            "flagged": list(d["flagged"])}


def _same_probe(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    pa, pb = a["probe"], b["probe"]
    oa, ob = a.get("options", {}), b.get("options", {})
    return (pa.get("source") == pb.get("source") and pa.get("n") == pb.get("n")
            and oa.get("limit") == ob.get("limit") and oa.get("seed") == ob.get("seed"))


class _Resampler:
    """Recomputes one scan's scores and flags from its per-image reductions and weights."""

    def __init__(self, d: Dict[str, Any]) -> None:
        per = d.get("per_image") or {}
        self.index = np.asarray(per.get("index", []), dtype=np.int64)
        self.r = np.asarray(per.get("reduction", []), dtype=np.float64)
        self.shares = np.asarray([layer["share"] for layer in d["layers"]], dtype=np.float64)
        self.n = int(d["probe"]["n"])
        self.ok = self.r.ndim == 2 and len(self.index) == len(self.r) > 0

    def scores(self, counts: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        w = counts[self.index].astype(np.float64)
        total = w.sum()
        mean = (w @ self.r) / total if total > 0 else np.zeros(len(self.shares))
        s = scores_from_reductions(mean)
        return s, flag_rule(s, self.shares) if total > 0 else np.zeros(len(s), dtype=bool)


def _stats(names: Sequence[str], sa: Sequence[float], sb: Sequence[float],
           fa: Set[str], fb: Set[str]) -> Dict[str, Optional[float]]:
    return {"jaccard": jaccard(fa, fb), "overlap_coefficient": overlap_coefficient(fa, fb),
            "spearman": spearman(sa, sb), "kendall": kendall_tau_b(sa, sb)}


def compare(a: Any, b: Any, config: CompareConfig = CompareConfig()) -> CompareResult:
    """Compare two scans (ScanResult, audit dict or path to ``audit.json``).

    Raises:
        CompareError: different architectures or layer groups, unless ``allow_partial``.
    """
    config.validate()
    da, db = _as_dict(a), _as_dict(b)
    names_a = [layer["name"] for layer in da["layers"]]
    names_b = [layer["name"] for layer in db["layers"]]
    arch_a, arch_b = da["model"].get("arch"), db["model"].get("arch")
    shared = [n for n in names_a if n in set(names_b)]
    a_only = [n for n in names_a if n not in set(names_b)]
    b_only = [n for n in names_b if n not in set(names_a)]
    if not config.allow_partial:
        if arch_a != arch_b:
            raise CompareError(
                f"the scans are of different architectures ({arch_a} and {arch_b}); pass "
                "--allow-partial to compare the layer groups they share")
        if a_only or b_only or da.get("granularity") != db.get("granularity"):
            raise CompareError(
                f"the scans have different layer groups (only in A: {', '.join(a_only) or '-'}; "
                f"only in B: {', '.join(b_only) or '-'}); scan both with the same "
                "--granularity, or pass --allow-partial")
    if not shared:
        raise CompareError("the scans share no layer group; nothing to compare")
    la = {layer["name"]: layer for layer in da["layers"]}
    lb = {layer["name"]: layer for layer in db["layers"]}
    sa = [la[n]["score"] for n in shared]
    sb = [lb[n]["score"] for n in shared]
    fa = {n for n in da["flagged"] if n in shared}
    fb = {n for n in db["flagged"] if n in shared}
    point = _stats(shared, sa, sb, fa, fb)
    correlation: Dict[str, Dict[str, Optional[float]]] = {
        "replay_reduction": {"spearman": point["spearman"], "kendall": point["kendall"]}}
    for name in sorted(set(da.get("baselines", {})) & set(db.get("baselines", {}))):
        ba = [la[n].get("baselines", {}).get(name) for n in shared]
        bb = [lb[n].get("baselines", {}).get(name) for n in shared]
        ba = [float("nan") if v is None else v for v in ba]
        bb = [float("nan") if v is None else v for v in bb]
        correlation[name] = {"spearman": spearman(ba, bb), "kendall": kendall_tau_b(ba, bb)}
    g = len(shared)
    observed = len(fa & fb)
    expected = len(fa) * len(fb) / g
    chance = {"groups": g, "size_a": len(fa), "size_b": len(fb), "observed_overlap": observed,
              "expected_overlap": expected,
              "expected_overlap_coefficient": (expected / min(len(fa), len(fb))
                                               if min(len(fa), len(fb)) else None),
              "p_value": hypergeom_sf(observed, g, len(fa), len(fb))}
    intervals = _bootstrap(da, db, shared, config)
    topk = {k: len(top_k(shared, sa, k) & top_k(shared, sb, k)) / k
            for k in (1, 2, 3) if k <= g}
    scores = [{"name": n, "params": la[n]["params"], "score_a": la[n]["score"],
               "score_b": lb[n]["score"], "flagged_a": n in fa, "flagged_b": n in fb,
               "flag_frequency_a": la[n].get("flag_frequency"),
               "flag_frequency_b": lb[n].get("flag_frequency")} for n in shared]
    return CompareResult(_summary(da), _summary(db), tuple(shared),
                         {"a_only": a_only, "b_only": b_only},
                         tuple(n for n in shared if n in fa), tuple(n for n in shared if n in fb),
                         point["jaccard"], point["overlap_coefficient"], topk, correlation,
                         chance, intervals, scores, config)


def _bootstrap(da: Dict[str, Any], db: Dict[str, Any], shared: Sequence[str],
               config: CompareConfig) -> Dict[str, Any]:
    ra, rb = _Resampler(da), _Resampler(db)
    paired = _same_probe(da, db)
    info: Dict[str, Any] = {"resamples": 0, "paired": paired, "level": 0.95}
    if config.resamples == 0 or not (ra.ok and rb.ok):
        if config.resamples and not (ra.ok and rb.ok):
            info["note"] = ("no per-image reductions in one of the scans (no errors, or an "
                            "older audit.json): no intervals")
        return info
    names_a = [layer["name"] for layer in da["layers"]]
    names_b = [layer["name"] for layer in db["layers"]]
    ia = [names_a.index(n) for n in shared]
    ib = [names_b.index(n) for n in shared]
    rng = np.random.default_rng(config.seed)
    samples: Dict[str, List[Optional[float]]] = {
        "jaccard": [], "overlap_coefficient": [], "spearman": [], "kendall": []}
    for _ in range(config.resamples):
        ca = np.bincount(rng.integers(0, ra.n, ra.n), minlength=ra.n)
        cb = ca if paired else np.bincount(rng.integers(0, rb.n, rb.n), minlength=rb.n)
        sa, fa = ra.scores(ca)
        sb, fb = rb.scores(cb)
        sets_a = {shared[j] for j, i in enumerate(ia) if fa[i]}
        sets_b = {shared[j] for j, i in enumerate(ib) if fb[i]}
        stats = _stats(shared, sa[ia], sb[ib], sets_a, sets_b)
        for key in samples:
            samples[key].append(stats[key])
    info["resamples"] = config.resamples
    for key, values in samples.items():
        info[key] = percentile_interval(values)
    return info


def format_compare(result: CompareResult) -> str:
    """The readable table the CLI prints."""
    d = result.to_dict()

    def num(v: Optional[float]) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    def interval(key: str) -> str:
        iv = d["intervals"].get(key)
        return f" [{iv[0]:.2f}, {iv[1]:.2f}]" if iv else ""

    rows = [("group", "params", "score A", "score B", "flag A", "flag B")]
    for s in d["scores"]:
        rows.append((s["name"], f"{s['params']:,}", f"{s['score_a']:.3f}", f"{s['score_b']:.3f}",
                     "yes" if s["flagged_a"] else "", "yes" if s["flagged_b"] else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    ch = d["chance"]
    corr = d["correlation"]["replay_reduction"]
    lines += [
        f"A: {d['a']['source']}  flagged: {', '.join(d['flagged']['a']) or 'none'}",
        f"B: {d['b']['source']}  flagged: {', '.join(d['flagged']['b']) or 'none'}",
        f"overlap: {ch['observed_overlap']} of {ch['groups']} groups; "
        f"Jaccard {num(d['jaccard'])}{interval('jaccard')}; "
        f"overlap coefficient {num(d['overlap_coefficient'])}{interval('overlap_coefficient')}",
        f"chance: expected overlap {ch['expected_overlap']:.2f}; "
        f"P(overlap >= {ch['observed_overlap']} by chance) = {ch['p_value']:.3g}",
        f"rank correlation of scores: Spearman {num(corr['spearman'])}{interval('spearman')}, "
        f"Kendall {num(corr['kendall'])}{interval('kendall')}",
        "top-k overlap: " + ", ".join(f"k={k}: {v:.2f}" for k, v in d["top_k_overlap"].items()),
    ]
    for name, c in d["correlation"].items():
        if name != "replay_reduction":
            lines.append(f"baseline {name}: Spearman {num(c['spearman'])}, Kendall {num(c['kendall'])}")
    if d["left_out"]["a_only"] or d["left_out"]["b_only"]:
        lines.append(f"left out: only in A {', '.join(d['left_out']['a_only']) or '-'}; "
                     f"only in B {', '.join(d['left_out']['b_only']) or '-'}")
    return "\n".join(lines)


def write_compare(result: CompareResult, out_dir: Union[str, os.PathLike],
                  inputs: Sequence[Union[str, os.PathLike]] = ()) -> Dict[str, Path]:
    """Write ``compare.json`` and ``report.html`` into ``out_dir`` (atomically, both or neither)."""
    from ..errors import OutputError
    from ..render.html import render_compare_report
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} exists and is not a directory")
    refuse_inputs([out], inputs, "; choose another directory")
    data = result.to_dict()
    html = render_compare_report(data)
    paths = {"compare": out / "compare.json", "report": out / "report.html"}
    # both files or neither: a full disk leaves the old pair as it was
    atomic_write_files([(paths["compare"], json_bytes(data)),
                        (paths["report"], html.encode("utf-8"))])
    return paths
