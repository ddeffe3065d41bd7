"""The gate's policy file: its keys, an example, and reading it with every value checked.

The policy is TOML; every key is optional and an absent key means "no such check" (see
:data:`EXAMPLE_POLICY` and the module docstring of :mod:`model_audit.commands.gate`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

from .errors import ConfigError
from .io.files import read_toml

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
    data = read_toml(path)
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
