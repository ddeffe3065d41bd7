"""A model already in memory (an ``nn.Module``) as a :class:`LoadedCheckpoint`.

The tool works on a float32 CPU copy in eval mode: the caller's module is never modified (its
weights, buffers, mode and device stay as they were). Its layer groups come from the module
itself, as for a factory; its number of classes from its classifier head (the last ``Linear``,
else the last ``Conv2d``); its ``sha256`` from its tensors' bytes, so that a ``sanity.json``
measured on these weights is recognised as theirs.

Examples:
    >>> from model_audit.models.tiny import TinyResNet
    >>> ckpt = loaded_from_module(TinyResNet(10))
    >>> ckpt.arch, ckpt.num_classes, ckpt.path
    ('module:model_audit.models.tiny.TinyResNet', 10, '<in-memory TinyResNet>')
"""
from __future__ import annotations

import copy
import hashlib
from typing import Optional, Sequence

import torch
from torch import nn

from ..errors import ArchitectureError, ConfigError
from .loaded import LoadedCheckpoint
from .registry import head_name, input_channels


def state_sha256(model: nn.Module) -> str:
    """A digest of the module's state dict: names, dtypes, shapes and bytes, in key order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _num_classes(model: nn.Module) -> int:
    try:
        head = dict(model.named_modules())[head_name(model)]
    except ArchitectureError as exc:
        raise ConfigError(f"the module has no Linear or Conv2d layer to read its number of "
                          f"classes from ({exc}); give a classifier whose output is one logit "
                          "per class") from exc
    return int(head.out_features if isinstance(head, nn.Linear) else head.out_channels)


def loaded_from_module(module: nn.Module, *, classes: Optional[Sequence[str]] = None,
                       normalize: Optional[str] = None) -> LoadedCheckpoint:
    """The module as the tool's loaded checkpoint (a copy: the module is never modified).

    Args:
        classes: class names, when the model knows them (else the probe's are used).
        normalize: the normalisation a probe opened from a path gets (``cifar10``,
            ``imagenet``, ``MEAN,STD``); an in-memory dataset brings its own.
    """
    if not isinstance(module, nn.Module):
        raise ConfigError(f"expected a torch.nn.Module, got {type(module).__name__}")
    model = copy.deepcopy(module).cpu().float().eval()
    name = type(module)
    state = model.state_dict()
    nonfinite = tuple(k for k, v in state.items()
                      if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    return LoadedCheckpoint(
        model=model, arch=f"module:{name.__module__}.{name.__qualname__}",
        num_classes=_num_classes(model), in_channels=input_channels(model),
        path=f"<in-memory {name.__name__}>", sha256=state_sha256(model),
        parameters=sum(p.numel() for p in model.parameters()),
        source_dtypes=tuple(sorted({str(v.dtype).replace("torch.", "") for v in
                                    module.state_dict().values() if v.is_floating_point()})),
        normalize=normalize, classes=tuple(classes) if classes is not None else None,
        nonfinite=nonfinite, in_memory=True)
