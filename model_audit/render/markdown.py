"""The Markdown summary of a gate run, fit for ``$GITHUB_STEP_SUMMARY``."""
from __future__ import annotations

from typing import Any, Mapping, Optional

from .text import probe_unit


def _md_escape(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;").replace("\n", " ")


def markdown_summary(gate: Mapping[str, Any], audit: Optional[Mapping[str, Any]] = None) -> str:
    """A Markdown summary of ``gate.json`` (and of the scan's ``audit.json``, when one ran)."""
    icon = {True: "pass", False: "**FAIL**", None: "not run"}
    lines = [f"## model-audit gate: {gate['verdict'].upper()} (exit {gate['exit_code']})", "",
             f"Checkpoint: `{_md_escape(gate['checkpoint'])}`", ""]
    if audit:
        probe = audit["probe"]
        lines += [f"Probe: {probe['n']} {probe_unit(probe)}, accuracy "
                  f"{100 * probe['accuracy']:.2f}%; flagged groups: "
                  f"{_md_escape(', '.join(audit['flagged']) or 'none')}", ""]
    lines += ["| check | result | value | limit | message |", "|---|---|---|---|---|"]
    for c in gate["checks"]:
        lines.append(f"| {c['name']} | {icon[c['passed']]} | {_md_escape(c['value'])} | "
                     f"{_md_escape(c['limit'])} | {_md_escape(c['message'])} |")
    regression = (gate.get("comparison") or {}).get("regression")
    if regression and "summary" in regression:
        lines += ["", "Regression bisection against the baseline (exact): "
                  f"{_md_escape(regression['summary'])}"]
    elif regression and regression.get("note"):
        lines += ["", f"Regression bisection: {_md_escape(regression['note'])}"]
    if gate.get("error"):
        lines += ["", f"Error: {_md_escape(gate['error'])}"]
    return "\n".join(lines) + "\n"
