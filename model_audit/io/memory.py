"""A probe (or repair set) from objects already in memory: a ``torch.utils.data.Dataset``
yielding ``(input, label)``, a ``DataLoader`` over one, or a pair of tensors
``(inputs, labels)``.

The inputs reach the model as the dataset yields them: its own transform is its normalisation,
and nothing is normalised or resized again (a 3-dimensional float input is treated as an image
for the report's thumbnails, which rescale it to [0, 1] for display only). Class names come
from the dataset's ``classes`` attribute when it has one. The labels are read once: from the
dataset's ``targets`` (torchvision's datasets) or the label tensor when there is one, else from
one pass over the dataset, which decodes every item once.

Examples:
    >>> import torch
    >>> probe = DatasetProbe((torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 1, 0])))
    >>> len(probe), probe.classes, probe.is_image, tuple(probe.load([0, 2]).shape)
    (4, ('0', '1'), True, (2, 3, 8, 8))
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ..errors import EmptyProbeError, ProbeError
from .probe_set import MAX_CLASSES, ProbeSet, parse_normalize

#: ``DatasetProbe.describe()["normalize"]``: the dataset's own transform did it.
DATASET_TRANSFORM = "the dataset's own transform"

InMemory = Any  # a Dataset, a DataLoader or a (inputs, labels) pair of tensors


def is_in_memory(obj: Any) -> bool:
    """Whether ``obj`` is a dataset, a data loader or a pair of tensors (not a path)."""
    if isinstance(obj, (Dataset, DataLoader)):
        return True
    return (isinstance(obj, (tuple, list)) and len(obj) == 2
            and all(isinstance(t, torch.Tensor) for t in obj))


def _as_dataset(obj: InMemory) -> Tuple[Dataset, str]:
    if isinstance(obj, DataLoader):
        return obj.dataset, f"<in-memory DataLoader over {type(obj.dataset).__name__}>"
    if isinstance(obj, Dataset):
        return obj, f"<in-memory {type(obj).__name__}>"
    inputs, labels = obj
    if inputs.shape[:1] != labels.shape[:1] or labels.dim() != 1:
        raise ProbeError(f"the tensor pair holds {inputs.shape[0]} inputs and labels of shape "
                         f"{tuple(labels.shape)}: give (inputs (N, ...), labels (N))")
    if labels.is_floating_point():
        raise ProbeError("the labels tensor is of a float type: give integer class indices")
    return TensorDataset(inputs, labels), "<in-memory tensors>"


def _item(dataset: Dataset, i: int) -> Tuple[torch.Tensor, int]:
    """Item ``i`` as (input tensor, integer label), or a ProbeError saying what it is."""
    try:
        item = dataset[i]
    except Exception as exc:  # the dataset's own code: never a traceback
        raise ProbeError(f"the dataset could not give item {i}: {type(exc).__name__}: "
                         f"{exc}") from exc
    if not (isinstance(item, (tuple, list)) and len(item) >= 2):
        raise ProbeError(f"the dataset's item {i} is a {type(item).__name__}; a probe dataset "
                         "yields (input, label) pairs")
    x, y = item[0], item[1]
    if not isinstance(x, torch.Tensor):
        raise ProbeError(f"the dataset's item {i} has an input of type {type(x).__name__}; it "
                         "must be a tensor (give the dataset a transform such as "
                         "torchvision.transforms.ToTensor())")
    if isinstance(y, torch.Tensor):
        if y.numel() != 1 or y.is_floating_point():
            raise ProbeError(f"the dataset's item {i} has a label of shape {tuple(y.shape)} "
                             f"and type {y.dtype}; a label is one integer class index")
        y = int(y.item())
    if not isinstance(y, int) or isinstance(y, bool):
        raise ProbeError(f"the dataset's item {i} has a label {y!r}; a label is one integer "
                         "class index")
    return x, y


def declared_labels(dataset: Any, n: int) -> Optional[torch.Tensor]:
    """The ``n`` labels a dataset declares without decoding an item: a TensorDataset's label
    tensor, or its ``targets`` (torchvision's datasets) or ``labels`` (SVHN); None when it
    declares none (they are then read from one pass over the items)."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].long()
    for name in ("targets", "labels"):
        values = getattr(dataset, name, None)
        if values is None or len(values) != n:
            continue
        try:
            return torch.as_tensor(list(values) if not isinstance(values, torch.Tensor)
                                   else values).long().reshape(n)
        except (TypeError, ValueError, RuntimeError):
            continue
    return None


def _labels(dataset: Dataset, n: int) -> torch.Tensor:
    declared = declared_labels(dataset, n)
    if declared is not None:
        return declared
    return torch.tensor([_item(dataset, i)[1] for i in range(n)], dtype=torch.long)


class DatasetProbe(ProbeSet):
    """A probe over an in-memory dataset (see the module docstring)."""

    kind = "dataset"  # type: ignore[assignment]
    #: the report shows an image rescaled to [0, 1] (the dataset normalised it its own way)
    rescale_for_display = True

    def __init__(self, data: InMemory, *, classes: Optional[Sequence[str]] = None,
                 num_classes: Optional[int] = None, source: Optional[str] = None) -> None:
        """``classes``: names when the dataset has no ``classes`` attribute (the model's)."""
        self.dataset, default_source = _as_dataset(data)
        try:
            n = len(self.dataset)  # type: ignore[arg-type]
        except TypeError as exc:
            raise ProbeError("the dataset has no length: give a map-style Dataset (with "
                             "__len__ and __getitem__), a DataLoader over one, or tensors"
                             ) from exc
        if n == 0:
            raise EmptyProbeError("the dataset is empty: the probe needs labelled inputs")
        first, _ = _item(self.dataset, 0)
        labels = _labels(self.dataset, n)
        self._check_labels(labels, num_classes)
        names = self._class_names(classes, labels)
        self.is_image = first.dim() == 3 and first.is_floating_point()
        self.integer_inputs = not first.is_floating_point()
        self.input_shape = tuple(first.shape)
        super().__init__(source or default_source, names, labels, channels=(
            int(first.shape[0]) if self.is_image else 0), normalization=parse_normalize("none"),
            resize=None)

    @staticmethod
    def _check_labels(labels: torch.Tensor, num_classes: Optional[int]) -> None:
        low, high = int(labels.min()), int(labels.max())
        if low < 0:
            raise ProbeError(f"the dataset's labels must be >= 0, found {low}")
        if num_classes is not None and high >= num_classes:
            raise ProbeError(f"the dataset has labels up to {high} but the model's head has "
                             f"{num_classes} outputs; labels are class indices 0.."
                             f"{num_classes - 1}")
        if high >= MAX_CLASSES:
            raise ProbeError(f"the dataset's labels go up to {high}: more than {MAX_CLASSES} "
                             "classes; the labels are corrupt")

    def _class_names(self, given: Optional[Sequence[str]], labels: torch.Tensor) -> List[str]:
        names = getattr(self.dataset, "classes", None)  # the dataset's own names first
        names = given if names is None else names
        n_classes = int(labels.max()) + 1
        if names is None:
            return [str(i) for i in range(n_classes)]
        names = [str(c) for c in names]
        if len(names) < n_classes:
            raise ProbeError(f"the dataset has labels up to {n_classes - 1} but names only "
                             f"{len(names)} classes")
        return names

    def _load_raw(self, source_indices: Sequence[int]) -> torch.Tensor:
        rows = [_item(self.dataset, int(i))[0] for i in source_indices]
        if not rows:
            return torch.empty(0, *self.input_shape)
        shapes = {tuple(r.shape) for r in rows}
        if len(shapes) > 1:
            raise ProbeError(f"the dataset's inputs have different shapes ({sorted(shapes)[:3]}"
                             "): give it a transform that brings them to one size")
        x = torch.stack(rows)
        return x.float() if x.is_floating_point() else x.long()

    def decode_workers(self, n_batches: int) -> int:
        return 0  # the dataset's items are made in this process (its transform may hold state)

    def describe(self) -> Dict[str, object]:
        out = super().describe()
        out["normalize"] = DATASET_TRANSFORM
        out["input_shape"] = list(self.input_shape)
        return out


def as_probe(data: InMemory, *, classes: Optional[Sequence[str]] = None,
             num_classes: Optional[int] = None) -> Optional[ProbeSet]:
    """``data`` as a probe when it is in memory (a ProbeSet as it is); None for a path."""
    if isinstance(data, ProbeSet):
        return data
    if isinstance(data, (str, os.PathLike)) or not is_in_memory(data):
        return None
    return DatasetProbe(data, classes=classes, num_classes=num_classes)
