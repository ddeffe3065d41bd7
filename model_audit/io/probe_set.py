"""The probe set every reader returns: labels, classes, normalisation and resizing, batches,
stratified subsets and a bounded batch cache (see :mod:`model_audit.io.probe`)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .. import distributed
from ..errors import AuditError, ProbeError

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


class _Failed:
    """An error a DataLoader worker met, carried to the main process as a value (raised
    there, it keeps its class and message instead of DataLoader's re-wrapped traceback)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


class _Chunks(Dataset):
    """Batches of positions as a map-style dataset: item ``i`` is (chunk, decoded images)."""

    def __init__(self, probe: "ProbeSet", chunks: List[List[int]]) -> None:
        self.probe = probe
        self.chunks = chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> object:
        try:
            return self.chunks[i], self.probe.load(self.chunks[i])
        except AuditError as exc:
            return _Failed(exc)


def _one_thread(_worker: int) -> None:
    torch.set_num_threads(1)  # decoding is per process; the model's threads stay free


class ProbeSet:
    """A labelled image set read in batches. Subclasses implement :meth:`_load_raw`.

    ``is_image`` is False for a tensor probe of ``inputs`` (rows of any shape: tabular
    features, token ids, audio features): those are given to the model as stored, with no
    channel conversion, resizing or normalisation.
    """

    is_image = True
    #: inputs of integer type (token ids): a model takes them as they are, never scaled
    integer_inputs = False
    #: the stored shape of one row of a tensor probe; () for an ImageFolder (sizes vary)
    input_shape: Tuple[int, ...] = ()
    #: DataLoader workers that decode batches (None: :meth:`decode_workers` decides)
    workers: Optional[int] = None
    #: the size of the first image seen, when not resized (:meth:`_check_size`)
    _size: Optional[Tuple[int, int]] = None

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

    @property
    def unit(self) -> str:
        """What the probe holds, for messages: ``images``, or ``inputs`` for other data."""
        return "images" if self.is_image else "inputs"

    def _load_raw(self, source_indices: Sequence[int]) -> torch.Tensor:
        """Images at source indices as float (B,C,H,W) in [0, 1] with the model's channels."""
        raise NotImplementedError

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        if self.resize is None or tuple(x.shape[-2:]) == self.resize:
            return x
        return F.interpolate(x, size=self.resize, mode="bilinear", align_corners=False,
                             antialias=True).clamp_(0.0, 1.0)

    def _check_size(self, x: torch.Tensor, what: str) -> None:
        """Without ``resize``, every image of a probe has the size of the first one seen."""
        size = tuple(x.shape[-2:])
        if self._size is None:
            self._size = size  # type: ignore[assignment]
        elif size != self._size:
            raise ProbeError(
                f"{what} is {size[1]}x{size[0]} but earlier images are "
                f"{self._size[1]}x{self._size[0]}; give --resize to bring them to one size")

    def load(self, positions: Sequence[int], *, normalized: bool = True) -> torch.Tensor:
        """Images at ``positions`` (0..len-1) as a float batch; normalised unless asked not.
        Non-image inputs come as the model takes them (float32 or int64), never normalised."""
        src = [int(self.indices[p]) for p in positions]
        x = self._load_raw(src)
        if normalized and self.is_image:
            x = self.normalization.apply(x)
        return x

    def decode_workers(self, n_batches: int) -> int:
        """DataLoader worker processes that decode this probe's batches: ``workers`` when it
        was given; by default (``None``) up to 4 for an ImageFolder of more than one batch (one
        core per rank is left to the model), 0 otherwise (tensor files are read, not decoded)."""
        if self.workers is not None:
            return max(0, int(self.workers))
        if self.kind != "imagefolder" or n_batches < 2:
            return 0
        ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        return max(0, min(4, (os.cpu_count() or 1) // max(ranks, 1) - 1, n_batches - 1))

    def batches(self, batch_size: int, positions: Optional[Sequence[int]] = None
                ) -> Iterator[Tuple[List[int], torch.Tensor, torch.Tensor]]:
        """Yield ``(positions, images, labels)`` batches, one decoded at a time (in
        :meth:`decode_workers` DataLoader workers, a few batches ahead, when there are any)."""
        if batch_size < 1:
            raise ProbeError(f"batch size must be >= 1, got {batch_size}")
        order = list(range(len(self))) if positions is None else [int(p) for p in positions]
        chunks = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
        workers = self.decode_workers(len(chunks))
        if workers == 0:
            for chunk in chunks:
                yield chunk, self.load(chunk), self.labels[chunk]
            return
        loader = DataLoader(_Chunks(self, chunks), batch_size=None, shuffle=False,
                            num_workers=workers, worker_init_fn=_one_thread)
        for item in loader:
            if isinstance(item, _Failed):
                raise item.error
            chunk, x = item
            if self.is_image and self.resize is None:  # each worker checked only its own
                self._check_size(x, f"the batch of {self.unit} {chunk[0]}-{chunk[-1]}")
            yield chunk, x, self.labels[chunk]

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


class BatchCache:
    """Re-iterable batches of fixed probe positions, kept in memory up to a byte budget.

    The replay and the attribution pass over the same misclassified images many times;
    decoding them once is enough when they fit in ``budget_bytes`` (default 512 MiB), and
    they are streamed from the probe again otherwise, so memory stays bounded.

    With ``shard=True`` in a distributed run (:mod:`model_audit.distributed`), iterating yields
    only this rank's contiguous block of ``positions`` (``sharded`` is then True); the
    functions that take a BatchCache gather or all-reduce what they compute on it.
    ``positions`` stays the whole list.
    """

    def __init__(self, probe: ProbeSet, positions: Sequence[int], batch_size: int,
                 budget_bytes: int = 512 << 20, *, shard: bool = False) -> None:
        self.probe = probe
        self.positions = [int(p) for p in positions]
        self.sharded = shard and distributed.current().active
        self.local_positions = (distributed.local_part(self.positions) if self.sharded
                                else self.positions)
        self.batch_size = batch_size
        self.budget = budget_bytes
        self._cache: Optional[List[Tuple[List[int], torch.Tensor, torch.Tensor]]] = None
        self._used = 0
        self._overflow = False

    def __len__(self) -> int:
        return (len(self.local_positions) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[Tuple[List[int], torch.Tensor, torch.Tensor]]:
        if self._cache is not None:
            yield from self._cache
            return
        kept: List[Tuple[List[int], torch.Tensor, torch.Tensor]] = []
        self._used = 0  # a pass abandoned halfway must not count twice
        for batch in self.probe.batches(self.batch_size, self.local_positions):
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

    def gathered(self, local: torch.Tensor) -> torch.Tensor:
        """Rows computed on this rank's batches -> rows of every position (in the order of
        ``positions``) on every rank; ``local`` itself when the cache is not sharded."""
        return distributed.gather_rows(local, len(self.positions)) if self.sharded else local
