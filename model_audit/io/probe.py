"""Probe sets: labelled images the audit runs on, read in batches.

Two formats:

* an ImageFolder directory, ``<root>/<class>/<image>`` (JPEG or PNG); classes are the sorted
  sub-directory names. Images are converted explicitly to the model's channels: grayscale
  (``L``) for one channel, ``RGB`` for three; an alpha channel is dropped (PIL's
  ``RGBA -> RGB``) and palette images are expanded to RGBA first.
* a tensor file, ``.safetensors`` with ``images`` (N,C,H,W; uint8 in 0..255 or float in 0..1)
  and ``labels`` (N; integer), and optional metadata ``classes`` (a JSON list of names). A
  model that does not take images gets ``inputs`` (N, any shape: tabular rows, token ids,
  audio features) instead of ``images``: given to it as stored (float32, or int64 for integer
  data), without the image steps below (``ProbeSet.is_image`` is False).

Pixel values are scaled to [0, 1], then normalised with ``(x - mean) / std``
(:func:`parse_normalize`). Images are resized only when ``resize`` is given. Nothing is held
in memory beyond one batch: images are decoded when a batch is asked for.

Examples:
    >>> probe = open_probe("cifar10/test", channels=3, normalize="cifar10", limit=1000)  # doctest: +SKIP
    >>> for positions, x, y in probe.batches(256): ...  # doctest: +SKIP
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..errors import EmptyProbeError, ProbeError
from .imagefolder import ImageFolderProbe
from .probe_set import (IMAGE_SUFFIXES, MAX_CLASSES, MAX_IMAGE_PIXELS, NORMALIZATIONS,
                        BatchCache, Normalization, ProbeSet, parse_normalize, parse_resize,
                        stratified_positions)
from .formats import (MANIFEST_SUFFIXES, TORCHVISION, HFDatasetProbe, ManifestProbe,
                      TorchvisionProbe, is_hf_dataset_dir)
from .tensorfile import TensorFileProbe

__all__ = ["IMAGE_SUFFIXES", "MAX_CLASSES", "MAX_IMAGE_PIXELS", "NORMALIZATIONS", "BatchCache",
           "ImageFolderProbe", "Normalization", "ProbeSet", "TensorFileProbe", "open_probe",
           "limited", "parse_normalize", "parse_resize", "stratified_positions"]


def open_probe(path: os.PathLike, *, channels: int = 3, normalize: Optional[str] = None,
               resize: Optional[str] = None, limit: Optional[int] = None, seed: int = 0,
               model_classes: Optional[Sequence[str]] = None,
               num_classes: Optional[int] = None, image_column: Optional[str] = None,
               label_column: Optional[str] = None) -> ProbeSet:
    """Open a probe set, optionally a stratified subset.

    Args:
        path: an ImageFolder directory, a tensor file (``.safetensors``), a CSV or Parquet
            manifest, a Hugging Face ``save_to_disk`` directory, or
            ``torchvision:NAME:ROOT[:split]`` (:mod:`model_audit.io.formats`).
        channels: the model's input channels (images are converted to it).
        normalize: see :func:`parse_normalize`.
        resize: ``None`` (keep sizes) or ``N``/``HxW``.
        limit: keep a class-stratified random subset of this many images or inputs (seeded).
        seed: seed of the subset.
        model_classes: the checkpoint's class names, when it has them: an ImageFolder's
            classes are then mapped onto the model's indices by name.
        num_classes: outputs of the model's head: labels must fit.
        image_column, label_column: the columns of a manifest or a datasets directory
            (default: detected).

    Raises:
        ProbeError: missing or unreadable probe, or one that does not fit the model.
    """
    spec = str(path)
    path = Path(path)
    normalization = parse_normalize(normalize)
    size = parse_resize(resize)
    columns = {"image_column": image_column, "label_column": label_column}
    if spec.startswith(TORCHVISION):
        probe: ProbeSet = TorchvisionProbe(spec, channels=channels, normalization=normalization,
                                           resize=size)
        _map_classes(probe, model_classes, spec)
    elif not path.exists():
        raise ProbeError(f"probe {path} does not exist; give an ImageFolder directory, a "
                         ".safetensors file with images (or non-image inputs) and labels, a CSV "
                         "or Parquet manifest, a datasets directory or torchvision:NAME:ROOT")
    elif is_hf_dataset_dir(path):
        probe = HFDatasetProbe(path, channels=channels, normalization=normalization,
                               resize=size, **columns)
        _map_classes(probe, model_classes, str(path))
    elif path.is_dir():
        probe = ImageFolderProbe(path, channels=channels, normalization=normalization,
                                 resize=size)
        _map_classes(probe, model_classes, str(path))
    elif path.suffix.lower() in MANIFEST_SUFFIXES:
        probe = ManifestProbe(path, channels=channels, normalization=normalization,
                              resize=size, **columns)
        _map_classes(probe, model_classes, str(path))
    elif path.suffix.lower() == ".safetensors":
        probe = TensorFileProbe(path, channels=channels, normalization=normalization, resize=size,
                                num_classes=num_classes)
    else:
        raise ProbeError(f"probe {path} is neither a directory, a .safetensors tensor file nor "
                         "a .csv or .parquet manifest")
    if len(probe) == 0:
        raise EmptyProbeError(f"probe {path} holds no {probe.unit}")
    if num_classes is not None:
        top = int(probe.labels.max())
        if top >= num_classes:
            raise ProbeError(
                f"probe {path} has labels up to {top} ({len(probe.classes)} classes) but the "
                f"model's head has {num_classes} outputs; use a probe of the model's classes "
                "(or the right checkpoint)")
    return limited(probe, limit, seed)


def limited(probe: ProbeSet, limit: Optional[int], seed: int) -> ProbeSet:
    """A class-stratified random subset of ``limit`` items (seeded); the probe itself without
    a limit."""
    if limit is None:
        return probe
    if limit < 1:
        raise ProbeError(f"--limit must be >= 1, got {limit}")
    return probe.subset(stratified_positions(probe.labels, limit, seed))


def _map_classes(probe: ProbeSet, model_classes: Optional[Sequence[str]], where: str) -> None:
    """Put a probe's named classes onto the model's indices by name, when the model names its
    classes (a probe's class the model does not have is an error naming the valid ones)."""
    if (not model_classes or tuple(probe.classes) == tuple(model_classes)
            or not getattr(probe, "named_labels", True)):  # integer labels are indices
        return
    unknown = [c for c in probe.classes if c not in model_classes]
    if unknown:
        raise ProbeError(
            f"probe {where}: classes {', '.join(unknown[:10])} are not among the model's "
            f"classes ({', '.join(list(model_classes)[:20])})")
    remap = torch.tensor([list(model_classes).index(c) for c in probe.classes])
    probe.labels = remap[probe.labels]
    probe.classes = tuple(model_classes)
