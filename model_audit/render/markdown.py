"""The Markdown summary of a gate run, fit for ``$GITHUB_STEP_SUMMARY``."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the gate imports this module to write its outputs: types only, no cycle
    from ..commands.gate import GateResult


def _md_escape(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;").replace("\n", " ")


def markdown_summary(result: "GateResult") -> str:
    """A Markdown summary fit for ``$GITHUB_STEP_SUMMARY``."""
    icon = {True: "pass", False: "**FAIL**", None: "not run"}
    lines = [f"## model-audit gate: {result.verdict.upper()} (exit {result.exit_code})", "",
             f"Checkpoint: `{_md_escape(result.checkpoint)}`", ""]
    if result.audit:
        a = result.audit
        lines += [f"Probe: {a.probe_n} {a.probe_unit}, accuracy {100 * a.accuracy:.2f}%; "
                  f"flagged groups: {_md_escape(', '.join(a.flagged) or 'none')}", ""]
    lines += ["| check | result | value | limit | message |", "|---|---|---|---|---|"]
    for c in result.checks:
        lines.append(f"| {c.name} | {icon[c.passed]} | {_md_escape(c.value)} | "
                     f"{_md_escape(c.limit)} | {_md_escape(c.message)} |")
    cmp = result.comparison
    if cmp is not None and cmp.regression is not None:
        lines += ["", f"Regression bisection against the baseline (exact): "
                  f"{_md_escape(cmp.regression.summary())}"]
    elif cmp is not None and cmp.regression_note:
        lines += ["", f"Regression bisection: {_md_escape(cmp.regression_note)}"]
    if result.error:
        lines += ["", f"Error: {_md_escape(result.error)}"]
    return "\n".join(lines) + "\n"
