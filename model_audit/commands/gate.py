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
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ..io.files import atomic_write_files, header, json_bytes, refuse_inputs
from ..errors import CheckpointError, ConfigError, EmptyInputError

EXIT_PASS, EXIT_FAIL, EXIT_BAD_INPUT, EXIT_NOTHING = 0, 1, 2, 3
EXIT_CODES = {EXIT_PASS: "all checks passed", EXIT_FAIL: "a check failed",
              EXIT_BAD_INPUT: "bad input or internal error", EXIT_NOTHING: "nothing was audited"}

FORMATS = ("safetensors", "pt")

#: key -> (accepted types, description)
POLICY_KEYS: Dict[str, Tuple[Tuple[type, ...], str]] = {
    "formats": ((list,), "allowed checkpoint formats"),
    "allow_nonfinite": ((bool,), "allow NaN/Inf tensors"),
    "min_accuracy": ((int, float), "minimum probe accuracy (0..1)"),
    "min_class_accuracy": ((int, float), "minimum accuracy of every class (0..1)"),
    "max_flagged": ((int,), "maximum number of flagged layer groups"),
    "no_new_flags": ((bool,), "no group flagged that the baseline did not flag"),
    "min_overlap": ((int, float), "minimum Jaccard overlap of flagged sets with the baseline"),
    "min_rank_correlation": ((int, float), "minimum Spearman correlation with the baseline"),
    "max_scan_seconds": ((int, float), "maximum scan wall time in seconds"),
    "min_sanity_top1": ((int, float), "minimum top-1 of the own metric on planted faults "
                                      "(model-audit sanity, 0..1)"),
}

EXAMPLE_POLICY = '''# model-audit gate policy. Every key is optional: leave one out to skip that check.
# Exit codes: 0 passed, 1 a check failed, 2 bad input, 3 nothing audited.
[policy]
# Checkpoint formats allowed: "safetensors" (recommended) and "pt" (read weights-only).
formats = ["safetensors"]
# Fail when any tensor holds NaN or Inf.
allow_nonfinite = false
# Accuracy on the probe set, overall and for every class (fractions, 0..1).
min_accuracy = 0.90
min_class_accuracy = 0.75
# At most this many layer groups may be flagged by the scan.
max_flagged = 3
# With --baseline AUDIT.json (the previous release's scan): no newly flagged group, and the
# flagged sets and per-group scores must agree this much. Without --baseline these checks fail.
# no_new_flags = true
# min_overlap = 0.5
# min_rank_correlation = 0.7
# Wall time of the scan, in seconds.
max_scan_seconds = 900
# Can the scan localise faults in this model at all? `model-audit sanity` plants a fault in
# each layer group; the own metric must rank the planted group first this often (0..1).
# With --sanity SANITY.json the gate reads a saved check, else it runs one (noise and
# reinit in every group: one scan per case, so it costs many scans).
# min_sanity_top1 = 0.5
'''


@dataclass(frozen=True)
class Policy:
    """A validated gate policy; ``None`` means the check is off."""

    formats: Tuple[str, ...] = ("safetensors",)
    allow_nonfinite: bool = False
    min_accuracy: Optional[float] = None
    min_class_accuracy: Optional[float] = None
    max_flagged: Optional[int] = None
    no_new_flags: Optional[bool] = None
    min_overlap: Optional[float] = None
    min_rank_correlation: Optional[float] = None
    max_scan_seconds: Optional[float] = None
    min_sanity_top1: Optional[float] = None
    source: str = ""

    @property
    def needs_baseline(self) -> bool:
        return bool(self.no_new_flags) or self.min_overlap is not None \
            or self.min_rank_correlation is not None


def load_policy(path: Union[str, os.PathLike]) -> Policy:
    """Read and validate a policy file.

    Raises:
        ConfigError: missing file, invalid TOML, unknown keys, wrong types or ranges.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"policy file {path} does not exist; `model-audit gate --init "
                          "--policy PATH` writes a commented example")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    extra = sorted(set(data) - {"policy"})
    if extra:
        raise ConfigError(f"{path}: unknown table or key {', '.join(extra)}; put the checks "
                          "under [policy]")
    table = data.get("policy", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [policy] must be a table")
    values: Dict[str, Any] = {}
    for key, value in table.items():
        if key not in POLICY_KEYS:
            raise ConfigError(f"{path}: unknown policy key {key!r}; valid: "
                              f"{', '.join(sorted(POLICY_KEYS))}")
        types, what = POLICY_KEYS[key]
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            raise ConfigError(f"{path}: {key} ({what}) must be "
                              f"{' or '.join(t.__name__ for t in types)}, got {value!r}")
        values[key] = value
    formats = values.get("formats", ["safetensors"])
    if not formats or not all(isinstance(f, str) and f in FORMATS for f in formats):
        raise ConfigError(f"{path}: formats must be a non-empty list of {', '.join(FORMATS)}; "
                          f"got {formats!r}")
    for key in ("min_accuracy", "min_class_accuracy", "min_overlap", "min_sanity_top1"):
        if key in values and not 0.0 <= float(values[key]) <= 1.0:
            raise ConfigError(f"{path}: {key} must be between 0 and 1, got {values[key]!r}")
    if "min_rank_correlation" in values and not -1.0 <= float(values["min_rank_correlation"]) <= 1.0:
        raise ConfigError(f"{path}: min_rank_correlation must be between -1 and 1")
    for key in ("max_flagged", "max_scan_seconds"):
        if key in values and values[key] < 0:
            raise ConfigError(f"{path}: {key} must be >= 0, got {values[key]!r}")
    values["formats"] = tuple(formats)
    return Policy(source=str(path), **values)


@dataclass(frozen=True)
class Check:
    """One check: ``passed`` is None when it did not run (and the gate says why)."""

    name: str
    passed: Optional[bool]
    value: Any
    limit: Any
    message: str

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "value": self.value,
                "limit": self.limit, "message": self.message}


@dataclass(frozen=True)
class GateResult:
    """The verdict and every check; ``audit`` is the scan's ``audit.json`` content, if any."""

    checks: Tuple[Check, ...]
    exit_code: int
    policy: Policy
    checkpoint: str
    audit: Optional[Dict[str, Any]] = None
    comparison: Optional[Dict[str, Any]] = None
    seconds: float = 0.0
    error: Optional[str] = None

    @property
    def verdict(self) -> str:
        return {EXIT_PASS: "pass", EXIT_FAIL: "fail", EXIT_NOTHING: "nothing audited"}.get(
            self.exit_code, "error")

    def to_dict(self) -> Dict[str, Any]:
        return {**header(),
                "checkpoint": self.checkpoint, "verdict": self.verdict,
                "exit_code": self.exit_code, "meaning": EXIT_CODES[self.exit_code],
                "policy": {k: (list(v) if isinstance(v, tuple) else v)
                           for k, v in self.policy.__dict__.items()},
                "checks": [c.to_dict() for c in self.checks],
                "failed": [c.name for c in self.checks if c.passed is False],
                "error": self.error, "seconds": round(self.seconds, 3),
                "comparison": self.comparison}


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in (".pt", ".pth", ".bin", ".ckpt"):
        return "pt"
    return suffix.lstrip(".") or "unknown"


def check_gate(checkpoint: Union[str, os.PathLike], probe: Union[str, os.PathLike],
               policy: Policy, *, baseline: Optional[Union[str, os.PathLike]] = None,
               scan_config: Any = None, progress: bool = False,
               sanity: Optional[Union[str, os.PathLike]] = None) -> GateResult:
    """Run the policy's checks on a checkpoint and its scan.

    Bad input (probe, options, baseline file) raises :class:`AuditError` (exit 2); an empty
    probe or a checkpoint without tensors gives exit code 3 (nothing audited); problems of the
    checkpoint itself are failed checks (exit 1), since refusing such a model is the gate's job.
    ``min_sanity_top1`` reads ``sanity`` (a ``sanity.json``) when given, else runs the check.
    """
    from ..io.tensors import read_tensors
    from ..commands.compare import CompareConfig, compare, load_audit
    from ..commands.scan import ScanConfig, scan
    start = time.perf_counter()
    path = Path(checkpoint)
    config = scan_config or ScanConfig()
    base = load_audit(baseline) if baseline is not None else None
    saved_sanity = None
    if sanity is not None:
        from ..commands.sanity import load_sanity
        saved_sanity = load_sanity(sanity)
    checks: List[Check] = []

    def done(exit_code: int, audit: Optional[Dict[str, Any]] = None,
             comparison: Optional[Dict[str, Any]] = None, error: Optional[str] = None) -> GateResult:
        return GateResult(tuple(checks), exit_code, policy, str(path), audit, comparison,
                          time.perf_counter() - start, error)

    def not_run(reason: str) -> None:
        for name in _configured_checks(policy):
            if not any(c.name == name for c in checks):
                checks.append(Check(name, None, None, _limit(policy, name), f"not run: {reason}"))

    fmt = _format_of(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    ok = fmt in policy.formats
    checks.append(Check("file_format", ok, fmt, list(policy.formats),
                        f"{fmt} is allowed" if ok else
                        f"{fmt} files are not allowed by the policy (allowed: "
                        f"{', '.join(policy.formats)})"))
    if not ok:
        not_run("the file format is not allowed")
        return done(EXIT_FAIL)
    try:
        state, _ = read_tensors(path)
    except EmptyInputError as exc:
        not_run("there is nothing to audit")
        return done(EXIT_NOTHING, error=str(exc))
    except CheckpointError as exc:
        checks.append(Check("loads_safely", False, None, None, str(exc)))
        not_run("the checkpoint cannot be loaded safely")
        return done(EXIT_FAIL)
    checks.append(Check("loads_safely", True, len(state), None,
                        f"{len(state)} tensors read ({'weights-only' if fmt == 'pt' else 'safetensors'})"))
    bad = sorted(k for k, v in state.items() if v.is_floating_point() and not bool(v.isfinite().all()))
    ok = not bad or policy.allow_nonfinite
    checks.append(Check("finite_tensors", ok, bad, "none" if not policy.allow_nonfinite else "any",
                        "no NaN/Inf values" if not bad else
                        f"{len(bad)} tensor(s) hold NaN/Inf: {', '.join(bad[:10])}"))
    del state
    if bad and not policy.allow_nonfinite:
        not_run("the checkpoint holds NaN/Inf values")
        return done(EXIT_FAIL)
    try:
        result = scan(path, probe, config, progress=progress)
    except EmptyInputError as exc:
        not_run("there is nothing to audit")
        return done(EXIT_NOTHING, error=str(exc))
    except CheckpointError as exc:  # does not fit the architecture: broken for this release
        checks.append(Check("loads_safely", False, None, None, str(exc)))
        checks[:] = [c for c in checks if not (c.name == "loads_safely" and c.passed)]
        not_run("the checkpoint does not load into the architecture")
        return done(EXIT_FAIL)
    audit = result.to_dict()
    _result_checks(checks, policy, audit)
    if policy.min_sanity_top1 is not None:
        if saved_sanity is None:
            from ..commands.sanity import SanityConfig
            from ..commands.sanity import sanity as run_sanity
            saved_sanity = run_sanity(path, probe, SanityConfig(scan=config)).to_dict()
        _sanity_check(checks, policy, saved_sanity)
    comparison = None
    if policy.needs_baseline:
        if base is None:
            for name in ("no_new_flags", "min_overlap", "min_rank_correlation"):
                if _limit(policy, name) is not None:
                    checks.append(Check(name, False, None, _limit(policy, name),
                                        "the policy requires a baseline: pass --baseline "
                                        "AUDIT.json (the previous release's audit)"))
        else:
            cmp = compare(base, audit, CompareConfig(allow_partial=True, resamples=0)).to_dict()
            comparison = cmp
            _baseline_checks(checks, policy, cmp)
    failed = any(c.passed is False for c in checks)
    return done(EXIT_FAIL if failed else EXIT_PASS, audit, comparison)


def _configured_checks(policy: Policy) -> List[str]:
    names = ["loads_safely", "finite_tensors"]
    names += [n for n in ("min_accuracy", "min_class_accuracy", "max_flagged", "no_new_flags",
                          "min_overlap", "min_rank_correlation", "max_scan_seconds",
                          "min_sanity_top1")
              if _limit(policy, n) is not None]
    return names


def _limit(policy: Policy, name: str) -> Any:
    return getattr(policy, name, None)


def _result_checks(checks: List[Check], policy: Policy, audit: Dict[str, Any]) -> None:
    probe = audit["probe"]
    if policy.min_accuracy is not None:
        acc = probe["accuracy"]
        ok = acc >= policy.min_accuracy
        checks.append(Check("min_accuracy", ok, acc, policy.min_accuracy,
                            f"accuracy {100 * acc:.2f}% {'>=' if ok else '<'} "
                            f"{100 * policy.min_accuracy:.2f}% on {probe['n']} images"))
    if policy.min_class_accuracy is not None:
        per = {k: v for k, v in probe["per_class_accuracy"].items() if v is not None}
        low = {k: v for k, v in per.items() if v < policy.min_class_accuracy}
        worst = min(per.values()) if per else None
        checks.append(Check(
            "min_class_accuracy", not low, worst, policy.min_class_accuracy,
            "every class reaches the minimum" if not low else
            "classes below the minimum: " + ", ".join(f"{k} ({100 * v:.1f}%)"
                                                      for k, v in sorted(low.items(), key=lambda kv: kv[1]))))
    if policy.max_flagged is not None:
        n = len(audit["flagged"])
        ok = n <= policy.max_flagged
        checks.append(Check("max_flagged", ok, n, policy.max_flagged,
                            f"{n} flagged group(s): {', '.join(audit['flagged']) or 'none'}"))
    if policy.max_scan_seconds is not None:
        t = audit["timing"]["total_s"]
        ok = t <= policy.max_scan_seconds
        checks.append(Check("max_scan_seconds", ok, t, policy.max_scan_seconds,
                            f"scan took {t:.1f} s"))


def _sanity_check(checks: List[Check], policy: Policy, data: Dict[str, Any]) -> None:
    metric = data.get("metric", "replay_reduction")
    own = data["methods"][metric]
    top1, n = own.get("top1"), own.get("n", 0)
    chance = data.get("chance", {}).get("top1")
    ok = top1 is not None and top1 >= policy.min_sanity_top1
    detail = (f"the scan ranked the planted group first in {100 * top1:.0f}% of {n} planted "
              f"faults (chance {100 * chance:.0f}%)" if top1 is not None and chance is not None
              else "no planted fault reached its accuracy drop: nothing to score")
    checks.append(Check("min_sanity_top1", ok, top1, policy.min_sanity_top1, detail))


def _baseline_checks(checks: List[Check], policy: Policy, cmp: Dict[str, Any]) -> None:
    if policy.no_new_flags:
        new = [g for g in cmp["flagged"]["b"] if g not in cmp["flagged"]["a"]]
        checks.append(Check("no_new_flags", not new, new, [],
                            "no newly flagged group" if not new else
                            f"newly flagged compared to the baseline: {', '.join(new)}"))
    if policy.min_overlap is not None:
        j = cmp["jaccard"]
        value = 1.0 if j is None else j  # both flag nothing: identical sets
        ok = value >= policy.min_overlap
        checks.append(Check("min_overlap", ok, value, policy.min_overlap,
                            f"Jaccard overlap of the flagged sets {value:.3f}"))
    if policy.min_rank_correlation is not None:
        rho = cmp["correlation"]["replay_reduction"]["spearman"]
        ok = rho is not None and rho >= policy.min_rank_correlation
        checks.append(Check("min_rank_correlation", ok, rho, policy.min_rank_correlation,
                            f"Spearman correlation of the scores {rho:.3f}" if rho is not None
                            else "rank correlation undefined (constant scores)"))


# ------------------------------------------------------------------------------------------
# Outputs


def junit_xml(result: GateResult) -> str:
    """JUnit XML: one testcase per check; failed checks are failures, not-run ones skipped."""
    suite = ET.Element("testsuite", name="model-audit gate", tests=str(len(result.checks)),
                       failures=str(sum(c.passed is False for c in result.checks)),
                       skipped=str(sum(c.passed is None for c in result.checks)),
                       time=f"{result.seconds:.3f}")
    for check in result.checks:
        case = ET.SubElement(suite, "testcase", classname="model_audit.commands.gate", name=check.name)
        if check.passed is False:
            ET.SubElement(case, "failure", message=check.message).text = (
                f"value: {check.value!r}; limit: {check.limit!r}")
        elif check.passed is None:
            ET.SubElement(case, "skipped", message=check.message)
        ET.SubElement(case, "system-out").text = check.message
    if result.error:
        case = ET.SubElement(suite, "testcase", classname="model_audit.commands.gate", name="gate")
        ET.SubElement(case, "error", message=result.error)
    suites = ET.Element("testsuites")
    suites.append(suite)
    return ET.tostring(suites, encoding="unicode", xml_declaration=True)


def _md_escape(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;").replace("\n", " ")


def markdown_summary(result: GateResult) -> str:
    """A Markdown summary fit for ``$GITHUB_STEP_SUMMARY``."""
    icon = {True: "pass", False: "**FAIL**", None: "not run"}
    lines = [f"## model-audit gate: {result.verdict.upper()} (exit {result.exit_code})", "",
             f"Checkpoint: `{_md_escape(result.checkpoint)}`", ""]
    if result.audit:
        p = result.audit["probe"]
        lines += [f"Probe: {p['n']} images, accuracy {100 * p['accuracy']:.2f}%; flagged groups: "
                  f"{_md_escape(', '.join(result.audit['flagged']) or 'none')}", ""]
    lines += ["| check | result | value | limit | message |", "|---|---|---|---|---|"]
    for c in result.checks:
        lines.append(f"| {c.name} | {icon[c.passed]} | {_md_escape(c.value)} | "
                     f"{_md_escape(c.limit)} | {_md_escape(c.message)} |")
    if result.error:
        lines += ["", f"Error: {_md_escape(result.error)}"]
    return "\n".join(lines) + "\n"


def write_gate(result: GateResult, out_dir: Union[str, os.PathLike], *,
               junit: Optional[Union[str, os.PathLike]] = None,
               summary: Optional[Union[str, os.PathLike]] = None,
               inputs: Tuple[Union[str, os.PathLike], ...] = ()) -> Dict[str, Path]:
    """Write gate.json, report.html (and audit.json when a scan ran), JUnit and Markdown,
    all or none of them (atomically)."""
    from ..render.html import render_gate_report, reopen_probe
    out = Path(out_dir)
    targets = [out / "gate.json"] + [Path(p) for p in (junit, summary) if p is not None]
    refuse_inputs(targets + [out], inputs, "")
    paths: Dict[str, Path] = {"gate": out / "gate.json", "report": out / "report.html"}
    data = result.to_dict()
    html = render_gate_report(data, result.audit,
                              reopen_probe(result.audit) if result.audit else None)
    files = [(paths["gate"], json_bytes(data)), (paths["report"], html.encode("utf-8"))]
    if result.audit is not None:
        paths["audit"] = out / "audit.json"
        files.append((paths["audit"], json_bytes(result.audit)))
    if junit is not None:
        paths["junit"] = Path(junit)
        files.append((paths["junit"], junit_xml(result).encode("utf-8")))
    if summary is not None:
        paths["summary"] = Path(summary)
        files.append((paths["summary"], markdown_summary(result).encode("utf-8")))
    atomic_write_files(files)  # all of them or none: a full disk leaves the old ones
    return paths
