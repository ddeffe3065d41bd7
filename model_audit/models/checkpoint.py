"""Read and write checkpoints; the architecture registry; key, prefix and dtype handling.

A checkpoint is a state dict in a ``.safetensors`` file or a ``.pt``/``.pth`` file. ``.pt``
files are only ever read with ``torch.load(path, map_location="cpu", weights_only=True)``: no
other unpickling happens anywhere in the tool.

The architecture comes from ``arch`` (``--arch``) or from the metadata the tool writes into
the safetensors files it produces (``model_audit.arch``, ``model_audit.num_classes``,
``model_audit.normalize``, ``model_audit.classes``). Metadata may only name registered
architectures: a ``package.module:factory`` spec imports code, so it is accepted from the
command line only, never from a file.

Examples:
    >>> from model_audit.models.checkpoint import load_checkpoint   # doctest: +SKIP
    >>> ckpt = load_checkpoint("model.safetensors", arch="resnet18-cifar")  # doctest: +SKIP
    >>> ckpt.num_classes, ckpt.arch  # doctest: +SKIP
    (10, 'resnet18-cifar')
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch

from ..errors import ArchitectureError, AuditError, CheckpointError
from ..io.files import atomic_write_bytes
from ..io.tensors import META_PREFIX, read_tensors, strip_wrapper_prefixes
from . import timm_models
from .loaded import LoadedCheckpoint, load_state
from .pretrained_dir import load_model_dir
from .registry import is_factory_spec, matching_architectures
from safetensors.torch import save


def _arch_from_metadata(path: Path, meta_arch: Optional[str],
                        shapes: Mapping[str, Sequence[int]]) -> Tuple[str, bool]:
    """The architecture the file's metadata names, else the one registered architecture whose
    keys and shapes the file matches exactly (and True: guessed); refused when it names a
    factory, or when none or several match."""
    if meta_arch is None:
        matches = matching_architectures(shapes)
        if len(matches) == 1:
            return matches[0], True
        if matches:
            raise ArchitectureError(
                f"{path} does not say which architecture it is, and its keys and shapes fit "
                f"several: {', '.join(matches)}; give --arch")
        compared = ("torchvision's and timm's" if timm_models.installed() else
                    "torchvision's (timm is not installed, so its architectures were not "
                    "compared: pip install 'model-audit[timm]')")
        raise ArchitectureError(
            f"{path} does not say which architecture it is, and its keys and shapes match none "
            f"of {compared}: give --arch (for example resnet18 or resnet18-cifar, timm:NAME, "
            "or package.module:factory for your own model; `model-audit archs` lists the names)")
    if is_factory_spec(meta_arch):
        raise ArchitectureError(
            f"{path} names the factory {meta_arch!r} in its metadata; factories import code, "
            "so they are only taken from --arch: pass --arch explicitly if you trust it")
    return meta_arch, False


def load_checkpoint(path: os.PathLike, *, arch: Optional[str] = None,
                    num_classes: Optional[int] = None) -> LoadedCheckpoint:
    """Load a checkpoint into a freshly built model, strictly.

    Args:
        path: ``.safetensors`` or ``.pt``/``.pth`` state dict, or a model directory
            (``save_pretrained``: :mod:`.pretrained_dir`).
        arch: architecture name or ``package.module:factory``; default: the file's metadata.
        num_classes: outputs of the head; default: the metadata, else the head's weight shape.

    Returns:
        A :class:`LoadedCheckpoint`; the model is in eval mode, float32, on the CPU.

    Raises:
        CheckpointError: unreadable file or keys/shapes that do not fit the architecture.
        ArchitectureError: no or unknown architecture.
    """
    path = Path(path)
    if path.is_dir():
        return load_model_dir(path, arch=arch, num_classes=num_classes)
    raw, metadata = read_tensors(path)
    state = strip_wrapper_prefixes(raw)
    meta_arch = metadata.get(META_PREFIX + "arch")
    guessed = False
    if arch is None:
        arch, guessed = _arch_from_metadata(path, meta_arch,
                                            {k: tuple(v.shape) for k, v in state.items()})
    try:
        return replace(load_state(path, state, metadata, arch, num_classes, meta_arch),
                       guessed=guessed)
    except AuditError:
        raise
    except Exception as exc:  # torchvision or a model's own loading code: never a traceback
        raise CheckpointError(
            f"{path} could not be loaded as {arch!r}: {type(exc).__name__}: {exc}; check --arch "
            "and --num-classes (`model-audit archs` lists the names)") from exc


def save_checkpoint(state: Mapping[str, torch.Tensor], path: os.PathLike, *,
                    metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write a state dict as safetensors, atomically, with string metadata."""
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
