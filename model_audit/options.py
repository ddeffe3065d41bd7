"""Options shared by every command that loads a model and a probe, and the loading itself.

``--arch``, ``--num-classes``, ``--normalize``, ``--resize``, ``--limit``, ``--seed``,
``--device``, ``--granularity``, ``--batch-size`` mean the same in ``scan``, ``compare``,
``fix`` and ``gate``: they all go through :class:`AuditOptions` and :func:`load_inputs`.
"""
from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from .models.checkpoint import LoadedCheckpoint, load_checkpoint
from .errors import CheckpointError, ConfigError, ProbeError
from .distributed import rank_device
from .core.layers import GRANULARITIES
from .io.memory import DatasetProbe, as_probe
from .io.probe import ProbeSet, limited, open_probe
from .models.module import loaded_from_module
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class AuditOptions:
    """How to load the model and the probe, and where to run."""

    arch: Optional[str] = None          # default: the checkpoint's metadata
    num_classes: Optional[int] = None   # default: metadata, else the head's weight
    normalize: Optional[str] = None     # default: metadata, else none
    resize: Optional[str] = None        # N or HxW; default: keep sizes
    limit: Optional[int] = None         # class-stratified subset of the probe
    seed: int = 0
    device: str = "auto"
    granularity: str = "group"
    batch_size: int = 128
    #: DataLoader processes decoding the probe (None: up to 4 for an ImageFolder; not in
    #: to_dict: it changes the speed, never the answer)
    workers: Optional[int] = None
    #: the image and label columns of a manifest or datasets directory (None: detected)
    image_column: Optional[str] = None
    label_column: Optional[str] = None

    def validate(self) -> None:
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise ConfigError(f"unknown device {self.device!r}; valid: {', '.join(DEVICES)}")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(
                f"unknown granularity {self.granularity!r}; valid: {', '.join(GRANULARITIES)}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1, got {self.limit}")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"workers must be >= 0 (0: decode in the main process), got "
                              f"{self.workers}")

    def to_dict(self) -> Dict[str, Any]:
        data = asdict(self)
        del data["workers"]
        for key in ("image_column", "label_column"):
            if data[key] is None:  # only when given: older audits have neither
                del data[key]
        return data


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cuda`` without a GPU is an error.
    Under torchrun, ``cuda`` is this rank's GPU (``cuda:LOCAL_RANK``)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} asked for, but no CUDA device is available; "
                          "use --device cpu or auto")
    return rank_device(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def open_probe_for(ckpt: LoadedCheckpoint, probe: "os.PathLike[str] | str",
                   options: AuditOptions, *, limit: Optional[int] = None,
                   ) -> Tuple[ProbeSet, List[str]]:
    """Open a probe (or repair) set the way ``ckpt`` needs its inputs: its channels, classes,
    normalisation (``options.normalize``, else the checkpoint's metadata or its source's
    config, else none) and size (``options.resize``, else its source's config, else kept).

    Args:
        limit: a class-stratified subset size; default ``options.limit``.

    Returns:
        The set and warnings for the user (no normalisation known, ignored files, image
        options given for a probe of non-image ``inputs``, which ignores them).
    """
    warnings: List[str] = []
    normalize = options.normalize or ckpt.normalize
    resize = options.resize
    if resize is None and ckpt.input_size is not None:
        resize = "{}x{}".format(*ckpt.input_size)
    probe_set = open_probe(probe, channels=ckpt.in_channels, normalize=normalize or "none",
                           resize=resize,
                           limit=options.limit if limit is None else limit, seed=options.seed,
                           model_classes=ckpt.classes, num_classes=ckpt.num_classes,
                           image_column=options.image_column, label_column=options.label_column)
    probe_set.workers = options.workers
    if not probe_set.is_image:  # inputs reach the model as stored: nothing to warn about
        given = [flag for flag, value in (("--normalize", options.normalize),
                                          ("--resize", options.resize)) if value]
        if given:
            verbs = ("apply", "were") if len(given) > 1 else ("applies", "was")
            warnings.append(f"{' and '.join(given)} {verbs[0]} to images only and {verbs[1]} "
                            f"ignored: {probe} holds inputs, given to the model as stored")
    else:
        if normalize is None:
            normalize = "none"
            warnings.append("no normalisation given (--normalize) and none in the checkpoint's "
                            "metadata: images are only scaled to [0, 1]")
        if ckpt.preprocessing_from and not (options.normalize and options.resize):
            warnings.append(
                f"preprocessing from {ckpt.preprocessing_from}: normalisation {normalize}, "
                f"images resized to {resize}; give --normalize and --resize if the model was "
                "trained otherwise")
    ignored = getattr(probe_set, "ignored", [])
    if ignored:
        warnings.append(f"{len(ignored)} non-image file(s) in the probe were ignored, "
                        f"e.g. {ignored[0]}")
    return probe_set, warnings


def load_inputs(checkpoint: "os.PathLike[str] | str", probe: "os.PathLike[str] | str",
                options: AuditOptions) -> Tuple[LoadedCheckpoint, ProbeSet, List[str]]:
    """Load the checkpoint and open the probe with the same options in every command.

    Returns:
        The loaded checkpoint, the probe set and warnings for the user.
    """
    ckpt, warnings = load_model(checkpoint, options)
    probe_set, more = open_probe_for(ckpt, probe, options)
    return ckpt, probe_set, warnings + more


def load_model(checkpoint: "os.PathLike[str] | str", options: AuditOptions
               ) -> Tuple[LoadedCheckpoint, List[str]]:
    """Load a checkpoint file or model directory with ``options``; warnings for the user."""
    options.validate()
    warnings: List[str] = []
    ckpt = load_checkpoint(checkpoint, arch=options.arch, num_classes=options.num_classes)
    if ckpt.nonfinite:
        warnings.append(f"{len(ckpt.nonfinite)} tensor(s) hold NaN/Inf values: "
                        f"{', '.join(ckpt.nonfinite[:10])}")
    if ckpt.guessed:
        warnings.append(f"{checkpoint} does not name its architecture; its keys and shapes "
                        f"match {ckpt.arch} only, which is used (give --arch to choose)")
    if ckpt.left_out:
        warnings.append(f"{len(ckpt.left_out)} tensor(s) of {ckpt.arch}'s auxiliary heads "
                        f"(used only in training, e.g. {ckpt.left_out[0]}) were left out of "
                        "the audit")
    return ckpt, warnings


def resolve_inputs(checkpoint: Any, probe: Any, options: AuditOptions
                   ) -> Tuple[LoadedCheckpoint, ProbeSet, List[str]]:
    """Like :func:`load_inputs`, also for a model and data already in memory.

    ``checkpoint`` is a path, a :class:`LoadedCheckpoint` or an ``nn.Module`` (a copy is
    audited: :func:`~model_audit.models.module.loaded_from_module`). ``probe`` is a path
    (opened with ``options`` and the checkpoint's metadata), a :class:`ProbeSet`, a
    ``Dataset`` yielding ``(input, label)``, a ``DataLoader`` or a pair of tensors
    ``(inputs, labels)`` (:class:`~model_audit.io.memory.DatasetProbe`: the dataset's own
    transform is its normalisation).

    Raises:
        ProbeError: data the model cannot take (or of another kind: ConfigError).
        CheckpointError: a model whose output on the probe is not one logit per class.
    """
    options.validate()
    from_module = isinstance(checkpoint, nn.Module)
    warnings: List[str] = []
    if from_module:
        checkpoint = loaded_from_module(checkpoint, normalize=options.normalize)
    elif isinstance(checkpoint, (str, os.PathLike)):
        checkpoint, warnings = load_model(checkpoint, options)
    elif not isinstance(checkpoint, LoadedCheckpoint):
        raise ConfigError(f"the model is a {type(checkpoint).__name__}: give a checkpoint path, "
                          "a LoadedCheckpoint or a torch.nn.Module")
    probe_set, more = resolve_data(checkpoint, probe, options)
    if from_module or isinstance(probe_set, DatasetProbe):
        check_logits(checkpoint, probe_set)
    return checkpoint, probe_set, warnings + more


def resolve_data(ckpt: LoadedCheckpoint, data: Any, options: AuditOptions, *,
                 limit: Optional[int] = None) -> Tuple[ProbeSet, List[str]]:
    """A probe or repair set for ``ckpt`` from a path (:func:`open_probe_for`), a
    :class:`ProbeSet` (as it is) or data in memory (:class:`~model_audit.io.memory.
    DatasetProbe`, with the class-stratified subset of ``limit``, default ``options.limit``).
    """
    limit = options.limit if limit is None else limit
    probe_set = as_probe(data, classes=ckpt.classes, num_classes=ckpt.num_classes)
    if probe_set is None:
        if not isinstance(data, (str, os.PathLike)):
            raise ConfigError(f"the data is a {type(data).__name__}: give a path, a ProbeSet, "
                              "a Dataset yielding (input, label), a DataLoader or a pair of "
                              "tensors (inputs, labels)")
        return open_probe_for(ckpt, data, options, limit=limit)
    warnings: List[str] = []
    if isinstance(probe_set, DatasetProbe):
        if options.normalize or options.resize:
            warnings.append("--normalize and --resize are ignored for an in-memory dataset: "
                            "its own transform prepares the inputs")
        probe_set = limited(probe_set, limit, options.seed)
    return probe_set, warnings


def check_logits(ckpt: LoadedCheckpoint, probe: ProbeSet) -> None:
    """Whether the model maps the probe's first input to one logit per class (a float tensor
    of shape (1, num_classes)): a dataset yielding the wrong shape (ProbeError) or a module
    whose output is not logits (CheckpointError) is said here, not deep inside a scan."""
    x = probe.load([0])
    try:
        with torch.inference_mode():
            out = ckpt.model.eval()(x)
    except Exception as exc:  # the model's own code: never a traceback
        raise ProbeError(f"the model cannot take the probe's inputs of shape "
                         f"{tuple(x.shape[1:])}: {type(exc).__name__}: {exc}") from exc
    if not (isinstance(out, torch.Tensor) and out.is_floating_point()
            and tuple(out.shape) == (1, ckpt.num_classes)):
        what = (f"a tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor)
                else f"a {type(out).__name__}")
        raise CheckpointError(f"the model's output on one input is {what}; a classifier gives "
                              f"one logit per class, shape (1, {ckpt.num_classes})")
