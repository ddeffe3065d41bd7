"""Probe sets in the formats people already have, read one image at a time (never loaded whole):

* ``torchvision:NAME:ROOT[:split]``: a torchvision dataset class over files already under
  ROOT (``torchvision:CIFAR10:~/data``; nothing is downloaded). The split is ``test`` by default
  (``train=False`` for the classes that take ``train``, ``split="test"`` for those that take
  ``split``).
* a CSV or Parquet manifest of ``path,label`` rows (paths relative to the manifest; labels are
  class names, or integers): the common layout in industry.
* a Hugging Face ``datasets`` directory written by ``save_to_disk`` (a Dataset, or a
  DatasetDict whose ``test`` split, else its first, is used); the image and label columns are
  detected (an ``Image`` and a ``ClassLabel`` feature) or named (``--image-column``,
  ``--label-column``). Needs the ``datasets`` package (``pip install 'model-audit[hf]'``).

Each is decoded per batch like an ImageFolder, with the same normalisation, resizing and
channel conversion, and the same errors: a missing file, a label not in the classes, a decode
error naming the row, an empty set.
"""
from __future__ import annotations

import csv
import inspect
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import torch
from PIL import Image

from ..errors import EmptyProbeError, ProbeError
from .imagefolder import decode_file, pil_to_tensor
from .memory import declared_labels
from .probe_set import Normalization, ProbeSet

TORCHVISION = "torchvision:"
MANIFEST_SUFFIXES = (".csv", ".parquet")
PATH_COLUMNS = ("path", "image", "file", "filename", "image_path")
LABEL_COLUMNS = ("label", "labels", "class", "target")


class ItemsProbe(ProbeSet):
    """A probe whose images come one at a time by index; subclasses give :meth:`_image`."""

    #: the labels are class names (mapped onto a model's named classes), not indices
    named_labels = True

    def _image(self, index: int) -> Any:
        """The image of source row ``index``: a Pillow image, or a file path."""
        raise NotImplementedError

    def _where(self, index: int) -> str:
        return f"{self.source} row {index}"

    def _load_raw(self, source_indices: Sequence[int]) -> torch.Tensor:
        images = []
        for i in source_indices:
            image = self._image(int(i))
            if isinstance(image, Path):
                x = decode_file(image, self.channels)
            elif isinstance(image, Image.Image):
                x = pil_to_tensor(image, self.channels, self._where(int(i)))
            else:
                raise ProbeError(f"{self._where(int(i))}: the image is a {type(image).__name__}, "
                                 "not a Pillow image")
            x = x.unsqueeze(0)
            if self.resize is not None:
                x = self._resize(x)
            else:
                self._check_size(x, self._where(int(i)))
            images.append(x)
        return torch.cat(images) if images else torch.empty(0, self.channels, 1, 1)


def _label_indices(values: Sequence[Any], source: str
                   ) -> Tuple[torch.Tensor, List[str], bool]:
    """Labels as class indices, the class names, and whether the labels were names: integers
    keep their value (names are the numbers), names are sorted as an ImageFolder's are."""
    if all(isinstance(v, int) or (isinstance(v, str) and v.strip().lstrip("-").isdigit())
           for v in values):
        ints = [int(v) for v in values]
        if min(ints) < 0:
            raise ProbeError(f"{source}: labels must be >= 0, found {min(ints)}")
        return torch.tensor(ints), [str(i) for i in range(max(ints) + 1)], False
    names = sorted({str(v) for v in values})
    index = {n: i for i, n in enumerate(names)}
    return torch.tensor([index[str(v)] for v in values]), names, True


# ------------------------------------------------------------------------------------------
# torchvision:NAME:ROOT[:split]


class TorchvisionProbe(ItemsProbe):
    """``torchvision:NAME:ROOT[:split]``: the dataset class over its files under ROOT."""

    kind = "torchvision"  # type: ignore[assignment]
    #: torchvision's labels are the model's class indices; its ``classes`` only name them
    named_labels = False

    def __init__(self, spec: str, *, channels: int, normalization: Normalization,
                 resize: Optional[Tuple[int, int]]) -> None:
        import torchvision.datasets as tvd

        parts = spec[len(TORCHVISION):].split(":")
        if len(parts) not in (2, 3) or not all(parts):
            raise ProbeError(f"{spec!r}: give torchvision:NAME:ROOT or torchvision:NAME:ROOT:SPLIT "
                             "(e.g. torchvision:CIFAR10:~/data:test)")
        name, root, split = parts[0], Path(parts[1]).expanduser(), parts[2] if len(parts) == 3 \
            else "test"
        cls = getattr(tvd, name, None)
        if not (inspect.isclass(cls) and issubclass(cls, tvd.VisionDataset)):
            raise ProbeError(f"{spec!r}: torchvision has no dataset class {name!r} (e.g. CIFAR10, "
                             "MNIST, SVHN, ImageFolder)")
        params = inspect.signature(cls.__init__).parameters
        kwargs: dict = {}
        if "train" in params:
            if split not in ("train", "test"):
                raise ProbeError(f"{spec!r}: {name} has the splits train and test, not {split!r}")
            kwargs["train"] = split == "train"
        elif "split" in params:
            kwargs["split"] = split
        if "download" in params:
            kwargs["download"] = False
        try:
            self.dataset = cls(str(root), **kwargs)
        except Exception as exc:  # torchvision raises RuntimeError, ValueError, OSError, ...
            raise ProbeError(f"{spec!r}: {name} could not be opened under {root} "
                             f"({type(exc).__name__}: {exc}); its files must already be there: "
                             "nothing is downloaded") from exc
        n = len(self.dataset)
        if n == 0:
            raise EmptyProbeError(f"{spec!r}: the {split} split holds no images")
        labels = declared_labels(self.dataset, n)
        if labels is None:
            labels = torch.tensor([int(self.dataset[i][1]) for i in range(n)])
        classes = [str(c) for c in getattr(self.dataset, "classes", [])] or \
            [str(i) for i in range(int(labels.max()) + 1)]
        super().__init__(spec, classes, labels, channels=channels, normalization=normalization,
                         resize=resize)

    def _image(self, index: int) -> Any:
        image = self.dataset[index][0]
        if isinstance(image, torch.Tensor):  # a tensor image (C,H,W) in [0, 1] or uint8
            from torchvision.transforms.functional import to_pil_image
            return to_pil_image(image)
        return image


# ------------------------------------------------------------------------------------------
# CSV / Parquet manifests


def _manifest_rows(path: Path) -> Tuple[List[str], List[List[Any]]]:
    if path.suffix.lower() == ".csv":
        try:
            with open(path, newline="", encoding="utf-8") as fh:
                rows = list(csv.reader(fh))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise ProbeError(f"{path}: cannot read the manifest ({exc})") from exc
        if not rows:
            raise EmptyProbeError(f"{path}: the manifest is empty")
        return [c.strip() for c in rows[0]], [r for r in rows[1:] if r]
    try:
        import pandas
        frame = pandas.read_parquet(path)
    except ImportError as exc:
        raise ProbeError(f"{path}: reading Parquet needs pandas and pyarrow: pip install "
                         "pandas pyarrow") from exc
    except Exception as exc:  # pyarrow's own errors
        raise ProbeError(f"{path}: cannot read the manifest ({type(exc).__name__}: {exc})") \
            from exc
    return [str(c) for c in frame.columns], frame.values.tolist()


def _column(header: Sequence[str], given: Optional[str], candidates: Sequence[str],
            what: str, where: str, option: str) -> int:
    if given is not None:
        if given not in header:
            raise ProbeError(f"{where}: no column {given!r} (it has {', '.join(header)})")
        return list(header).index(given)
    for name in candidates:
        if name in header:
            return list(header).index(name)
    raise ProbeError(f"{where}: no {what} column (it has {', '.join(header)}); name it with "
                     f"{option}")


class ManifestProbe(ItemsProbe):
    """``path,label`` rows of a CSV or Parquet file; paths relative to the manifest."""

    kind = "manifest"  # type: ignore[assignment]

    def __init__(self, path: Path, *, channels: int, normalization: Normalization,
                 resize: Optional[Tuple[int, int]], image_column: Optional[str] = None,
                 label_column: Optional[str] = None) -> None:
        path = Path(path)
        header, rows = _manifest_rows(path)
        ip = _column(header, image_column, PATH_COLUMNS, "image path", str(path),
                     "--image-column")
        lp = _column(header, label_column, LABEL_COLUMNS, "label", str(path), "--label-column")
        if not rows:
            raise EmptyProbeError(f"{path}: the manifest has no rows")
        files: List[Path] = []
        for n, row in enumerate(rows, start=2 if path.suffix.lower() == ".csv" else 1):
            if len(row) <= max(ip, lp) or row[ip] in (None, "") or row[lp] in (None, ""):
                raise ProbeError(f"{path} row {n}: no image path or label")
            file = (path.parent / str(row[ip])).expanduser()
            if not file.is_file():
                raise ProbeError(f"{path} row {n}: the image {row[ip]} does not exist "
                                 f"(looked for {file}; paths are relative to the manifest)")
            files.append(file)
        self.files = files
        labels, classes, self.named_labels = _label_indices([row[lp] for row in rows], str(path))
        super().__init__(str(path), classes, labels, channels=channels,
                         normalization=normalization, resize=resize)

    def _image(self, index: int) -> Any:
        return self.files[index]


# ------------------------------------------------------------------------------------------
# Hugging Face datasets (save_to_disk)


def is_hf_dataset_dir(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in
                                 ("dataset_info.json", "dataset_dict.json", "state.json"))


class HFDatasetProbe(ItemsProbe):
    """A ``datasets`` directory written by ``save_to_disk``; rows decoded per batch."""

    kind = "hf-dataset"  # type: ignore[assignment]

    def __init__(self, path: Path, *, channels: int, normalization: Normalization,
                 resize: Optional[Tuple[int, int]], image_column: Optional[str] = None,
                 label_column: Optional[str] = None) -> None:
        try:
            import datasets
        except ImportError as exc:
            raise ProbeError(f"{path} is a Hugging Face datasets directory; reading it needs "
                             "the datasets package: pip install 'model-audit[hf]'") from exc
        try:
            data = datasets.load_from_disk(str(path))
        except Exception as exc:  # the library's own errors
            raise ProbeError(f"{path}: cannot load the datasets directory "
                             f"({type(exc).__name__}: {exc})") from exc
        if isinstance(data, datasets.DatasetDict):
            split = "test" if "test" in data else next(iter(data), None)
            if split is None:
                raise EmptyProbeError(f"{path}: the DatasetDict has no split")
            data = data[split]
        features = data.features
        self.image_column = self._pick(features, image_column, datasets.Image, PATH_COLUMNS,
                                       "image", str(path), "--image-column")
        self.label_column = self._pick(features, label_column, datasets.ClassLabel,
                                       LABEL_COLUMNS, "label", str(path), "--label-column")
        if len(data) == 0:
            raise EmptyProbeError(f"{path}: the dataset has no rows")
        self.data = data
        feature = features[self.label_column]
        values = data[self.label_column]
        if isinstance(feature, datasets.ClassLabel):
            labels, classes = torch.as_tensor(values).long(), list(feature.names)
        else:
            labels, classes, self.named_labels = _label_indices(values, str(path))
        super().__init__(str(path), classes, labels, channels=channels,
                         normalization=normalization, resize=resize)

    @staticmethod
    def _pick(features: Any, given: Optional[str], kind: type, names: Sequence[str],
              what: str, where: str, option: str) -> str:
        columns = list(features)
        if given is not None:
            if given not in columns:
                raise ProbeError(f"{where}: no column {given!r} (it has {', '.join(columns)})")
            return given
        typed = [c for c in columns if isinstance(features[c], kind)]
        if typed:
            return typed[0]
        named = [c for c in names if c in columns]
        if named:
            return named[0]
        raise ProbeError(f"{where}: no {what} column (it has {', '.join(columns)}); name it "
                         f"with {option}")

    def _image(self, index: int) -> Any:
        try:
            image = self.data[index][self.image_column]
        except Exception as exc:  # decoding happens inside the library
            raise ProbeError(f"{self._where(index)}: cannot decode the image "
                             f"({type(exc).__name__}: {exc})") from exc
        if isinstance(image, str):
            return Path(self.source) / image
        return image
