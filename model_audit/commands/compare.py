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

Examples:
    >>> result = compare("sgd/audit.json", "adam/audit.json")  # doctest: +SKIP
    >>> result.jaccard, result.chance["p_value"]  # doctest: +SKIP
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import numpy as np

from ..core.layers import layer_groups
from ..io.records import AuditRecord
from .bisect import BisectError, bisect
from ..results.compare import Regression
from ..core.attribution import (SCORE_KEY, bootstrap_counts, error_rows, flag_rule,
                                resampled_scores)
from ..errors import AuditError
from ..core.stats import (hypergeom_sf, jaccard, kendall_tau_b, overlap_coefficient,
                    percentile_interval, spearman, top_k)
from ..results.compare import CompareConfig, CompareResult
from ..results.scan import ScanResult


class CompareError(AuditError):
    """The two scans cannot be compared (different architectures or layer groups)."""


def _record(scan: Union[ScanResult, AuditRecord]) -> AuditRecord:
    """The typed audit of a ScanResult, an AuditRecord, a path to ``audit.json`` or an audit dict."""
    if isinstance(scan, AuditRecord):
        return scan
    if isinstance(scan, (str, os.PathLike)):
        return AuditRecord.read(scan)
    if isinstance(scan, dict):
        return AuditRecord.from_dict(scan)
    return scan.record()


def _summary(r: AuditRecord) -> Dict[str, Any]:
    return {"source": r.source, "checkpoint": r.checkpoint, "arch": r.arch, "sha256": r.sha256,
            "probe": r.probe_source, "n": r.probe_n, "accuracy": r.accuracy,
            "misclassified": r.misclassified, "flagged": list(r.flagged)}


def _same_probe(a: AuditRecord, b: AuditRecord) -> bool:
    return (a.probe_source == b.probe_source and a.probe_n == b.probe_n
            and a.limit == b.limit and a.seed == b.seed)


class _Resampler:
    """Recomputes one scan's scores and flags from its per-image reductions and weights."""

    def __init__(self, r: AuditRecord) -> None:
        self.index = r.per_image_index
        self.r = r.per_image_reduction
        self.prior = r.per_image_prior
        # a net metric's rows include correct images: its fallback reads the errors' rows
        self.error_rows = error_rows(self.index, r.misclassified_positions)
        self.shares = np.asarray([layer.share for layer in r.layers], dtype=np.float64)
        self.n = r.probe_n
        self.ok = self.r.ndim == 2 and len(self.index) == len(self.r) > 0

    def scores(self, counts: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        s = resampled_scores(self.r, self.index, counts, self.prior, self.error_rows)
        return s, flag_rule(s, self.shares)


def _stats(names: Sequence[str], sa: Sequence[float], sb: Sequence[float],
           fa: Set[str], fb: Set[str]) -> Dict[str, Optional[float]]:
    return {"jaccard": jaccard(fa, fb), "overlap_coefficient": overlap_coefficient(fa, fb),
            "spearman": spearman(sa, sb), "kendall": kendall_tau_b(sa, sb)}


def compare(a: Union[ScanResult, AuditRecord], b: Union[ScanResult, AuditRecord],
            config: CompareConfig = CompareConfig()) -> CompareResult:
    """Compare two scans (ScanResult, AuditRecord, audit dict or path to ``audit.json``).

    Raises:
        CompareError: different architectures or layer groups, unless ``allow_partial``.
    """
    config.validate()
    ra, rb = _record(a), _record(b)
    shared, left_out = _shared_groups(ra, rb, config.allow_partial)
    sa = [ra.layer(n).score for n in shared]
    sb = [rb.layer(n).score for n in shared]
    fa = {n for n in ra.flagged if n in shared}
    fb = {n for n in rb.flagged if n in shared}
    point = _stats(shared, sa, sb, fa, fb)
    correlation: Dict[str, Dict[str, Optional[float]]] = {
        SCORE_KEY: {"spearman": point["spearman"], "kendall": point["kendall"]}}
    for name in sorted(set(ra.baselines) & set(rb.baselines)):
        ba = [_or_nan(ra.layer(n).baselines.get(name)) for n in shared]
        bb = [_or_nan(rb.layer(n).baselines.get(name)) for n in shared]
        correlation[name] = {"spearman": spearman(ba, bb), "kendall": kendall_tau_b(ba, bb)}
    g = len(shared)
    topk = {k: len(top_k(shared, sa, k) & top_k(shared, sb, k)) / k
            for k in (1, 2, 3) if k <= g}
    scores = [{"name": n, "params": ra.layer(n).params, "score_a": ra.layer(n).score,
               "score_b": rb.layer(n).score, "flagged_a": n in fa, "flagged_b": n in fb,
               "flag_frequency_a": ra.layer(n).flag_frequency,
               "flag_frequency_b": rb.layer(n).flag_frequency} for n in shared]
    regression, note = _bisection(a, b, ra, rb, config)
    return CompareResult(_summary(ra), _summary(rb), tuple(shared), left_out,
                         tuple(n for n in shared if n in fa), tuple(n for n in shared if n in fb),
                         point["jaccard"], point["overlap_coefficient"], topk, correlation,
                         _chance(g, fa, fb), _bootstrap(ra, rb, shared, config), scores, config,
                         regression, note)


def _bisection(a: Union[ScanResult, AuditRecord], b: Union[ScanResult, AuditRecord],
               ra: AuditRecord, rb: AuditRecord, config: CompareConfig
               ) -> Tuple[Optional[Regression], Optional[str]]:
    """The regression bisection of B against A (:mod:`.bisect`) when both scans hold their
    models and were made on the same probe; else why not.

    Raises:
        BisectError: the models have the same groups but not the same tensors (unless
            ``allow_partial``, which skips the bisection).
    """
    if not all(hasattr(getattr(x, "checkpoint", None), "model") for x in (a, b)):
        return None, ("regression bisection needs both models: compare two checkpoints, not "
                      "audit.json files")
    if not _same_probe(ra, rb):
        return None, "regression bisection needs both scans on the same probe"
    if ra.arch != rb.arch or ra.names != rb.names:
        return None, "regression bisection needs one architecture and the same groups"
    try:
        regression = bisect(a.checkpoint.model, b.checkpoint.model,
                            layer_groups(b.checkpoint.model, b.config.options.granularity),
                            b.probe, device=b.device, batch_size=b.config.options.batch_size,
                            predictions=(a.evaluation.predictions, b.evaluation.predictions))
    except BisectError as exc:
        if config.allow_partial:
            return None, f"no regression bisection: {exc}"
        raise
    return regression, None


def _or_nan(value: Optional[float]) -> float:
    return float("nan") if value is None else value


def _shared_groups(ra: AuditRecord, rb: AuditRecord, allow_partial: bool
                   ) -> Tuple[List[str], Dict[str, List[str]]]:
    """The groups both scans have (in A's order) and those only one has; CompareError when the
    scans are not comparable and ``allow_partial`` is off."""
    names_a, names_b = ra.names, rb.names
    shared = [n for n in names_a if n in set(names_b)]
    a_only = [n for n in names_a if n not in set(names_b)]
    b_only = [n for n in names_b if n not in set(names_a)]
    if not allow_partial:
        if ra.arch != rb.arch:
            raise CompareError(
                f"the scans are of different architectures ({ra.arch} and {rb.arch}); pass "
                "--allow-partial to compare the layer groups they share")
        if a_only or b_only or ra.granularity != rb.granularity:
            raise CompareError(
                f"the scans have different layer groups (only in A: {', '.join(a_only) or '-'}; "
                f"only in B: {', '.join(b_only) or '-'}); scan both with the same "
                "--granularity, or pass --allow-partial")
    if not shared:
        raise CompareError("the scans share no layer group; nothing to compare")
    return shared, {"a_only": a_only, "b_only": b_only}


def _chance(g: int, fa: Set[str], fb: Set[str]) -> Dict[str, Any]:
    """The overlap a random second set of the same size would have (hypergeometric)."""
    observed = len(fa & fb)
    expected = len(fa) * len(fb) / g
    return {"groups": g, "size_a": len(fa), "size_b": len(fb), "observed_overlap": observed,
            "expected_overlap": expected,
            "expected_overlap_coefficient": (expected / min(len(fa), len(fb))
                                             if min(len(fa), len(fb)) else None),
            "p_value": hypergeom_sf(observed, g, len(fa), len(fb))}


def _bootstrap(ra_: AuditRecord, rb_: AuditRecord, shared: Sequence[str],
               config: CompareConfig) -> Dict[str, Any]:
    ra, rb = _Resampler(ra_), _Resampler(rb_)
    paired = _same_probe(ra_, rb_)
    info: Dict[str, Any] = {"resamples": 0, "paired": paired, "level": 0.95}
    if config.resamples == 0 or not (ra.ok and rb.ok):
        if config.resamples and not (ra.ok and rb.ok):
            info["note"] = ("no per-image reductions in one of the scans (no errors, or an "
                            "older audit.json): no intervals")
        return info
    ia = [ra_.names.index(n) for n in shared]
    ib = [rb_.names.index(n) for n in shared]
    rng = np.random.default_rng(config.seed)
    samples: Dict[str, List[Optional[float]]] = {
        "jaccard": [], "overlap_coefficient": [], "spearman": [], "kendall": []}
    for _ in range(config.resamples):
        ca = bootstrap_counts(rng, ra.n)
        cb = ca if paired else bootstrap_counts(rng, rb.n)
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


