"""``gate``: a release gate for checkpoints, driven by a policy file.

Exit codes (:data:`EXIT_CODES`): 0 every check passed; 1 a check failed (this includes a
checkpoint that is unsafe or impossible to load, and a check the policy asks for that could not
run, e.g. a baseline check without ``--baseline``); 2 bad input (policy, probe, options) or an
internal error; 3 nothing was audited (an empty probe, a checkpoint without tensors).

The policy is TOML; every key is optional and an absent key means "no such check"::

    [policy]
    formats = ["safetensors"]      # allowed checkpoint formats: safetensors, pt
    allow_nonfinite = false        # NaN/Inf tensors fail the gate
    min_accuracy = 0.90            # on the probe
    min_class_accuracy = 0.80      # every class on the probe
    max_flagged = 3                # flagged layer groups
    no_new_flags = true            # no group flagged now that the baseline did not flag
    min_overlap = 0.5              # Jaccard of the flagged sets with the baseline
    min_rank_correlation = 0.7     # Spearman of the per-group scores with the baseline
    max_scan_seconds = 600
    min_sanity_top1 = 0.5          # `model-audit sanity`: the scan finds planted faults

``check_gate`` never exits or prints: it returns a :class:`GateResult`.
"""
from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, List, Optional, Tuple, Union

from torch import nn

from ..core.attribution import SCORE_KEY
from ..core.layers import layer_groups
from ..errors import CheckpointError, EmptyInputError
from ..io.records import AuditRecord, SanityRecord
from ..io.tensors import read_tensors, sha256_file
from ..models.checkpoint import load_checkpoint
from ..policy import Policy
from ..results.compare import CompareConfig, CompareResult
from ..results.gate import EXIT_FAIL, EXIT_NOTHING, EXIT_PASS, Check, GateResult
from ..results.sanity import SanityConfig
from ..results.scan import ScanConfig, ScanResult
from .bisect import BisectError, bisect
from .compare import compare
from .sanity import sanity as run_sanity
from .scan import scan


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in (".pt", ".pth", ".bin", ".ckpt"):
        return "pt"
    return suffix.lstrip(".") or "unknown"


class _Run:
    """The checks of one gate run so far, and how it ends."""

    def __init__(self, policy: Policy, path: Path) -> None:
        self.policy, self.path = policy, path
        self.checks: List[Check] = []
        self.start = time.perf_counter()

    def done(self, exit_code: int, audit: Optional[AuditRecord] = None,
             comparison: Optional[CompareResult] = None, error: Optional[str] = None
             ) -> GateResult:
        return GateResult(tuple(self.checks), exit_code, self.policy, str(self.path), audit,
                          comparison, time.perf_counter() - self.start, error)

    def stop(self, exit_code: int, reason: str, error: Optional[str] = None) -> GateResult:
        """End early: every configured check that has not run is reported as not run."""
        for name in _configured_checks(self.policy):
            if not any(c.name == name for c in self.checks):
                self.checks.append(Check(name, None, None, _limit(self.policy, name),
                                         f"not run: {reason}"))
        return self.done(exit_code, error=error)


def check_gate(checkpoint: Union[str, os.PathLike, nn.Module], probe: Any,
               policy: Policy, *, baseline: Optional[Union[str, os.PathLike]] = None,
               scan_config: Optional[ScanConfig] = None, progress: bool = False,
               sanity: Optional[Union[str, os.PathLike]] = None) -> GateResult:
    """Run the policy's checks on a checkpoint and its scan.

    Bad input (probe, options, baseline file) raises :class:`AuditError` (exit 2); an empty
    probe or a checkpoint without tensors gives exit code 3 (nothing audited); problems of the
    checkpoint itself are failed checks (exit 1), since refusing such a model is the gate's job.
    ``min_sanity_top1`` reads ``sanity`` (a ``sanity.json``) when given, else runs the check.
    An ``nn.Module`` in memory (and a probe in memory: a Dataset, a DataLoader or tensors) is
    gated the same way, except that there is no file whose format to check (``file_format``
    is not run).
    """
    in_memory = isinstance(checkpoint, nn.Module)
    path = Path(f"<in-memory {type(checkpoint).__name__}>") if in_memory else Path(checkpoint)
    model: Any = checkpoint if in_memory else path
    config = scan_config or ScanConfig()
    base = AuditRecord.read(baseline) if baseline is not None else None
    saved_sanity = SanityRecord.read(sanity) if sanity is not None else None
    run = _Run(policy, path)
    if not in_memory and not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    stopped = _module_checks(run, checkpoint) if in_memory else _file_checks(run)
    if stopped is not None:
        return stopped
    try:
        scanned = scan(model, probe, config, progress=progress)
        audit = scanned.record()
    except EmptyInputError as exc:
        return run.stop(EXIT_NOTHING, "there is nothing to audit", str(exc))
    except CheckpointError as exc:  # does not fit the architecture: broken for this release
        run.checks[:] = [c for c in run.checks if c.name != "loads_safely"]
        run.checks.append(Check("loads_safely", False, None, None, str(exc)))
        return run.stop(EXIT_FAIL, "the checkpoint does not load into the architecture")
    _result_checks(run.checks, policy, audit)
    if policy.min_sanity_top1 is not None:
        if saved_sanity is None:
            saved_sanity = SanityRecord.from_dict(
                run_sanity(model, probe, SanityConfig(scan=config)).to_dict())
        _sanity_check(run.checks, policy, saved_sanity)
    comparison = _baseline_checks(run.checks, policy, base, audit)
    if comparison is not None:
        comparison = _bisect_against(base, scanned, comparison)
    failed = any(c.passed is False for c in run.checks)
    return run.done(EXIT_FAIL if failed else EXIT_PASS, audit, comparison)


def _bisect_against(base: AuditRecord, scanned: ScanResult, comparison: CompareResult
                    ) -> CompareResult:
    """The comparison with the regression bisection against the baseline release, when its
    checkpoint is where its audit.json says, unchanged (same sha256), of the same groups."""
    where = base.checkpoint
    if not where or not Path(where).is_file() or sha256_file(Path(where)) != base.sha256:
        return replace(comparison, regression_note=(
            f"the baseline's checkpoint is not at {where} (as its audit.json says) with its "
            "sha256: no regression bisection"))
    if base.names != audit_names(scanned) or base.arch != scanned.checkpoint.arch:
        return replace(comparison, regression_note="the baseline has another architecture or "
                       "other groups: no regression bisection")
    options = scanned.config.options
    try:
        model = load_checkpoint(where, arch=base.arch).model
        regression = bisect(model, scanned.checkpoint.model,
                            layer_groups(scanned.checkpoint.model, options.granularity),
                            scanned.probe, device=scanned.device, batch_size=options.batch_size)
    except (BisectError, CheckpointError) as exc:
        return replace(comparison, regression_note=f"no regression bisection: {exc}")
    return replace(comparison, regression=regression)


def audit_names(scanned: ScanResult) -> Tuple[str, ...]:
    return tuple(layer.name for layer in scanned.layers)


def _file_checks(run: _Run) -> Optional[GateResult]:
    """The checks on the file itself (format, safe loading, finite values); a GateResult when
    the gate ends there."""
    policy, path = run.policy, run.path
    fmt = _format_of(path)
    ok = fmt in policy.formats
    run.checks.append(Check("file_format", ok, fmt, list(policy.formats),
                            f"{fmt} is allowed" if ok else
                            f"{fmt} files are not allowed by the policy (allowed: "
                            f"{', '.join(policy.formats)})"))
    if not ok:
        return run.stop(EXIT_FAIL, "the file format is not allowed")
    try:
        state, _ = read_tensors(path)
    except EmptyInputError as exc:
        return run.stop(EXIT_NOTHING, "there is nothing to audit", str(exc))
    except CheckpointError as exc:
        run.checks.append(Check("loads_safely", False, None, None, str(exc)))
        return run.stop(EXIT_FAIL, "the checkpoint cannot be loaded safely")
    run.checks.append(Check("loads_safely", True, len(state), None,
                            f"{len(state)} tensors read "
                            f"({'weights-only' if fmt == 'pt' else 'safetensors'})"))
    return _finite_check(run, state)


def _module_checks(run: _Run, module: nn.Module) -> Optional[GateResult]:
    """The checks of :func:`_file_checks` for a module in memory: no file format to check,
    its tensors finite."""
    state = module.state_dict()
    run.checks.append(Check("file_format", None, "in memory", list(run.policy.formats),
                            "not run: an nn.Module in memory has no file format (gate the "
                            "saved file in CI)"))
    run.checks.append(Check("loads_safely", True, len(state), None,
                            f"{len(state)} tensors of the module in memory"))
    return _finite_check(run, state)


def _finite_check(run: _Run, state: Any) -> Optional[GateResult]:
    policy = run.policy
    bad = sorted(k for k, v in state.items()
                 if v.is_floating_point() and not bool(v.isfinite().all()))
    ok = not bad or policy.allow_nonfinite
    run.checks.append(Check("finite_tensors", ok, bad,
                            "none" if not policy.allow_nonfinite else "any",
                            "no NaN/Inf values" if not bad else
                            f"{len(bad)} tensor(s) hold NaN/Inf: {', '.join(bad[:10])}"))
    if bad and not policy.allow_nonfinite:
        return run.stop(EXIT_FAIL, "the checkpoint holds NaN/Inf values")
    return None


def _configured_checks(policy: Policy) -> List[str]:
    names = ["loads_safely", "finite_tensors"]
    names += [n for n in ("min_accuracy", "min_class_accuracy", "max_flagged", "no_new_flags",
                          "min_overlap", "min_rank_correlation", "max_scan_seconds",
                          "min_sanity_top1")
              if _limit(policy, n) is not None]
    return names


def _limit(policy: Policy, name: str) -> Any:
    return getattr(policy, name, None)


def _result_checks(checks: List[Check], policy: Policy, audit: AuditRecord) -> None:
    if policy.min_accuracy is not None:
        acc = audit.accuracy
        ok = acc >= policy.min_accuracy
        checks.append(Check("min_accuracy", ok, acc, policy.min_accuracy,
                            f"accuracy {100 * acc:.2f}% {'>=' if ok else '<'} "
                            f"{100 * policy.min_accuracy:.2f}% on {audit.probe_n} "
                            f"{audit.probe_unit}"))
    if policy.min_class_accuracy is not None:
        per = {k: v for k, v in audit.per_class_accuracy.items() if v is not None}
        low = {k: v for k, v in per.items() if v < policy.min_class_accuracy}
        worst = min(per.values()) if per else None
        checks.append(Check(
            "min_class_accuracy", not low, worst, policy.min_class_accuracy,
            "every class reaches the minimum" if not low else
            "classes below the minimum: " + ", ".join(
                f"{k} ({100 * v:.1f}%)" for k, v in sorted(low.items(), key=lambda kv: kv[1]))))
    if policy.max_flagged is not None:
        n = len(audit.flagged)
        ok = n <= policy.max_flagged
        checks.append(Check("max_flagged", ok, n, policy.max_flagged,
                            f"{n} flagged group(s): {', '.join(audit.flagged) or 'none'}"))
    if policy.max_scan_seconds is not None:
        t = audit.total_seconds
        ok = t <= policy.max_scan_seconds
        checks.append(Check("max_scan_seconds", ok, t, policy.max_scan_seconds,
                            f"scan took {t:.1f} s"))


def _sanity_check(checks: List[Check], policy: Policy, sanity: SanityRecord) -> None:
    top1, n, chance = sanity.top1, sanity.cases, sanity.chance_top1
    ok = top1 is not None and top1 >= policy.min_sanity_top1
    detail = (f"the scan ({sanity.metric}) ranked the planted group first in {100 * top1:.0f}% "
              f"of {n} planted "
              f"faults (chance {100 * chance:.0f}%)" if top1 is not None and chance is not None
              else "no planted fault reached its accuracy drop: nothing to score")
    checks.append(Check("min_sanity_top1", ok, top1, policy.min_sanity_top1, detail))


def _baseline_checks(checks: List[Check], policy: Policy, base: Optional[AuditRecord],
                     audit: AuditRecord) -> Optional[CompareResult]:
    """The checks against the previous release's audit; the comparison, when one was made."""
    if not policy.needs_baseline:
        return None
    if base is None:
        for name in ("no_new_flags", "min_overlap", "min_rank_correlation"):
            if _limit(policy, name) is not None:
                checks.append(Check(name, False, None, _limit(policy, name),
                                    "the policy requires a baseline: pass --baseline "
                                    "AUDIT.json (the previous release's audit)"))
        return None
    cmp = compare(base, audit, CompareConfig(allow_partial=True, resamples=0))
    if policy.no_new_flags:
        new = list(cmp.new_flags)
        checks.append(Check("no_new_flags", not new, new, [],
                            "no newly flagged group" if not new else
                            f"newly flagged compared to the baseline: {', '.join(new)}"))
    if policy.min_overlap is not None:
        value = 1.0 if cmp.jaccard is None else cmp.jaccard  # both flag nothing: identical
        ok = value >= policy.min_overlap
        checks.append(Check("min_overlap", ok, value, policy.min_overlap,
                            f"Jaccard overlap of the flagged sets {value:.3f}"))
    if policy.min_rank_correlation is not None:
        rho = cmp.correlation[SCORE_KEY]["spearman"]
        ok = rho is not None and rho >= policy.min_rank_correlation
        checks.append(Check("min_rank_correlation", ok, rho, policy.min_rank_correlation,
                            f"Spearman correlation of the scores {rho:.3f}" if rho is not None
                            else "rank correlation undefined (constant scores)"))
    return cmp


# ------------------------------------------------------------------------------------------
# Outputs


