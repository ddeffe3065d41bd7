"""Writing outputs: atomic writes (all files or none), the refusal to overwrite an input,
and result JSON with its one schema version."""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .._version import __version__
from ..environment import describe as describe_environment
from ..errors import ConfigError, OutputError



def same_file(a: os.PathLike, b: os.PathLike) -> bool:
    """True when ``a`` and ``b`` are the same file (also through links)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


#: Every file written by :func:`atomic_write_bytes`/:func:`atomic_write_files` in this
#: process, in order (the CLI tells what was written when it is interrupted).
WRITTEN: List[str] = []


def _write_temp(path: Path, data: bytes) -> str:
    """Write ``data`` to a hidden temp file (``.<name>.XXXX.tmp``) beside ``path``; fsync."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            # mkstemp creates 0600; give the file the mode a plain open() would have.
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fh.fileno(), 0o666 & ~umask)
            os.fsync(fh.fileno())
    except BaseException as exc:
        _unlink_quietly(tmp)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
        raise
    return tmp


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def atomic_write_files(files: Sequence[Tuple[os.PathLike, bytes]]) -> None:
    """Write several files so that a failure leaves every old file as it was.

    Every file is first written in full to a temp file beside it; only then are they renamed
    into place. A full disk or an unwritable directory therefore changes nothing, and no temp
    file is left behind.

    Raises:
        OutputError: naming the file that cannot be written and why.
    """
    staged: List[Tuple[str, Path]] = []
    try:
        for target, data in files:
            staged.append((_write_temp(Path(target), data), Path(target)))
        while staged:
            tmp, target = staged[0]
            try:
                os.replace(tmp, target)
            except OSError as exc:
                raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from exc
            staged.pop(0)
            WRITTEN.append(str(target))
    finally:
        for tmp, _ in staged:
            _unlink_quietly(tmp)


def atomic_write_bytes(path: os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory, fsync and rename."""
    atomic_write_files([(path, data)])



def overwritten_input(targets: Iterable[os.PathLike], inputs: Iterable[os.PathLike]
                      ) -> Optional[Tuple[Path, Path]]:
    """The first (target, input) pair where writing the target would replace the input (the
    same file, also through a symlink or a hard link), or None."""
    inputs = [Path(src) for src in inputs]
    for target in map(Path, targets):
        for src in inputs:
            if target.exists() and same_file(target, src):
                return target, src
    return None


def refuse_inputs(targets: Iterable[os.PathLike], inputs: Iterable[os.PathLike],
                  hint: str = "; choose another output path") -> None:
    """OutputError when a target is (also through a symlink or hard link) one of ``inputs``.

    Every command calls this before its first write, so that no output ever replaces an input.
    """
    clash = overwritten_input(targets, inputs)
    if clash is not None:
        raise OutputError(f"refusing to write {clash[0]}: it is an input ({clash[1]}){hint}")


# ------------------------------------------------------------------------------------------
# Result files (audit.json, compare.json, fix.json, gate.json, sanity.json)

#: The version of every JSON file the tool writes; readers refuse other versions.
SCHEMA_VERSION = 1


def header() -> Dict[str, Any]:
    """The first fields of every result file: schema version, the tool that wrote it, and the
    machine and libraries it ran on (:func:`model_audit.environment.describe`)."""
    return {"schema_version": SCHEMA_VERSION,
            "tool": {"name": "model-audit", "version": __version__},
            "environment": describe_environment()}


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def json_bytes(data: Mapping[str, Any]) -> bytes:
    """``data`` as the tool writes JSON: indented, strict (no NaN), numpy values as lists."""
    text = json.dumps(data, indent=2, sort_keys=False, allow_nan=False, default=_json_default)
    return (text + "\n").encode("utf-8")


def read_result(path: os.PathLike, what: str, required: Sequence[str] = ()) -> Dict[str, Any]:
    """Read a result file the tool wrote, checking its header and the keys a reader needs.

    Args:
        path: the file.
        what: how the file is named in messages, e.g. ``"an audit.json written by model-audit
            scan"``.
        required: top-level keys that must be present.

    Raises:
        ConfigError: missing, unreadable, not JSON, another schema version, or a key missing.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; give {what}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); give {what}") from exc
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
        raise ConfigError(f"{path} is not {what} (schema_version {SCHEMA_VERSION})")
    for key in required:
        if key not in data:
            raise ConfigError(f"{path} is not {what}: it lacks {key!r}")
    return data


def read_toml(path: os.PathLike) -> Dict[str, Any]:
    """A TOML file's content (policy files, project defaults).

    Raises:
        ConfigError: ``path: invalid TOML: ...`` when it cannot be parsed.
    """
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
