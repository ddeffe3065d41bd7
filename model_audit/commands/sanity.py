"""``sanity``: can the scan find a fault planted in *this* model?

For each selected layer group and defect, a copy of the model is damaged in that group only
(:mod:`model_audit.core.plant`), with the severity calibrated to cost the same accuracy drop on the
probe; the copy is scanned, and the rank of the planted group is recorded under each method
(the own metric, the baselines, a seeded random ranking). Per method: top-1 (the planted group
ranked first) and the mean reciprocal rank (MRR), beside their chance levels ``1/G`` and
``H_G/G``. The unmodified model is scanned too (the *null* case), so that a user sees what the
scores and flags look like when nothing was planted.

Ties are scored as a random tie-break would be on average: a planted group tied at the top
with ``t - 1`` others counts ``1/t`` of a top-1 hit, and its reciprocal rank is the mean of
``1/p`` over the tied positions ``p``. So a method that scores every group equally gets
exactly the chance level. A group a method cannot score (NaN) ranks after every scored one.

Examples:
    >>> from model_audit.commands.sanity import sanity, SanityConfig
    >>> result = sanity("model.safetensors", "probe/", SanityConfig())  # doctest: +SKIP
    >>> result.summary["combined"].top1  # doctest: +SKIP
"""
from __future__ import annotations

import os
import time
from dataclasses import replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from torch import nn

from ..core.scoring import (COMBINED, RANDOM, MethodEvidence, chance_levels, group_output_units,
                            rank_stats)
from ..results.sanity import scores_by_method, summarize
from ..io.files import read_result
from ..io.records import SANITY_FILE
from ..errors import ConfigError
from ..core.layers import LayerGroup, layer_groups
from ..core.calibrate import PlantResult, calibrate
from ..core.plant import applicable, resolve_defects
from ..io.probe import BatchCache, ProbeSet
from ..commands.scan import scan
from ..results.scan import ScanConfig
from ..options import resolve_device, resolve_inputs, seed_everything
from ..baselines import resolve_baselines

from ..results.sanity import NullCase, SanityCase, SanityConfig, SanityResult
from ..models.checkpoint import LoadedCheckpoint
from ..results.scan import ScanResult

# ------------------------------------------------------------------------------------------
# The check


def select_groups(groups: Sequence[LayerGroup], config: SanityConfig
                  ) -> Tuple[List[LayerGroup], str]:
    """The groups to plant in, and how they were chosen (for the output)."""
    if config.groups is not None:
        return [g for g in groups if g.name in config.groups], "given"
    if len(groups) <= config.max_groups:
        return list(groups), "all"
    picks = sorted({int(round(i)) for i in np.linspace(0, len(groups) - 1, config.max_groups)})
    return [groups[i] for i in picks], f"an even spread of {len(picks)} of {len(groups)}"


def _listed(values: np.ndarray) -> List[Optional[float]]:
    return [float(v) if np.isfinite(v) else None for v in values]


def _top(names: Sequence[str], values: np.ndarray) -> str:
    key = np.where(np.isfinite(values), values, -np.inf)
    return names[int(np.argmax(key))]


def case_from_scan(plant: PlantResult, result: ScanResult, names: Sequence[str],
                   scores: Dict[str, np.ndarray], seconds: float) -> SanityCase:
    """Score one scanned damaged copy: the rank of the planted group under every method."""
    true = list(names).index(plant.group)
    ranks, top1, recip, top = {}, {}, {}, {}
    for m, values in scores.items():
        ranks[m], top1[m], recip[m] = rank_stats(values, true)
        top[m] = _top(names, values)
    return SanityCase(plant, ranks, top1, recip, top, tuple(result.flagged),
                      {m: _listed(v) for m, v in scores.items()}, seconds)


# Progress callback: (cases done, cases in all, the case just finished or None).
ProgressFn = Callable[[int, int, Optional[SanityCase]], None]


def plan_cases(model: nn.Module, groups: Sequence[LayerGroup], config: SanityConfig, seed: int
               ) -> Tuple[List[Tuple[LayerGroup, str, int]], List[Tuple[str, str]]]:
    """``(group, defect, seed)`` of every case, and the pairs a defect cannot apply to."""
    cases, skipped = [], []
    for r in range(config.repeats):
        for g in groups:
            for d in resolve_defects(config.defects):
                if applicable(model, g, d):
                    cases.append((g, d, seed + r))
                elif r == 0:
                    skipped.append((g.name, d))
    return cases, skipped


def run_cases(ckpt: LoadedCheckpoint, probe: ProbeSet, groups: Sequence[LayerGroup],
              plan: Sequence[Tuple[LayerGroup, str, int]], config: SanityConfig, *,
              device: str, on_case: Optional[ProgressFn] = None,
              units: Optional[np.ndarray] = None,
              extra: Optional[Callable[[LoadedCheckpoint, ScanResult],
                                       Dict[str, np.ndarray]]] = None,
              on_damaged: Optional[Callable[[PlantResult, nn.Module], None]] = None
              ) -> Tuple[List[SanityCase], NullCase]:
    """Plant, calibrate, scan and score every case of ``plan`` (and the null case).

    ``extra(checkpoint, scan_result)`` may add scores of further methods to every case (the
    localize benchmark's candidate metrics); ``on_damaged(plant, model)`` sees every damaged
    copy (``--keep-damaged``).
    """
    scan_config: ScanConfig = config.scan or ScanConfig()
    opts = scan_config.options
    names = [g.name for g in groups]
    model = ckpt.model
    # calibration evaluates the probe many times: each rank its block (a single process: all)
    batches = BatchCache(probe, list(range(len(probe))), opts.batch_size, shard=True)
    result = scan(ckpt, probe, scan_config)
    scores = scores_by_method(result, units=units, random_seed=opts.seed)
    if extra:
        scores.update(extra(ckpt, result))
    null = NullCase(result.evaluation.accuracy, tuple(result.flagged),
                    {m: _listed(v) for m, v in scores.items()},
                    {m: _top(names, v) for m, v in scores.items()},
                    tuple(layer.score_interval[1] for layer in result.layers))
    base_acc = result.evaluation.accuracy  # the calibration's "before", measured once
    cases: List[SanityCase] = []
    for k, (group, defect, seed) in enumerate(plan):
        t0 = time.perf_counter()
        planted = calibrate(model, probe, group, defect, drop=config.drop,
                            tolerance=config.tolerance, seed=seed,
                            max_evaluations=config.max_evaluations, device=device,
                            base_accuracy=base_acc, batches=batches,
                            batch_size=opts.batch_size)
        if on_damaged:
            on_damaged(planted.result, planted.model)
        damaged = replace(ckpt, model=planted.model)
        case_config = replace(scan_config, options=replace(opts, seed=seed))
        result = scan(damaged, probe, case_config)
        scores = scores_by_method(result, units=units, random_seed=seed * 7919 + k)
        if extra:
            scores.update(extra(damaged, result))
        case = case_from_scan(planted.result, result, names, scores, time.perf_counter() - t0)
        cases.append(case)
        if on_case:
            on_case(k + 1, len(plan), case)
    return cases, null


def sanity(checkpoint: Union[str, os.PathLike, LoadedCheckpoint],
           probe: Union[str, os.PathLike, ProbeSet], config: SanityConfig = SanityConfig(), *,
           on_case: Optional[ProgressFn] = None,
           on_damaged: Optional[Callable[[PlantResult, nn.Module], None]] = None,
           on_plan: Optional[Callable[[Dict[str, Any]], None]] = None) -> SanityResult:
    """Plant a fault in each selected group of the model, scan, and score the localisation.

    Args:
        checkpoint: a path or a :class:`~model_audit.models.checkpoint.LoadedCheckpoint`.
        probe: a path (opened with the scan options) or a ProbeSet.
        config: defects, drop, groups, repeats and the scan's settings.
        on_case: called after every case (for a progress bar).
        on_damaged: called with every damaged copy (to save it).
        on_plan: called once before the work starts, with the plan's cost (cases, scans,
            probe size, which groups).

    Raises:
        AuditError: bad checkpoint, probe or options (before any work).
    """
    start = time.perf_counter()
    # every method is scored on its own ranking: the scans flag by the own rule
    scan_config: ScanConfig = replace(config.scan or ScanConfig(), method="own", evidence=None)
    scan_config.validate()
    opts = scan_config.options
    ckpt, probe, _ = resolve_inputs(checkpoint, probe, opts)
    groups = layer_groups(ckpt.model, opts.granularity)
    config.validate(groups)
    device = resolve_device(opts.device)
    seed_everything(opts.seed)
    chosen, selection = select_groups(groups, config)
    plan, skipped = plan_cases(ckpt.model, chosen, config, opts.seed)
    if on_plan:
        on_plan({**expected_cost(len(plan), len(probe), config.max_evaluations),
                 "cases": len(plan), "groups": [g.name for g in chosen], "selection": selection,
                 "not_applicable": skipped})
    first = probe.load([0])
    units = group_output_units(ckpt.model, groups, first)
    cases, null = run_cases(ckpt, probe, groups, plan, replace(config, scan=scan_config),
                            device=device, on_case=on_case, units=units,
                            on_damaged=on_damaged)
    methods = method_names(scan_config)
    extra = {"model": ckpt.to_dict(), "probe": probe.describe(), "metric": scan_config.metric,
             "options": {**opts.to_dict(), "tolerance": config.tolerance,
                         "repeats": config.repeats, "max_evaluations": config.max_evaluations,
                         "baselines": list(scan_config.baselines)}}
    return SanityResult(tuple(g.name for g in groups), tuple(g.name for g in chosen), selection,
                        resolve_defects(config.defects), config.drop, tuple(cases), null,
                        methods, summarize(cases, methods, scan_config.metric),
                        chance_levels(len(groups)), time.perf_counter() - start,
                        tuple(skipped), extra)


# ------------------------------------------------------------------------------------------
# Output: the terminal table, sanity.json, report.html


def evidence_of(result: SanityResult, source: str = "sanity") -> MethodEvidence:
    """The localisation evidence of a sanity run, for ``ScanConfig(method="auto")``."""
    return MethodEvidence.from_dict(result.to_dict(), source)   # as from its sanity.json


def read_evidence(path: Union[str, os.PathLike]) -> MethodEvidence:
    """The evidence of a ``sanity.json`` file (``scan --sanity``), read as the gate reads one
    (:func:`~model_audit.io.files.read_result`).

    Raises:
        ConfigError: a file that is missing, not JSON, or not a sanity.json.
    """
    data = read_result(path, SANITY_FILE, required=("methods", "chance"))
    try:
        return MethodEvidence.from_dict(data, str(path))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path} is not {SANITY_FILE} ({type(exc).__name__}: {exc})") from None


def scan_with_best_method(checkpoint: Union[str, os.PathLike, LoadedCheckpoint],
                          probe: Union[str, os.PathLike, ProbeSet], config: ScanConfig,
                          sanity_config: Optional[SanityConfig] = None, *,
                          progress: bool = False,
                          run_sanity: Callable[..., SanityResult] = sanity,
                          source: str = "sanity") -> Tuple[ScanResult, SanityResult]:
    """``scan --method auto`` without evidence: a sanity run on the checkpoint and probe
    first, then the scan ranked by the method that localised best there.

    Args:
        run_sanity: runs the sanity check, ``(checkpoint, probe, SanityConfig)`` ->
            :class:`SanityResult` (the CLI passes :func:`run_sanity_cli`, with its cost and
            progress bar).
        source: where the evidence is said to come from (the CLI: the directory it writes
            the sanity result to).

    Returns:
        (the :class:`~model_audit.results.scan.ScanResult`, the :class:`SanityResult`).
    """
    own = replace(config, method="own", evidence=None)
    result = run_sanity(checkpoint, probe, replace(sanity_config or SanityConfig(), scan=own))
    chosen = replace(config, method="auto", evidence=evidence_of(result, source))
    return scan(checkpoint, probe, chosen, progress=progress), result


def method_names(scan_config: ScanConfig) -> Tuple[str, ...]:
    """The methods a sanity check reports: the own metric, each baseline, the combined method
    (with Auto-RGN), random."""
    baselines = resolve_baselines(list(scan_config.baselines))
    combined = (COMBINED,) if "auto_rgn" in baselines else ()
    return (scan_config.metric, *baselines, *combined, RANDOM)


def expected_cost(n_cases: int, probe_size: int, max_evaluations: int) -> Dict[str, int]:
    """Scans and probe evaluations a check will take at most (for the up-front estimate)."""
    return {"scans": n_cases + 1, "probe_images_per_scan": probe_size,
            "evaluations_at_most": n_cases * max_evaluations + 1}


__all__ = ["sanity", "run_cases", "plan_cases", "select_groups", "case_from_scan", "evidence_of",
           "read_evidence", "scan_with_best_method"]
