"""Read and write checkpoints; the architecture registry; key, prefix and dtype handling.

A checkpoint is a state dict in a ``.safetensors`` file or a ``.pt``/``.pth`` file. ``.pt``
files are only ever read with ``torch.load(path, map_location="cpu", weights_only=True)``: no
other unpickling happens anywhere in the tool.

The architecture comes from ``arch`` (``--arch``) or from the metadata the tool writes into
the safetensors files it produces (``model_audit.arch``, ``model_audit.num_classes``,
``model_audit.normalize``, ``model_audit.classes``). Metadata may only name registered
architectures: a ``package.module:factory`` spec imports code, so it is accepted from the
command line only, never from a file.

Example:
    >>> from model_audit.checkpoint import load_checkpoint   # doctest: +SKIP
    >>> ckpt = load_checkpoint("model.safetensors", arch="resnet18-cifar")  # doctest: +SKIP
    >>> ckpt.num_classes, ckpt.arch  # doctest: +SKIP
    (10, 'resnet18-cifar')
"""
from __future__ import annotations

import difflib
import hashlib
import importlib
import json
import math
import os
import pickle
import struct
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .errors import ArchitectureError, CheckpointError, EmptyCheckpointError, OutputError

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


# ------------------------------------------------------------------------------------------
# Architectures


class TinyResNet(nn.Module):
    """A small ResNet-style CNN (conv1, bn1, layer1-3, fc) for tests, samples and quick runs.

    Same group structure as the torchvision ResNets, so every stage of the tool treats it as
    it treats a real ResNet; about 75k parameters at the default width.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        from torchvision.models.resnet import BasicBlock

        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)

        def stage(cin: int, cout: int, stride: int) -> nn.Sequential:
            down = None
            if stride != 1 or cin != cout:
                down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                     nn.BatchNorm2d(cout))
            return nn.Sequential(BasicBlock(cin, cout, stride, down), BasicBlock(cout, cout))

        self.layer1 = stage(width, width, 1)
        self.layer2 = stage(width, 2 * width, 2)
        self.layer3 = stage(2 * width, 4 * width, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _torchvision_classifiers() -> List[str]:
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


def _cifar_bases() -> List[str]:
    return [n for n in _torchvision_classifiers()
            if n.startswith(("resnet", "resnext", "wide_resnet"))]


def _build_torchvision(name: str, num_classes: int) -> nn.Module:
    import torchvision.models as tvm

    kwargs: Dict[str, Any] = {"weights": None, "num_classes": num_classes}
    if name in ("inception_v3", "googlenet"):
        kwargs.update(aux_logits=False, init_weights=False)
    return tvm.get_model(name, **kwargs)


def _build_cifar(base: str, num_classes: int) -> nn.Module:
    model = _build_torchvision(base, num_classes)
    # The CIFAR stem (He et al. 2016, sec. 4.2; the paper's ResNet-18): a 3x3 stride-1 first
    # convolution and no max-pool, so 32x32 inputs are not downsampled 4x before layer1.
    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def _build_tiny(num_classes: int, shapes: Mapping[str, Sequence[int]]) -> nn.Module:
    conv = shapes.get("conv1.weight")
    width, in_ch = (int(conv[0]), int(conv[1])) if conv is not None and len(conv) == 4 else (16, 3)
    return TinyResNet(num_classes, in_channels=in_ch, width=width)


#: Registered names besides the torchvision classifiers and their ``-cifar`` variants.
EXTRA_ARCHS: Dict[str, Callable[[int, Mapping[str, Sequence[int]]], nn.Module]] = {
    "tiny-resnet": _build_tiny,
}


def available_architectures() -> List[str]:
    """Every registered architecture name (torchvision, ``-cifar`` variants, tool models)."""
    return sorted(_torchvision_classifiers() + [f"{b}-cifar" for b in _cifar_bases()]
                  + list(EXTRA_ARCHS))


def _unknown_arch(name: str) -> ArchitectureError:
    names = available_architectures()
    close = difflib.get_close_matches(name, names, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return ArchitectureError(
        f"unknown architecture {name!r}.{hint} Valid names: {', '.join(names)}; or give "
        "'package.module:factory' for your own model (the factory gets num_classes).")


def is_factory_spec(arch: str) -> bool:
    return ":" in arch


def build_model(arch: str, num_classes: int,
                shapes: Optional[Mapping[str, Sequence[int]]] = None) -> nn.Module:
    """Build an untrained model of ``arch`` with ``num_classes`` outputs.

    Args:
        arch: a torchvision classifier name, ``<resnet>-cifar``, ``tiny-resnet`` or
            ``package.module:factory``.
        num_classes: outputs of the classifier head.
        shapes: tensor shapes of the checkpoint (used by ``tiny-resnet`` for its width).

    Raises:
        ArchitectureError: unknown name, or a factory that cannot be imported or fails.
    """
    shapes = shapes or {}
    if is_factory_spec(arch):
        module_name, _, attr = arch.partition(":")
        import sys

        added = os.getcwd() not in sys.path
        if added:  # `model-audit` is a console script: put the user's directory on the path
            sys.path.insert(0, os.getcwd())
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ArchitectureError(
                f"cannot import factory {arch!r}: {exc}. Give 'package.module:function' with the "
                "package importable (installed, or in the current directory).") from exc
        finally:
            if added:
                sys.path.remove(os.getcwd())
        try:
            model = factory(num_classes=num_classes)
        except Exception as exc:  # a user's factory may raise anything
            raise ArchitectureError(
                f"factory {arch!r} failed with num_classes={num_classes}: "
                f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(model, nn.Module):
            raise ArchitectureError(
                f"factory {arch!r} returned {type(model).__name__}, not a torch.nn.Module")
        return model
    if arch in EXTRA_ARCHS:
        return EXTRA_ARCHS[arch](num_classes, shapes)
    if arch.endswith("-cifar") and arch[: -len("-cifar")] in _cifar_bases():
        return _build_cifar(arch[: -len("-cifar")], num_classes)
    if arch in _torchvision_classifiers():
        return _build_torchvision(arch, num_classes)
    raise _unknown_arch(arch)


def head_name(model: nn.Module) -> str:
    """Name of the classifier head: the last ``Linear`` (else the last ``Conv2d``) module."""
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linear:
        return linear[-1]
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if convs:
        return convs[-1]
    raise ArchitectureError("the model has no Linear or Conv2d layer to use as classifier head")


def input_channels(model: nn.Module) -> int:
    """Channels of the model's input: ``in_channels`` of its first convolution."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return int(module.in_channels)
        if isinstance(module, nn.Linear):
            break
    return 3


# ------------------------------------------------------------------------------------------
# Reading files


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
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CheckpointError(f"{where}: __metadata__ must map strings to strings")
    if not header:
        raise EmptyCheckpointError(f"{path}: the file holds no tensors; nothing to audit")
    spans = []
    for name, entry in header.items():
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
        spans.append((offsets[0], offsets[1], shown))
    spans.sort()
    position = 0
    for start, end, shown in spans:
        if start != position:
            kind = "overlaps the previous tensor" if start < position else "leaves a gap"
            raise CheckpointError(f"{where}: tensor {shown} {kind} (offset {start}, expected {position})")
        position = end
    data_size = size - 8 - n
    if position != data_size:
        problem = "is cut short" if position > data_size else "has trailing bytes"
        raise CheckpointError(
            f"{where}: the file {problem} (tensors need {position} data bytes, the file has "
            f"{data_size})")
    return header, metadata


def _read_safetensors(path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    header, metadata = validate_safetensors_header(path)
    from safetensors.torch import load_file

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


# ------------------------------------------------------------------------------------------
# Loading into a model


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A checkpoint loaded into a model (eval mode, float32, on CPU)."""

    model: nn.Module
    arch: str
    num_classes: int
    in_channels: int
    path: str
    sha256: str
    parameters: int
    source_dtypes: Tuple[str, ...]
    metadata: Dict[str, str] = field(default_factory=dict)
    normalize: Optional[str] = None
    classes: Optional[Tuple[str, ...]] = None
    nonfinite: Tuple[str, ...] = ()

    def to_dict(self) -> Dict[str, Any]:
        return {"arch": self.arch, "num_classes": self.num_classes,
                "in_channels": self.in_channels, "path": self.path, "sha256": self.sha256,
                "parameters": self.parameters, "source_dtypes": list(self.source_dtypes),
                "nonfinite_tensors": list(self.nonfinite)}


def _fmt_shape(shape: Sequence[int]) -> str:
    return "x".join(str(int(d)) for d in shape) or "scalar"


def _matches(arch: str, num_classes: int, state: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``arch`` (built on the meta device, no memory) has exactly the state's keys/shapes."""
    try:
        with torch.device("meta"):
            expected = build_model(arch, num_classes, {k: tuple(v.shape) for k, v in state.items()}).state_dict()
    except Exception:  # a candidate that cannot be built is simply not suggested
        return False
    return (set(expected) == set(state) and
            all(tuple(expected[k].shape) == tuple(state[k].shape) for k in expected))


def _mismatch_hints(arch: str, num_classes: int, state: Mapping[str, torch.Tensor],
                    missing: List[str], unexpected: List[str],
                    candidates: Sequence[str]) -> List[str]:
    hints: List[str] = []
    tried = [c for c in dict.fromkeys(candidates) if c and c != arch and not is_factory_spec(c)]
    conv = state.get("conv1.weight")
    if conv is not None and conv.dim() == 4:
        if tuple(conv.shape[2:]) == (3, 3) and not arch.endswith("-cifar"):
            tried.insert(0, f"{arch}-cifar")
        elif tuple(conv.shape[2:]) == (7, 7) and arch.endswith("-cifar"):
            tried.insert(0, arch[: -len("-cifar")])
    for candidate in tried:
        if _matches(candidate, num_classes, state):
            kernel = "x".join(str(d) for d in conv.shape[2:]) if conv is not None and conv.dim() == 4 else ""
            lead = f"conv1.weight is {kernel}: " if kernel and candidate.split("-")[0] == arch.split("-")[0] else ""
            hints.append(f"{lead}did you mean {candidate}?")
            break
    if unexpected and missing:
        prefixes = {k.split(".", 1)[0] + "." for k in unexpected if "." in k}
        if len(prefixes) == 1:
            prefix = prefixes.pop()
            if all(k.startswith(prefix) and k[len(prefix):] in missing for k in unexpected[:20]):
                hints.append(f"every unexpected key starts with {prefix!r}: strip that prefix")
    return hints


def _strict_check(path: Path, arch: str, num_classes: int, model: nn.Module,
                  state: Mapping[str, torch.Tensor], candidates: Sequence[str] = ()) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = {k: (tuple(state[k].shape), tuple(expected[k].shape))
                  for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)}
    if not (missing or unexpected or mismatched):
        return
    parts = [f"{path} does not match architecture {arch!r}"
             f" (the checkpoint has {len(state)} tensors, the model expects {len(expected)}):"]

    def listed(label: str, keys: Sequence[str]) -> None:
        if keys:
            shown = ", ".join(keys[:10]) + (f", ... ({len(keys) - 10} more)" if len(keys) > 10 else "")
            parts.append(f"{label} ({len(keys)}): {shown}.")

    listed("missing keys", missing)
    listed("unexpected keys", unexpected)
    if mismatched:
        items = [f"{k} is {_fmt_shape(g)} but the model wants {_fmt_shape(w)}"
                 for k, (g, w) in list(mismatched.items())[:10]]
        parts.append(f"shape mismatches ({len(mismatched)}): " + "; ".join(items) + ".")
    hints = _mismatch_hints(arch, num_classes, state, missing, unexpected, candidates)
    parts.append("Hint: " + " ".join(hints) if hints else
                 "Check --arch (and --num-classes); list names with `model-audit archs`.")
    raise CheckpointError(" ".join(parts))


def _float32(state: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Tuple[str, ...]]:
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in state.values()
                     if v.is_floating_point()})
    out = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    return out, tuple(dtypes)


def load_checkpoint(path: os.PathLike, *, arch: Optional[str] = None,
                    num_classes: Optional[int] = None) -> LoadedCheckpoint:
    """Load a checkpoint into a freshly built model, strictly.

    Args:
        path: ``.safetensors`` or ``.pt``/``.pth`` state dict.
        arch: architecture name or ``package.module:factory``; default: the file's metadata.
        num_classes: outputs of the head; default: the metadata, else the head's weight shape.

    Returns:
        A :class:`LoadedCheckpoint`; the model is in eval mode, float32, on the CPU.

    Raises:
        CheckpointError: unreadable file or keys/shapes that do not fit the architecture.
        ArchitectureError: no or unknown architecture.
    """
    path = Path(path)
    raw, metadata = read_tensors(path)
    state = strip_wrapper_prefixes(raw)
    meta_arch = metadata.get(META_PREFIX + "arch")
    if arch is None:
        if meta_arch is None:
            raise ArchitectureError(
                f"{path} does not say which architecture it is: give --arch (for example "
                "resnet18 or resnet18-cifar, or package.module:factory for your own model; "
                "`model-audit archs` lists the names)")
        if is_factory_spec(meta_arch):
            raise ArchitectureError(
                f"{path} names the factory {meta_arch!r} in its metadata; factories import code, "
                "so they are only taken from --arch: pass --arch explicitly if you trust it")
        arch = meta_arch
    if num_classes is None and META_PREFIX + "num_classes" in metadata and arch == meta_arch:
        try:
            num_classes = int(metadata[META_PREFIX + "num_classes"])
        except ValueError as exc:
            raise CheckpointError(f"{path}: metadata model_audit.num_classes is not an integer") from exc
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    if num_classes is None:
        with torch.device("meta"):
            template = build_model(arch, 1000, shapes)
        head = head_name(template) + ".weight"
        if head not in state:
            raise CheckpointError(
                f"{path}: cannot find the classifier head {head!r} of {arch!r} in the "
                f"checkpoint to read the number of classes; give --num-classes (keys start: "
                f"{', '.join(list(state)[:5])})")
        num_classes = int(state[head].shape[0])
    if num_classes < 1:
        raise CheckpointError(f"number of classes must be >= 1, got {num_classes}")
    model = build_model(arch, num_classes, shapes)
    _strict_check(path, arch, num_classes, model, state, candidates=[meta_arch or ""])
    state32, dtypes = _float32(state)
    model.load_state_dict(state32, strict=True)
    model.float().eval()
    nonfinite = tuple(k for k, v in state32.items()
                      if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    classes = None
    if META_PREFIX + "classes" in metadata:
        try:
            parsed = json.loads(metadata[META_PREFIX + "classes"])
            if isinstance(parsed, list) and all(isinstance(c, str) for c in parsed):
                classes = tuple(parsed)
        except (ValueError, RecursionError):
            classes = None
    return LoadedCheckpoint(
        model=model, arch=arch, num_classes=num_classes, in_channels=input_channels(model),
        path=str(path), sha256=sha256_file(path),
        parameters=sum(p.numel() for p in model.parameters()), source_dtypes=dtypes,
        metadata=dict(metadata), normalize=metadata.get(META_PREFIX + "normalize"),
        classes=classes, nonfinite=nonfinite)


# ------------------------------------------------------------------------------------------
# Writing


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


def save_checkpoint(state: Mapping[str, torch.Tensor], path: os.PathLike, *,
                    metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write a state dict as safetensors, atomically, with string metadata."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write_bytes(path, save(tensors, metadata=dict(metadata or {})))


def audit_metadata(arch: str, num_classes: int, *, normalize: Optional[str] = None,
                   classes: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """The metadata keys the tool reads back in :func:`load_checkpoint`."""
    meta = {META_PREFIX + "arch": arch, META_PREFIX + "num_classes": str(int(num_classes))}
    if normalize:
        meta[META_PREFIX + "normalize"] = normalize
    if classes:
        meta[META_PREFIX + "classes"] = json.dumps(list(classes))
    return meta
