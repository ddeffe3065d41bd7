"""Project defaults: ``[tool.model-audit]`` in ``./pyproject.toml``, or ``./model-audit.toml``.

The table gives defaults for command-line options (``probe``, ``arch``, ``normalize``, ``out``,
...); options given on the command line override it. Relative paths are relative to the file.

Example ``pyproject.toml``::

    [tool.model-audit]
    probe = "data/cifar10/test"
    arch = "resnet18-cifar"
    normalize = "cifar10"
    limit = 1000
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from .errors import ConfigError
from .io.files import read_toml

#: key -> (type, is a path)
KEYS: Dict[str, Tuple[type, bool]] = {
    "probe": (str, True), "out": (str, True), "arch": (str, False), "num_classes": (int, False),
    "normalize": (str, False), "resize": (str, False), "limit": (int, False),
    "seed": (int, False), "device": (str, False), "granularity": (str, False),
    "batch_size": (int, False), "bootstrap": (int, False), "replay_steps": (int, False),
    "replay_lr": (float, False), "replay_schedule": (str, False), "quiet": (bool, False),
    "baselines": (str, False), "baseline_steps": (int, False),
}


def find_config(cwd: Optional[Path] = None) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """The raw defaults table and its file, or None when there is none."""
    cwd = Path.cwd() if cwd is None else cwd
    own = cwd / "model-audit.toml"
    pyproject = cwd / "pyproject.toml"
    for path in (own, pyproject):
        if not path.is_file():
            continue
        data = read_toml(path)
        if path == own:
            return path, data.get("tool", {}).get("model-audit", data)
        table = data.get("tool", {}).get("model-audit")
        if table is not None:
            return path, table
    return None


def load_defaults(cwd: Optional[Path] = None) -> Dict[str, Any]:
    """Validated defaults (keys use underscores), with paths resolved against the file."""
    found = find_config(cwd)
    if found is None:
        return {}
    path, table = found
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [tool.model-audit] must be a table")
    out: Dict[str, Any] = {}
    for raw_key, value in table.items():
        key = raw_key.replace("-", "_")
        if key not in KEYS:
            raise ConfigError(f"{path}: unknown key {raw_key!r} in the model-audit table; valid: "
                              f"{', '.join(sorted(KEYS))}")
        typ, is_path = KEYS[key]
        ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise ConfigError(f"{path}: {raw_key} must be {typ.__name__}, got {value!r}")
        if is_path:
            value = str((path.parent / value)) if not Path(value).is_absolute() else value
        out[key] = value
    return out
