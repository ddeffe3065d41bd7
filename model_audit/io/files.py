"""Writing outputs: atomic writes (all files or none), the refusal to overwrite an input,
and result JSON with its one schema version."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import List, Sequence, Tuple


from ..errors import OutputError



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

