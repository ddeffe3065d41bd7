"""CIFAR-10 subsets for the integration tests and the benchmark (a helper module, no tests).

The real data is ``../shared/data/cifar10-jpeg.tar.gz`` (next to the repository, never inside
it): CIFAR-10 as JPEGs in an ImageFolder layout, ``train/<class>/NNNN.jpg`` (5,000 per class)
and ``test/<class>/NNNN.jpg`` (1,000 per class). :func:`cifar_subset` cuts a small
class-balanced ImageFolder out of it into a cache directory outside the repository, streaming
through the archive once.
"""
from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

ROOT = Path(__file__).resolve().parent.parent
CIFAR_TARBALL = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"

#: Alphabetical, which is also the ImageFolder label order.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")

SPLITS = ("train", "test")

#: Written last into a finished subset directory (hidden: ImageFolder probes skip it).
COMPLETE_MARKER = ".complete"


def missing_data_message(tarball: Path = CIFAR_TARBALL) -> str:
    return (f"CIFAR-10 archive not found at {tarball} (expected next to the repository, "
            "in ../shared/data/); the CIFAR integration tests need it")


def _is_complete(directory: Path, classes: Sequence[str], per_class: int) -> bool:
    if not (directory / COMPLETE_MARKER).is_file():
        return False
    for name in classes:
        cdir = directory / name
        if not cdir.is_dir() or sum(1 for p in cdir.iterdir() if p.suffix == ".jpg") != per_class:
            return False
    return True


def cifar_subset(root_cache_dir: Union[str, os.PathLike], split: str, per_class: int, *,
                 tarball: Union[str, os.PathLike, None] = None,
                 classes: Sequence[str] = CIFAR10_CLASSES, skip: int = 0) -> Path:
    """The first ``per_class`` images of every class of ``split`` as an ImageFolder directory.

    With ``skip``, the ``per_class`` images after the first ``skip`` of every class: a subset
    disjoint from the one with ``skip=0`` (e.g. unseen repair data for a model trained on the
    first images), in ``<split>-<per_class>-from<skip>``.

    Extracts into ``root_cache_dir/<split>-<per_class>/<class>/*.jpg`` by streaming through
    the tar.gz once (stopping as soon as every class is full) and returns that directory. A
    directory that is already complete is re-used without opening the archive. The subset is
    built in a temporary sibling directory and renamed into place, so a half-written subset is
    never seen (also not by a concurrent process).

    "First" is archive order, which is fixed, so the subset is the same on every machine.

    Raises:
        FileNotFoundError: the archive does not exist (message names the path).
        ValueError: bad split or ``per_class``, or the archive has fewer images than asked.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if per_class < 1 or skip < 0:
        raise ValueError(f"per_class must be >= 1 and skip >= 0, got {per_class}, {skip}")
    tar_path = Path(tarball) if tarball is not None else CIFAR_TARBALL
    root = Path(root_cache_dir)
    target = root / (f"{split}-{per_class}" + (f"-from{skip}" if skip else ""))
    if _is_complete(target, classes, per_class):
        return target
    if not tar_path.is_file():
        raise FileNotFoundError(missing_data_message(tar_path))
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{split}-{per_class}.", dir=root))
    try:
        counts: Dict[str, int] = {name: 0 for name in classes}
        skipped: Dict[str, int] = {name: 0 for name in classes}
        for name in classes:
            (staging / name).mkdir()
        remaining = len(classes)
        with tarfile.open(tar_path, mode="r:gz") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                parts = member.name.split("/")
                if len(parts) != 3 or parts[0] != split or not parts[2].endswith(".jpg"):
                    continue
                cls, fname = parts[1], parts[2]
                if cls not in counts or counts[cls] >= per_class:
                    continue
                if skipped[cls] < skip:
                    skipped[cls] += 1
                    continue
                # Read the bytes ourselves instead of tar.extract(): only plain files with a
                # known class and a plain file name are written, nothing else in the archive.
                if fname.startswith(".") or os.sep in fname:
                    continue
                fh = tar.extractfile(member)
                if fh is None:
                    continue
                (staging / cls / fname).write_bytes(fh.read())
                counts[cls] += 1
                if counts[cls] == per_class:
                    remaining -= 1
                    if remaining == 0:
                        break
        short = {c: n for c, n in counts.items() if n < per_class}
        if short:
            raise ValueError(f"{tar_path} has fewer than {per_class} {split} images "
                             f"{f'after the first {skip} ' if skip else ''}for "
                             f"{', '.join(f'{c} ({n})' for c, n in short.items())}")
        (staging / COMPLETE_MARKER).write_text(f"{split} {per_class} from {skip}\n")
        if target.exists():
            shutil.rmtree(target)  # an incomplete leftover
        try:
            os.replace(staging, target)
        except OSError:
            # Another process finished the same subset first.
            if not _is_complete(target, classes, per_class):
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def load_images(directory: Union[str, os.PathLike], normalize: str = "cifar10",
                classes: Optional[Sequence[str]] = None):
    """Every image of an ImageFolder subset as one normalised tensor, with labels.

    Uses the tool's own probe reader (:func:`model_audit.io.probe.open_probe`), so training
    sees exactly the preprocessing the scan applies.
    """
    from model_audit.io.probe import open_probe
    probe = open_probe(directory, channels=3, normalize=normalize, model_classes=classes)
    x = probe.load(list(range(len(probe))))
    return x, probe.labels.clone(), probe.classes
