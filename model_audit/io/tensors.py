"""Reading tensor files: safetensors (header validated before any byte is trusted) and
weights-only ``.pt`` pickles; wrapper prefixes and unsupported dtypes."""
from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import torch

from ..errors import CheckpointError, EmptyCheckpointError
from safetensors.torch import load_file

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

#: A safetensors header larger than this is refused before it is read (the format's own
#: reference implementation uses the same 100 MB bound).
MAX_HEADER_BYTES = 100_000_000

_ST_DTYPES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}

#: Prefixes that wrappers add to every key: DataParallel/DDP and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

META_PREFIX = "model_audit."




def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _reject_duplicates(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    seen: Dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {_show(key)}")
        seen[key] = value
    return seen


#: Most elements a tensor may have (torch sizes are int64), and most dimensions.
_MAX_ELEMENTS = 2 ** 63 - 1
MAX_DIMS = 64


def _exceeds(shape: Sequence[int], limit: int) -> bool:
    """Whether the product of the non-zero dimensions exceeds ``limit`` (stops early)."""
    total = 1
    for d in shape:
        if d:
            total *= d
            if total > limit:
                return True
    return False


def _first_line(exc: BaseException) -> str:
    """The first line of a library's message (torch appends C++ stack frames to some)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _show(value: Any, limit: int = 80) -> str:
    """``repr`` of a value from a file, cut short: messages stay one readable paragraph."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _safe_name(name: str) -> str:
    shown = name if name.isprintable() else repr(name)
    return shown if len(shown) <= 200 else f"{shown[:200]}... ({len(shown)} characters)"


def validate_safetensors_header(path: Path) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """Check a safetensors header before any tensor is allocated.

    Returns the tensor entries and the metadata. The checks go beyond the safetensors
    library, which accepts duplicate names (the last wins).

    Raises:
        CheckpointError: naming the file and what is wrong with it.
    """
    size = path.stat().st_size
    where = f"{path}: not a valid safetensors file"
    header, n = _read_header(path, size, where)
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CheckpointError(f"{where}: __metadata__ must map strings to strings")
    if not header:
        raise EmptyCheckpointError(f"{path}: the file holds no tensors; nothing to audit")
    spans = sorted(_check_entry(name, entry, size, where) for name, entry in header.items())
    _check_spans(spans, size - 8 - n, where)
    return header, metadata


def _read_header(path: Path, size: int, where: str) -> Tuple[Dict[str, Any], int]:
    """The header's JSON object (duplicate names refused) and its length in bytes."""
    if size < 8:
        raise CheckpointError(f"{where}: it has {size} bytes, fewer than the 8-byte header length")
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise CheckpointError(
                f"{where}: header length {n} exceeds the file ({size} bytes) or the "
                f"{MAX_HEADER_BYTES}-byte limit; the file is truncated or corrupt")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{where}: the header is not UTF-8 ({exc})") from exc
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise CheckpointError(f"{where}: the header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: the header is a JSON {type(header).__name__}, not an object")
    return header, n


def _check_entry(name: str, entry: Any, size: int, where: str) -> Tuple[int, int, str]:
    """One tensor's entry: name, dtype, shape and offsets consistent; its (start, end, name)."""
    shown = _safe_name(name)
    if not name or not name.isprintable() or "/" in name or "\\" in name:
        raise CheckpointError(f"{where}: invalid tensor name {shown}")
    if not isinstance(entry, dict) or set(entry) - {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(f"{where}: tensor {shown} has a malformed entry")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _ST_DTYPES:  # a list is unhashable
        raise CheckpointError(f"{where}: tensor {shown} has unknown dtype {_show(dtype)}")
    if (not isinstance(shape, list) or
            not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise CheckpointError(f"{where}: tensor {shown} has an invalid shape {_show(shape)}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or
            not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]):
        raise CheckpointError(f"{where}: tensor {shown} has invalid data_offsets {_show(offsets)}")
    # (no big-number product of a hostile shape: a non-empty tensor larger than the
    # file is wrong whatever its exact size)
    elements = 0 if 0 in shape else None if _exceeds(shape, size) else math.prod(shape)
    nbytes = None if elements is None else elements * _ST_DTYPES[dtype]
    if offsets[1] - offsets[0] != nbytes:
        need = f"more than the file's {size}" if nbytes is None else str(nbytes)
        raise CheckpointError(
            f"{where}: tensor {shown} spans {offsets[1] - offsets[0]} bytes but its shape "
            f"{_show(shape)} and dtype {dtype} need {need}")
    return offsets[0], offsets[1], shown


def _check_spans(spans: List[Tuple[int, int, str]], data_size: int, where: str) -> None:
    """The tensors' byte spans (sorted) tile the data section exactly: no gap, no overlap."""
    position = 0
    for start, end, shown in spans:
        if start != position:
            kind = "overlaps the previous tensor" if start < position else "leaves a gap"
            raise CheckpointError(f"{where}: tensor {shown} {kind} (offset {start}, expected {position})")
        position = end
    if position != data_size:
        problem = "is cut short" if position > data_size else "has trailing bytes"
        raise CheckpointError(
            f"{where}: the file {problem} (tensors need {position} data bytes, the file has "
            f"{data_size})")


def _read_safetensors(path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    header, metadata = validate_safetensors_header(path)
    for name, entry in header.items():
        # Valid for the format (u64 sizes), but torch sizes are int64: the library accepts
        # larger dimensions, then torch fails (a C++ stack trace in its message) or the byte
        # count overflows.
        if len(entry["shape"]) > MAX_DIMS or _exceeds(entry["shape"], _MAX_ELEMENTS):
            raise CheckpointError(
                f"{path}: cannot read safetensors file: tensor {_safe_name(name)} has shape "
                f"{_show(entry['shape'])}; torch tensors have at most {MAX_DIMS} dimensions "
                "and 2**63 - 1 elements")

    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as exc:  # the library raises its own SafetensorError and others
        raise CheckpointError(f"{path}: cannot read safetensors file: {_first_line(exc)}") from exc
    return dict(tensors), metadata


def _read_pickle(path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path}: not a torch zip checkpoint (legacy tar/pickle formats are not read "
            "because they cannot be loaded safely); re-save it with torch.save(state_dict) "
            "or convert it to .safetensors")
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            total = sum(info.file_size for info in zf.infolist())
    except (zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"{path}: corrupt zip archive: {exc}") from exc
    if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
        raise CheckpointError(
            f"{path}: this is a TorchScript archive, not a state dict; save "
            "model.state_dict() instead")
    if total > 64 * path.stat().st_size + (1 << 30):
        raise CheckpointError(
            f"{path}: the archive declares {total} bytes of content, far more than the file "
            "holds; refusing to unpack it")
    try:
        # weights_only=True is passed explicitly: torch then refuses any pickle that would
        # construct objects other than tensors and plain containers, and the
        # TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD environment variable cannot override it.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(
            f"{path}: refused: the file holds objects that a weights-only load does not allow "
            f"({first}). Only plain state dicts of tensors are read; re-save with "
            "torch.save(model.state_dict(), path) or convert to .safetensors") from exc
    except Exception as exc:
        raise CheckpointError(
            f"{path}: cannot read torch checkpoint: {type(exc).__name__}: {_first_line(exc)}") from exc
    return _unwrap_state_dict(obj, path), {}


def _unwrap_state_dict(obj: Any, path: Path) -> Dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path}: the file holds a {type(obj).__name__}, not a state dict (a dict of "
            "tensors); save model.state_dict()")
    bad = [f"{k!s} ({type(v).__name__})" for k, v in obj.items()
           if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"{path}: the state dict holds entries that are not tensors: {', '.join(bad[:8])}")
    # torch.load(weights_only=True) accepts these, but they cannot be loaded into a model's
    # dense float parameters (quantized, meta) or would be silently truncated (complex).
    odd = [f"{k} ({why})" for k, why in ((k, _unsupported_tensor(v)) for k, v in obj.items()) if why]
    if odd:
        raise CheckpointError(
            f"{path}: sparse, non-strided, quantized, complex or data-less tensors are not "
            f"supported: {', '.join(odd[:8])}; save a state dict of dense real-valued tensors")
    if not obj:
        raise EmptyCheckpointError(f"{path}: the state dict is empty; nothing to audit")
    return dict(obj)


def _unsupported_tensor(v: torch.Tensor) -> str:
    """Why a tensor from a ``.pt`` file cannot be audited ('' when it can)."""
    if v.layout != torch.strided or v.is_sparse:
        return f"layout {str(v.layout).replace('torch.', '')}"
    if v.is_quantized:
        return f"quantized {str(v.dtype).replace('torch.', '')}"
    if v.is_complex():
        return f"complex {str(v.dtype).replace('torch.', '')}"
    if v.is_meta or v.device.type != "cpu":
        return f"no data on the CPU (device {v.device.type})"
    return ""


def read_tensors(path: os.PathLike) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Read the tensors and metadata of a checkpoint file (no model involved).

    Raises:
        CheckpointError: missing, unreadable, unsafe or malformed file.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return _read_safetensors(path)
    if suffix in PICKLE_SUFFIXES:
        return _read_pickle(path)
    raise CheckpointError(
        f"{path}: unknown checkpoint type {suffix!r}; use .safetensors (preferred) or .pt/.pth")


def strip_wrapper_prefixes(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Remove ``module.`` (DataParallel/DDP) and ``_orig_mod.`` (torch.compile) prefixes."""
    out: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = key
        while new.startswith(WRAPPER_PREFIXES):
            new = new.split(".", 1)[1]
        if new in out:
            raise CheckpointError(f"keys {key!r} and another key both map to {new!r} after "
                                  "removing wrapper prefixes")
        out[new] = value
    return out


