"""Evaluate a model on a probe set: predictions, per-sample loss, accuracy, the errors.

Example:
    >>> result = evaluate(ckpt.model, probe, device="cpu")  # doctest: +SKIP
    >>> result.accuracy, len(result.misclassified)  # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ._progress import progress_bar
from .probe import ProbeSet


@dataclass(frozen=True)
class EvaluationResult:
    """Per-sample predictions of a model on a probe set (positions index the probe)."""

    labels: torch.Tensor
    predictions: torch.Tensor
    confidences: torch.Tensor
    losses: torch.Tensor
    classes: Tuple[str, ...]

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


@torch.no_grad()
def evaluate(model: nn.Module, probe: ProbeSet, *, device: str = "cpu", batch_size: int = 256,
             progress: bool = False) -> EvaluationResult:
    """Run ``model`` (in eval mode, restored afterwards) over every probe image.

    Returns:
        Predictions, softmax confidence of the prediction and cross-entropy per image.
    """
    was_training = model.training
    model.eval()
    preds, confs, losses = [], [], []
    try:
        batches = probe.batches(batch_size)
        total = (len(probe) + batch_size - 1) // batch_size
        for _, x, y in progress_bar(batches, total=total, desc="evaluate", enabled=progress):
            logits = model(x.to(device)).float()
            y = y.to(device)
            prob = logits.softmax(1)
            conf, pred = prob.max(1)
            preds.append(pred.cpu())
            confs.append(conf.cpu())
            losses.append(F.cross_entropy(logits, y, reduction="none").cpu())
    finally:
        model.train(was_training)
    return EvaluationResult(probe.labels.clone(), torch.cat(preds), torch.cat(confs),
                            torch.cat(losses), probe.classes)
