"""The gate's checks and verdict: what ``check_gate`` returns and ``gate.json`` holds."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from ..io.files import header
from ..io.records import AuditRecord
from ..policy import Policy
from .compare import CompareResult
from .display import Displayable

#: The gate's exit codes (``model-audit gate``) and what each means.
EXIT_PASS, EXIT_FAIL, EXIT_BAD_INPUT, EXIT_NOTHING = 0, 1, 2, 3
EXIT_CODES = {EXIT_PASS: "all checks passed", EXIT_FAIL: "a check failed",
              EXIT_BAD_INPUT: "bad input or internal error", EXIT_NOTHING: "nothing was audited"}


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


@dataclass(frozen=True, repr=False)
class GateResult(Displayable):
    """The verdict and every check; ``audit`` is the scan, when one ran."""

    checks: Tuple[Check, ...]
    exit_code: int
    policy: Policy
    checkpoint: str
    audit: Optional[AuditRecord] = None
    comparison: Optional[CompareResult] = None
    seconds: float = 0.0
    error: Optional[str] = None

    def rows(self) -> List[Dict[str, Any]]:
        """One row per check: name, passed (None: not run), value, limit, message."""
        return [c.to_dict() for c in self.checks]

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
                "comparison": self.comparison.to_dict() if self.comparison else None}
