"""Evaluate a model on a probe set: predictions, per-sample loss, accuracy, the errors.

Examples:
    >>> result = evaluate(ckpt.model, probe, device="cpu")  # doctest: +SKIP
    >>> result.accuracy, len(result.misclassified)  # doctest: +SKIP
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from .._progress import progress_bar
from ..environment import channels_last_requested
from ..errors import ProbeError
from ..io.probe import ProbeSet


def _inputs_channels_last(module: nn.Module, args: Tuple[Any, ...]) -> Tuple[Any, ...]:
    return tuple(a.contiguous(memory_format=torch.channels_last)
                 if isinstance(a, torch.Tensor) and a.dim() == 4 else a for a in args)


def onednn_6035_convolutions(model: nn.Module) -> List[str]:
    """The model's convolutions on the path of oneDNN issue #6035, which channels-last must
    not take: a 1x1 convolution with a stride above 1 and fewer than 16 input channels (16 is
    oneDNN's AVX-512 input-channel block; AVX2's is 8). In the NHWC layout oneDNN's backward
    pass for its weights writes past a workspace: with torch 2.14.1 it crashed the process
    (``torch.nn.Conv2d(3, 64, 1, 2)`` on 6 images of 224x224, one thread, every time) and,
    as reported in that issue, can return wrong gradients without crashing."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1) \
                and max(m.stride) > 1 and m.in_channels // m.groups < 16:
            out.append(name)
    return out


@contextmanager
def fast_layout(model: nn.Module, device: str) -> Iterator[None]:
    """Opt-in (``MODEL_AUDIT_CHANNELS_LAST=1``): run ``model`` in the channels-last memory
    format inside the block, on the CPU.

    The 4-d parameters (convolution kernels) and 4-d inputs are laid out channels-last, which
    oneDNN's convolutions run faster (about 10% on a forward pass of the reference ResNet-18,
    ``bench/RESULTS.md``); the values agree with the contiguous layout within float32
    rounding, not bit for bit. On exit the parameters are contiguous again (with their
    current values: a block that trains them keeps what it learned). Nothing changes on
    CUDA, for models without 4-d parameters, or for a model with a convolution on the path
    of oneDNN issue #6035 (:func:`onednn_6035_convolutions`).

    It is off by default because oneDNN's channels-last kernels have a known memory-safety
    bug: the backward pass of timm's ``repvgg_a2`` (a 1x1, stride-2 convolution over the 3
    input channels) corrupted the heap or crashed the process every time (torch 2.14.1), and
    a corruption that does not crash could change numbers silently.
    """
    enabled = device == "cpu" and channels_last_requested()
    params = [p for p in model.parameters() if p.dim() == 4 and p.is_contiguous()] \
        if enabled and not onednn_6035_convolutions(model) else []
    if not params:
        yield
        return
    for p in params:
        p.data = p.data.contiguous(memory_format=torch.channels_last)
    handle = model.register_forward_pre_hook(_inputs_channels_last)
    try:
        yield
    finally:
        handle.remove()
        for p in params:
            p.data = p.data.contiguous()


@dataclass(frozen=True)
class EvaluationResult:
    """Per-sample predictions of a model on a probe set (positions index the probe)."""

    labels: torch.Tensor
    predictions: torch.Tensor
    confidences: torch.Tensor
    losses: torch.Tensor
    classes: Tuple[str, ...]
    logits: Optional[torch.Tensor] = None   # (n, classes) float32, with keep_logits=True

    @property
    def n(self) -> int:
        return int(self.labels.numel())

    @property
    def correct(self) -> int:
        return int((self.predictions == self.labels).sum())

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    @property
    def misclassified(self) -> List[int]:
        return torch.nonzero(self.predictions != self.labels).flatten().tolist()

    def per_class_accuracy(self) -> Dict[str, Optional[float]]:
        out: Dict[str, Optional[float]] = {}
        for c, name in enumerate(self.classes):
            mask = self.labels == c
            total = int(mask.sum())
            out[name] = (int((self.predictions[mask] == c).sum()) / total) if total else None
        return out

    def to_dict(self) -> Dict[str, Any]:
        return {"n": self.n, "correct": self.correct, "accuracy": self.accuracy,
                "misclassified": len(self.misclassified),
                "mean_loss": float(self.losses.mean()) if self.n else None,
                "per_class_accuracy": self.per_class_accuracy()}


def _logits(model: nn.Module, x: torch.Tensor, probe: ProbeSet) -> torch.Tensor:
    """The model's logits for ``x``; a ProbeError when the model cannot take such images (too
    small for its downsampling, or the wrong number of channels), or such non-image inputs
    (another shape or dtype, token ids beyond its vocabulary)."""
    try:
        out = model(x)
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, IndexError, TypeError, ValueError) as exc:
        size = "x".join(str(d) for d in x.shape[1:])
        if not probe.is_image:
            dtype = str(x.dtype).replace("torch.", "")
            why = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise ProbeError(
                f"the model cannot run on the probe's inputs (shape {size or 'scalar'}, "
                f"{dtype}): {why}; give inputs of the shape and type the model takes (float "
                "rows for one that starts with a Linear layer, token ids below its vocabulary "
                "size for an Embedding)") from exc
        if not isinstance(exc, RuntimeError):
            raise
        raise ProbeError(
            f"the model cannot run on the probe's images ({size}): {str(exc).splitlines()[0]}; "
            "give --resize N (e.g. the size it was trained at)") from exc
    return out.float()


@torch.no_grad()
def evaluate(model: nn.Module, probe: ProbeSet, *, device: str = "cpu", batch_size: int = 256,
             progress: bool = False, keep_logits: bool = False) -> EvaluationResult:
    """Run ``model`` (in eval mode, restored afterwards) over every probe image.

    In a distributed run (:mod:`model_audit.distributed`) each rank evaluates its contiguous
    block of the probe and the results are gathered: every rank returns the whole result.

    Returns:
        Predictions, softmax confidence of the prediction and cross-entropy per image (and
        the logits, with ``keep_logits``: ``fix``'s preservation term compares with them).
    """
    was_training = model.training
    model.eval()
    mine = distributed.block(len(probe))
    preds = [torch.empty(0, dtype=torch.long)]
    confs, losses = [torch.empty(0)], [torch.empty(0)]
    kept: List[torch.Tensor] = []
    try:
        with distributed.agree():
            batches = probe.batches(batch_size, mine)
            total = (len(mine) + batch_size - 1) // batch_size
            for _, x, y in progress_bar(batches, total=total, desc="evaluate",
                                        enabled=progress):
                logits = _logits(model, x.to(device), probe)
                y = y.to(device)
                prob = logits.softmax(1)
                conf, pred = prob.max(1)
                preds.append(pred.cpu())
                confs.append(conf.cpu())
                losses.append(F.cross_entropy(logits, y, reduction="none").cpu())
                if keep_logits:
                    kept.append(logits.cpu())
    finally:
        model.train(was_training)
    n = len(probe)
    logits_all = None
    if keep_logits:
        width = kept[0].shape[1] if kept else len(probe.classes)
        logits_all = distributed.gather_rows(torch.cat([torch.empty(0, width)] + kept), n)
    return EvaluationResult(probe.labels.clone(),
                            distributed.gather_rows(torch.cat(preds), n),
                            distributed.gather_rows(torch.cat(confs), n),
                            distributed.gather_rows(torch.cat(losses), n), probe.classes,
                            logits_all)
