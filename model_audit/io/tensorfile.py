"""Tensor-file probes: ``.safetensors`` with ``images`` and ``labels`` (and optional
``classes`` metadata), read slice by slice so that only the asked images are loaded."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from safetensors import safe_open

from ..errors import CheckpointError, EmptyProbeError, ProbeError
from .probe_set import MAX_CLASSES, Normalization, ProbeSet, _convert_channels, _first_line
from .tensors import validate_safetensors_header


class TensorFileProbe(ProbeSet):
    """``.safetensors`` with ``images`` and ``labels``; images sliced per batch (memory-mapped)."""

    kind = "tensors"  # type: ignore[assignment]

    def __init__(self, path: Path, *, channels: int, normalization: Normalization,
                 resize: Optional[Tuple[int, int]], num_classes: Optional[int] = None) -> None:
        self.path = Path(path)
        try:
            header, metadata = validate_safetensors_header(self.path)
        except CheckpointError as exc:
            raise ProbeError(str(exc)) from exc
        for key in ("images", "labels"):
            if key not in header:
                raise ProbeError(
                    f"{path}: no {key!r} tensor (it has {', '.join(sorted(header))}); a tensor "
                    "probe needs images (N,C,H,W) and labels (N)")
        _check_entries(path, header)
        try:
            with safe_open(str(self.path), framework="pt") as fh:
                labels = fh.get_tensor("labels").long()
        except Exception as exc:  # the library's SafetensorError and others
            raise ProbeError(f"{path}: cannot read the labels: {_first_line(exc)}") from exc
        if labels.numel() == 0:
            raise EmptyProbeError(f"{path}: the probe holds no images")
        if int(labels.min()) < 0:
            raise ProbeError(f"{path}: labels must be >= 0, found {int(labels.min())}")
        n_classes = int(labels.max()) + 1
        if num_classes is not None and n_classes > num_classes:
            raise ProbeError(
                f"probe {path} has labels up to {n_classes - 1} but the model's head has "
                f"{num_classes} outputs; use a probe of the model's classes (or the right "
                "checkpoint)")
        if n_classes > MAX_CLASSES:
            raise ProbeError(f"{path}: labels go up to {n_classes - 1}, more than "
                             f"{MAX_CLASSES} classes; the labels are corrupt")
        classes = _class_names(path, metadata, n_classes)
        self.dtype = header["images"]["dtype"]
        super().__init__(str(path), classes, labels, channels=channels,
                         normalization=normalization, resize=resize)

    def _load_raw(self, source_indices: Sequence[int]) -> torch.Tensor:
        idx = list(source_indices)
        if not idx:
            return torch.empty(0, self.channels, 1, 1)
        # One slice per run of consecutive indices: scattered positions read only their own
        # images, not every image between the first and the last.
        runs: List[Tuple[int, int]] = []
        for i in idx:
            if runs and i == runs[-1][1]:
                runs[-1] = (runs[-1][0], i + 1)
            else:
                runs.append((i, i + 1))
        try:
            with safe_open(str(self.path), framework="pt") as fh:
                images = fh.get_slice("images")
                x = torch.cat([images[lo:hi] for lo, hi in runs])
        except Exception as exc:  # the library's SafetensorError and others
            raise ProbeError(f"{self.path}: cannot read the images: {_first_line(exc)}") from exc
        x = x.float().div_(255.0) if self.dtype == "U8" else x.float()
        if self.dtype != "U8":
            finite = torch.isfinite(x).flatten(1).all(1)
            if not bool(finite.all()):
                rows = [i for lo, hi in runs for i in range(lo, hi)]
                bad = [rows[j] for j in torch.nonzero(~finite).flatten().tolist()]
                raise ProbeError(f"{self.path}: images at index {', '.join(map(str, bad[:10]))} "
                                 "hold NaN or infinite pixel values")
        x = _convert_channels(x, self.channels, str(self.path))
        return self._resize(x)


# ------------------------------------------------------------------------------------------


def _check_entries(path: Path, header: Dict[str, Any]) -> None:
    """The images are (N, 1 or 3, H>0, W>0), uint8 or float; the labels (N,) integers."""
    shape = header["images"]["shape"]
    lshape = header["labels"]["shape"]
    if len(shape) != 4:
        raise ProbeError(f"{path}: images must be 4-D (N,C,H,W), got shape {shape}")
    if shape[1] not in (1, 3):
        raise ProbeError(f"{path}: images have {shape[1]} channels (shape {shape}); "
                         "give 1 (grayscale) or 3 (RGB)")
    if shape[0] and (shape[2] == 0 or shape[3] == 0):
        raise ProbeError(f"{path}: images have no pixels (shape {shape}); give images of "
                         "at least 1x1")
    if len(lshape) != 1 or lshape[0] != shape[0]:
        raise ProbeError(f"{path}: labels must have shape ({shape[0]},) to match the "
                         f"images, got {lshape}")
    if header["images"]["dtype"] not in ("U8", "F32", "F16", "BF16", "F64"):
        raise ProbeError(f"{path}: images must be uint8 or float, got {header['images']['dtype']}")
    if header["labels"]["dtype"] not in ("I64", "I32", "I16", "I8", "U8"):
        raise ProbeError(f"{path}: labels must be integers, got {header['labels']['dtype']}")


def _class_names(path: Path, metadata: Dict[str, str], n_classes: int) -> List[str]:
    """The metadata's ``classes`` (a JSON list naming at least every label), else the label
    numbers as names."""
    classes: List[str] = [str(i) for i in range(n_classes)]
    if "classes" in metadata:
        try:
            parsed = json.loads(metadata["classes"])
        except (ValueError, RecursionError) as exc:
            raise ProbeError(f"{path}: metadata 'classes' is not JSON ({exc})") from exc
        if not isinstance(parsed, list) or not all(isinstance(c, str) for c in parsed):
            raise ProbeError(f"{path}: metadata 'classes' must be a JSON list of strings")
        if len(parsed) < n_classes:
            raise ProbeError(f"{path}: labels go up to {n_classes - 1} but metadata names "
                             f"only {len(parsed)} classes")
        classes = parsed
    return classes
