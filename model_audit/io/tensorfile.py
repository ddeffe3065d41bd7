"""Tensor-file probes: ``.safetensors`` with ``labels`` and either ``images`` (N,C,H,W) or
``inputs`` (N, any shape: tabular rows, token ids, audio features), and optional ``classes``
metadata; read slice by slice so that only the asked rows are loaded.

``inputs`` reach the model as stored: float ones as float32, integer ones (token ids) as int64;
no channel conversion, resizing or normalisation (those are for images)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from safetensors import safe_open

from ..errors import CheckpointError, EmptyProbeError, ProbeError
from .probe_set import (MAX_CLASSES, Normalization, ProbeSet, _convert_channels, _first_line,
                        parse_normalize)
from .tensors import validate_safetensors_header


#: safetensors dtypes of float data (images in 0..1, or inputs given as float32)
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
#: safetensors dtypes of integer data (labels; inputs such as token ids, given as int64)
INT_DTYPES = ("I64", "I32", "I16", "I8", "U8")


class TensorFileProbe(ProbeSet):
    """``.safetensors`` with ``labels`` and ``images`` or ``inputs``; rows sliced per batch
    (memory-mapped). ``kind`` is ``"tensors"`` for images and ``"inputs"`` for other data.

    Examples:
        >>> probe = TensorFileProbe(Path("rows.safetensors"), channels=3,  # doctest: +SKIP
        ...                         normalization=parse_normalize("none"), resize=None)
        >>> probe.is_image, probe.input_shape, probe.load([0]).dtype  # doctest: +SKIP
        (False, (64,), torch.float32)
    """

    kind = "tensors"  # type: ignore[assignment]

    def __init__(self, path: Path, *, channels: int, normalization: Normalization,
                 resize: Optional[Tuple[int, int]], num_classes: Optional[int] = None) -> None:
        self.path = Path(path)
        try:
            header, metadata = validate_safetensors_header(self.path)
        except CheckpointError as exc:
            raise ProbeError(str(exc)) from exc
        if "images" in header and "inputs" in header:
            raise ProbeError(
                f"{path}: it has both 'images' and 'inputs'; a tensor probe holds one of them "
                "(images (N,C,H,W) for an image model, inputs (N,...) for any other)")
        self.data_key = "inputs" if "inputs" in header else "images"
        self.is_image = self.data_key == "images"
        if not self.is_image:
            self.kind = "inputs"  # type: ignore[misc]
        for key in (self.data_key, "labels"):
            if key not in header:
                raise ProbeError(
                    f"{path}: no {key!r} tensor (it has {', '.join(sorted(header))}); a tensor "
                    "probe needs images (N,C,H,W) and labels (N), or inputs (N,...) and labels "
                    "(N) for a model that does not take images")
        if self.is_image:
            _check_entries(path, header)
        else:
            _check_inputs(path, header)
        self.input_shape = tuple(header[self.data_key]["shape"][1:])
        try:
            with safe_open(str(self.path), framework="pt") as fh:
                labels = fh.get_tensor("labels").long()
        except Exception as exc:  # the library's SafetensorError and others
            raise ProbeError(f"{path}: cannot read the labels: {_first_line(exc)}") from exc
        if labels.numel() == 0:
            raise EmptyProbeError(f"{path}: the probe holds no {self.data_key}")
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
        self.dtype = header[self.data_key]["dtype"]
        self.integer_inputs = not self.is_image and self.dtype not in FLOAT_DTYPES
        if not self.is_image:  # inputs are given to the model as stored
            normalization, resize = parse_normalize("none"), None
        super().__init__(str(path), classes, labels, channels=channels,
                         normalization=normalization, resize=resize)

    def describe(self) -> Dict[str, object]:
        """The base description; for ``inputs`` also their shape per row and stored dtype."""
        out = super().describe()
        if not self.is_image:
            out["input_shape"] = list(self.input_shape)
            out["input_dtype"] = self.dtype
        return out

    def _load_raw(self, source_indices: Sequence[int]) -> torch.Tensor:
        idx = list(source_indices)
        if not idx:
            if not self.is_image:
                return torch.empty(0, *self.input_shape, dtype=self.input_dtype)
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
                rows = fh.get_slice(self.data_key)
                x = torch.cat([rows[lo:hi] for lo, hi in runs])
        except Exception as exc:  # the library's SafetensorError and others
            raise ProbeError(f"{self.path}: cannot read the {self.data_key}: "
                             f"{_first_line(exc)}") from exc
        if not self.is_image:
            return self._inputs(x, runs)
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

    @property
    def input_dtype(self) -> torch.dtype:
        """What the model gets: float32 for float data, int64 for integer data (token ids,
        never scaled: an embedding looks them up)."""
        return torch.long if self.integer_inputs else torch.float32

    def _inputs(self, x: torch.Tensor, runs: List[Tuple[int, int]]) -> torch.Tensor:
        """``inputs`` rows as the model takes them: float32, or int64 for integer data."""
        if self.integer_inputs:
            return x.long()
        x = x.float()
        finite = torch.isfinite(x.reshape(len(x), -1)).all(1)
        if not bool(finite.all()):
            rows = [i for lo, hi in runs for i in range(lo, hi)]
            bad = [rows[j] for j in torch.nonzero(~finite).flatten().tolist()]
            raise ProbeError(f"{self.path}: inputs at index {', '.join(map(str, bad[:10]))} "
                             "hold NaN or infinite values")
        return x


# ------------------------------------------------------------------------------------------


def _check_inputs(path: Path, header: Dict[str, Any]) -> None:
    """The inputs are (N, ...) numbers, the labels (N,) integers."""
    shape = header["inputs"]["shape"]
    lshape = header["labels"]["shape"]
    if len(shape) < 1:
        raise ProbeError(f"{path}: inputs must have a first dimension of rows (N, ...), got a "
                         "scalar")
    if len(lshape) != 1 or lshape[0] != shape[0]:
        raise ProbeError(f"{path}: labels must have shape ({shape[0]},) to match the "
                         f"{shape[0]} rows of inputs, got {lshape}")
    if header["inputs"]["dtype"] not in FLOAT_DTYPES + INT_DTYPES:
        raise ProbeError(f"{path}: inputs must be float ({', '.join(FLOAT_DTYPES)}) or "
                         f"integer ({', '.join(INT_DTYPES)}), got {header['inputs']['dtype']}")
    if header["labels"]["dtype"] not in INT_DTYPES:
        raise ProbeError(f"{path}: labels must be integers, got {header['labels']['dtype']}")


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
    if header["images"]["dtype"] not in ("U8",) + FLOAT_DTYPES:
        raise ProbeError(f"{path}: images must be uint8 or float, got {header['images']['dtype']}")
    if header["labels"]["dtype"] not in INT_DTYPES:
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
