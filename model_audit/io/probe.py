"""Probe sets: labelled images the audit runs on, read in batches.

Two formats:

* an ImageFolder directory, ``<root>/<class>/<image>`` (JPEG or PNG); classes are the sorted
  sub-directory names. Images are converted explicitly to the model's channels: grayscale
  (``L``) for one channel, ``RGB`` for three; an alpha channel is dropped (PIL's
  ``RGBA -> RGB``) and palette images are expanded to RGBA first.
* a tensor file, ``.safetensors`` with ``images`` (N,C,H,W; uint8 in 0..255 or float in 0..1)
  and ``labels`` (N; integer), and optional metadata ``classes`` (a JSON list of names).

Pixel values are scaled to [0, 1], then normalised with ``(x - mean) / std``
(:func:`parse_normalize`). Images are resized only when ``resize`` is given. Nothing is held
in memory beyond one batch: images are decoded when a batch is asked for.

Example:
    >>> probe = open_probe("cifar10/test", channels=3, normalize="cifar10", limit=1000)  # doctest: +SKIP
    >>> for positions, x, y in probe.batches(256): ...  # doctest: +SKIP
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..errors import EmptyProbeError, ProbeError
from PIL import Image
from safetensors import safe_open
from .tensors import validate_safetensors_header
from ..errors import CheckpointError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

#: Largest image accepted (pixels). Larger files are refused as possible decompression bombs.
MAX_IMAGE_PIXELS = 50_000_000

#: Most classes a tensor probe's labels may imply when the model's head size is not known
#: (a label of 2**40 must not make the tool build 2**40 class names).
MAX_CLASSES = 1_000_000

NORMALIZATIONS: Dict[str, Tuple[Tuple[float, ...], Tuple[float, ...]]] = {
    # CIFAR-10 training-set channel statistics.
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    # The ImageNet statistics torchvision's pretrained models use.
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "none": ((0.0,), (1.0,)),
}


@dataclass(frozen=True)
class Normalization:
    """Per-channel ``(x - mean) / std`` applied to images scaled to [0, 1]."""

    spec: str
    mean: Tuple[float, ...]
    std: Tuple[float, ...]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        mean, std = self.mean, self.std
        if len(mean) == 1:
            mean, std = mean * channels, std * channels
        if len(mean) != channels:
            raise ProbeError(
                f"normalisation {self.spec!r} has {len(mean)} channel values but the images "
                f"have {channels} channels; give one value or one per channel")
        m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - m) / s


def parse_normalize(spec: Optional[str]) -> Normalization:
    """Parse ``cifar10``, ``imagenet``, ``none`` or ``MEAN,STD``.

    ``MEAN,STD`` is a comma-separated list of numbers: two (one mean, one std for every
    channel) or ``2*C`` (``C`` means, then ``C`` stds), e.g. ``0.5,0.25`` or
    ``0.49,0.48,0.45,0.25,0.24,0.26``.

    Raises:
        ProbeError: anything else, naming the valid forms.
    """
    spec = (spec or "none").strip()
    if spec.lower() in NORMALIZATIONS:
        mean, std = NORMALIZATIONS[spec.lower()]
        return Normalization(spec.lower(), mean, std)
    try:
        values = [float(v) for v in spec.split(",")]
    except ValueError:
        values = []
    forms = ("use cifar10, imagenet, none, or MEAN,STD as numbers (2 values, or C means "
             "followed by C stds)")
    if len(values) < 2 or len(values) % 2 or not all(math.isfinite(v) for v in values):
        raise ProbeError(f"invalid normalisation {spec!r}: {forms}")
    half = len(values) // 2
    mean, std = tuple(values[:half]), tuple(values[half:])
    if any(s <= 0 for s in std):
        raise ProbeError(f"invalid normalisation {spec!r}: every std must be > 0; {forms}")
    return Normalization(spec, mean, std)


def parse_resize(value: Optional[str]) -> Optional[Tuple[int, int]]:
    """``None``, ``"N"`` (NxN) or ``"HxW"`` -> (H, W)."""
    if value is None or str(value).strip() == "":
        return None
    text = str(value).lower().strip()
    try:
        parts = [int(p) for p in text.split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
        raise ProbeError(f"invalid resize {value!r}: give N or HxW with positive integers")
    return parts[0], parts[1]


def _first_line(exc: BaseException) -> str:
    """The first line of a library's message (torch appends C++ stack frames to some)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _convert_channels(x: torch.Tensor, channels: int, where: str) -> torch.Tensor:
    """(N,C,H,W) float -> (N,channels,H,W): gray to RGB by repetition, RGB to gray by luma."""
    c = x.shape[1]
    if c == channels:
        return x
    if c == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1).contiguous()
    if c == 3 and channels == 1:
        # ITU-R 601 luma, the weights PIL uses for RGB -> L.
        w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(1, 3, 1, 1)
        return (x * w).sum(1, keepdim=True)
    raise ProbeError(f"{where}: images have {c} channels but the model takes {channels}; "
                     "give 1 (grayscale) or 3 (RGB) channel images")


class ProbeSet:
    """A labelled image set read in batches. Subclasses implement :meth:`_load_raw`."""

    def __init__(self, source: str, classes: Sequence[str], labels: torch.Tensor,
                 *, channels: int, normalization: Normalization,
                 resize: Optional[Tuple[int, int]], indices: Optional[torch.Tensor] = None) -> None:
        self.source = source
        self.classes: Tuple[str, ...] = tuple(classes)
        self.channels = channels
        self.normalization = normalization
        self.resize = resize
        n = len(labels)
        self.indices = torch.arange(n) if indices is None else indices
        self.labels = labels[self.indices].long()

    def __len__(self) -> int:
        return int(self.labels.numel())

    @property
    def kind(self) -> str:
        raise NotImplementedError

    def _load_raw(self, source_indices: Sequence[int]) -> torch.Tensor:
        """Images at source indices as float (B,C,H,W) in [0, 1] with the model's channels."""
        raise NotImplementedError

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        if self.resize is None or tuple(x.shape[-2:]) == self.resize:
            return x
        return F.interpolate(x, size=self.resize, mode="bilinear", align_corners=False,
                             antialias=True).clamp_(0.0, 1.0)

    def load(self, positions: Sequence[int], *, normalized: bool = True) -> torch.Tensor:
        """Images at ``positions`` (0..len-1) as a float batch; normalised unless asked not."""
        src = [int(self.indices[p]) for p in positions]
        x = self._load_raw(src)
        if normalized:
            x = self.normalization.apply(x)
        return x

    def batches(self, batch_size: int, positions: Optional[Sequence[int]] = None
                ) -> Iterator[Tuple[List[int], torch.Tensor, torch.Tensor]]:
        """Yield ``(positions, images, labels)`` batches, one decoded at a time."""
        if batch_size < 1:
            raise ProbeError(f"batch size must be >= 1, got {batch_size}")
        order = list(range(len(self))) if positions is None else [int(p) for p in positions]
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            yield chunk, self.load(chunk), self.labels[chunk]

    def subset(self, positions: Sequence[int]) -> "ProbeSet":
        """A probe set of the given positions (same source, no copying of images)."""
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.indices = self.indices[torch.as_tensor(list(positions), dtype=torch.long)]
        clone.labels = self.labels[torch.as_tensor(list(positions), dtype=torch.long)]
        return clone

    def class_counts(self) -> List[int]:
        return torch.bincount(self.labels, minlength=len(self.classes)).tolist()

    def describe(self) -> Dict[str, object]:
        return {"source": self.source, "kind": self.kind, "n": len(self),
                "classes": list(self.classes), "normalize": self.normalization.spec,
                "resize": list(self.resize) if self.resize else None}


# ------------------------------------------------------------------------------------------
# ImageFolder


class ImageFolderProbe(ProbeSet):
    """``<root>/<class>/<image>`` directory; images decoded per batch with Pillow."""

    kind = "imagefolder"  # type: ignore[assignment]

    def __init__(self, root: Path, *, channels: int, normalization: Normalization,
                 resize: Optional[Tuple[int, int]]) -> None:
        root = Path(root)
        real_root = root.resolve()
        class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not class_dirs:
            raise EmptyProbeError(
                f"probe directory {root} has no class sub-directories; expected "
                "<root>/<class>/<image>.jpg (an ImageFolder layout)")
        files: List[Path] = []
        labels: List[int] = []
        self.ignored: List[str] = []
        for label, cdir in enumerate(class_dirs):
            found = 0
            for path in sorted(cdir.rglob("*")):
                if path.name.startswith(".") or path.is_dir():
                    continue
                if path.suffix.lower() not in IMAGE_SUFFIXES:
                    self.ignored.append(str(path))
                    continue
                real = path.resolve()
                if real_root not in real.parents:
                    raise ProbeError(
                        f"{path} points outside the probe directory ({real}); links that leave "
                        f"{root} are not followed")
                files.append(path)
                labels.append(label)
                found += 1
            if found == 0:
                raise ProbeError(
                    f"class folder {cdir} has no images (.jpg, .jpeg, .png); remove it or add "
                    "images, since an empty class would shift every label after it")
        self.files = files
        self._size: Optional[Tuple[int, int]] = None
        super().__init__(str(root), [d.name for d in class_dirs], torch.tensor(labels),
                         channels=channels, normalization=normalization, resize=resize)

    def _decode(self, path: Path) -> torch.Tensor:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as img:
                    w, h = img.size
                    if w * h > MAX_IMAGE_PIXELS:
                        raise ProbeError(
                            f"{path}: {w}x{h} pixels exceeds the {MAX_IMAGE_PIXELS}-pixel limit "
                            "(possible decompression bomb)")
                    img.load()
                    if img.mode == "P":
                        img = img.convert("RGBA")
                    if img.mode in ("I;16", "I", "F"):
                        raise ProbeError(f"{path}: {img.mode}-mode images (16/32-bit) are not supported")
                    img = img.convert("L" if self.channels == 1 else "RGB")
                    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
                    x = data.view(h, w, -1).permute(2, 0, 1).float().div_(255.0)
        except ProbeError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ProbeError(f"{path}: refused as a possible decompression bomb ({exc})") from exc
        except (OSError, SyntaxError, ValueError) as exc:
            raise ProbeError(f"{path}: cannot decode image ({exc}); remove or replace the file") from exc
        if self.channels not in (1, 3):
            raise ProbeError(f"the model takes {self.channels}-channel input; image folders give 1 or 3")
        return x

    def _load_raw(self, source_indices: Sequence[int]) -> torch.Tensor:
        images = []
        for i in source_indices:
            x = self._decode(self.files[i]).unsqueeze(0)
            if self.resize is not None:
                x = self._resize(x)
            elif self._size is None:
                self._size = tuple(x.shape[-2:])  # type: ignore[assignment]
            elif tuple(x.shape[-2:]) != self._size:
                raise ProbeError(
                    f"{self.files[i]} is {x.shape[-1]}x{x.shape[-2]} but earlier images are "
                    f"{self._size[1]}x{self._size[0]}; give --resize to bring them to one size")
            images.append(x)
        return torch.cat(images) if images else torch.empty(0, self.channels, 1, 1)

    def describe(self) -> Dict[str, object]:
        info = super().describe()
        info["ignored_files"] = len(self.ignored)
        return info


# ------------------------------------------------------------------------------------------
# Tensor file


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


def stratified_positions(labels: torch.Tensor, limit: int, seed: int) -> List[int]:
    """A class-stratified random subset of ``limit`` positions (largest-remainder shares)."""
    n = int(labels.numel())
    if limit >= n:
        return list(range(n))
    gen = torch.Generator().manual_seed(int(seed))
    classes = torch.unique(labels).tolist()
    members = {c: torch.nonzero(labels == c).flatten() for c in classes}
    exact = {c: limit * len(members[c]) / n for c in classes}
    take = {c: int(math.floor(v)) for c, v in exact.items()}
    for c in sorted(classes, key=lambda c: (-(exact[c] - take[c]), c))[: limit - sum(take.values())]:
        take[c] += 1
    chosen: List[int] = []
    for c in classes:
        perm = members[c][torch.randperm(len(members[c]), generator=gen)]
        chosen.extend(perm[: take[c]].tolist())
    return sorted(chosen)


def open_probe(path: os.PathLike, *, channels: int = 3, normalize: Optional[str] = None,
               resize: Optional[str] = None, limit: Optional[int] = None, seed: int = 0,
               model_classes: Optional[Sequence[str]] = None,
               num_classes: Optional[int] = None) -> ProbeSet:
    """Open a probe set (directory or ``.safetensors``), optionally a stratified subset.

    Args:
        path: ImageFolder directory or tensor file.
        channels: the model's input channels (images are converted to it).
        normalize: see :func:`parse_normalize`.
        resize: ``None`` (keep sizes) or ``N``/``HxW``.
        limit: keep a class-stratified random subset of this many images (seeded).
        seed: seed of the subset.
        model_classes: the checkpoint's class names, when it has them: an ImageFolder's
            classes are then mapped onto the model's indices by name.
        num_classes: outputs of the model's head: labels must fit.

    Raises:
        ProbeError: missing or unreadable probe, or one that does not fit the model.
    """
    path = Path(path)
    normalization = parse_normalize(normalize)
    size = parse_resize(resize)
    if not path.exists():
        raise ProbeError(f"probe {path} does not exist; give an ImageFolder directory or a "
                         ".safetensors file with images and labels")
    if path.is_dir():
        probe: ProbeSet = ImageFolderProbe(path, channels=channels, normalization=normalization,
                                           resize=size)
        if model_classes:
            unknown = [c for c in probe.classes if c not in model_classes]
            if unknown:
                raise ProbeError(
                    f"probe {path}: classes {', '.join(unknown[:10])} are not among the model's "
                    f"classes ({', '.join(list(model_classes)[:20])})")
            remap = torch.tensor([list(model_classes).index(c) for c in probe.classes])
            probe.labels = remap[probe.labels]
            probe.classes = tuple(model_classes)
    elif path.suffix.lower() == ".safetensors":
        probe = TensorFileProbe(path, channels=channels, normalization=normalization, resize=size,
                                num_classes=num_classes)
    else:
        raise ProbeError(f"probe {path} is neither a directory nor a .safetensors tensor file")
    if len(probe) == 0:
        raise EmptyProbeError(f"probe {path} holds no images")
    if num_classes is not None:
        top = int(probe.labels.max())
        if top >= num_classes:
            raise ProbeError(
                f"probe {path} has labels up to {top} ({len(probe.classes)} classes) but the "
                f"model's head has {num_classes} outputs; use a probe of the model's classes "
                "(or the right checkpoint)")
    if limit is not None:
        if limit < 1:
            raise ProbeError(f"--limit must be >= 1, got {limit}")
        probe = probe.subset(stratified_positions(probe.labels, limit, seed))
    return probe


class BatchCache:
    """Re-iterable batches of fixed probe positions, kept in memory up to a byte budget.

    The replay and the attribution pass over the same misclassified images many times;
    decoding them once is enough when they fit in ``budget_bytes`` (default 512 MiB), and
    they are streamed from the probe again otherwise, so memory stays bounded.
    """

    def __init__(self, probe: ProbeSet, positions: Sequence[int], batch_size: int,
                 budget_bytes: int = 512 << 20) -> None:
        self.probe = probe
        self.positions = [int(p) for p in positions]
        self.batch_size = batch_size
        self.budget = budget_bytes
        self._cache: Optional[List[Tuple[List[int], torch.Tensor, torch.Tensor]]] = None
        self._used = 0
        self._overflow = False

    def __len__(self) -> int:
        return (len(self.positions) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[Tuple[List[int], torch.Tensor, torch.Tensor]]:
        if self._cache is not None:
            yield from self._cache
            return
        kept: List[Tuple[List[int], torch.Tensor, torch.Tensor]] = []
        self._used = 0  # a pass abandoned halfway must not count twice
        for batch in self.probe.batches(self.batch_size, self.positions):
            if not self._overflow:
                self._used += batch[1].element_size() * batch[1].nelement()
                if self._used <= self.budget:
                    kept.append(batch)
                else:
                    self._overflow = True
                    kept = []
            yield batch
        if not self._overflow:
            self._cache = kept
