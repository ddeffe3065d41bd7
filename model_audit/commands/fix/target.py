"""Targeted repair: one named confusion (images of class TRUE predicted as PRED) repaired while
the rest of the model's behaviour is kept (step 1 of :mod:`model_audit.commands.fix` with
``--target``).

``--target TRUE:PRED`` names the confusion by class names or indices (repeatable: several
confusions are repaired together); ``--target auto`` picks the largest off-diagonal count of
the repair data's confusion matrix. Its instances in the repair data are what the repair
trains on (a share of every batch) and the probe's are what it is judged on: the repair rate
(the share of the probe's instances classified correctly after) and the break rate (the share
of the probe images right before that are wrong after).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from ...core.evaluate import EvaluationResult
from ...errors import ConfigError
from ...results.repair import Target

AUTO = "auto"


def _class_index(text: str, classes: Sequence[str], spec: str) -> int:
    text = text.strip()
    if text in classes:
        return list(classes).index(text)
    if text.isdigit() and int(text) < len(classes):
        return int(text)
    raise ConfigError(f"--target {spec}: {text!r} is not a class of the repair data; the "
                      f"classes are {', '.join(classes)} (or their indices 0-{len(classes) - 1})")


def confusion_counts(ev: EvaluationResult, n_classes: int) -> torch.Tensor:
    """The confusion matrix (rows: true class, columns: prediction) of an evaluation."""
    flat = ev.labels.long() * n_classes + ev.predictions.long()
    return torch.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def largest_confusions(counts: torch.Tensor, classes: Sequence[str], k: int = 3
                       ) -> List[Tuple[int, int, int]]:
    """The ``k`` largest off-diagonal cells: (count, true, predicted), largest first (ties:
    the lower class indices first)."""
    off = counts.clone()
    off.fill_diagonal_(0)
    cells = [(int(off[t, p]), t, p) for t in range(len(classes)) for p in range(len(classes))
             if off[t, p] > 0]
    return sorted(cells, key=lambda c: (-c[0], c[1], c[2]))[:k]


def _describe(cells: List[Tuple[int, int, int]], classes: Sequence[str]) -> str:
    return ", ".join(f"{classes[t]}:{classes[p]} ({n})" for n, t, p in cells) or "none"


def parse_target(specs: Sequence[str], classes: Sequence[str]
                 ) -> Optional[List[Tuple[str, int, int]]]:
    """The named confusions of the ``--target`` values as (spec, true, predicted), ``[]`` for
    ``auto``, None when none is given: everything that can be checked before the model has
    seen the repair data.

    Raises:
        ConfigError: an unknown class (listing the valid ones), TRUE equal to PRED, a value
            that is not TRUE:PRED, or ``auto`` mixed with named confusions.
    """
    specs = [s.strip() for s in specs if s and s.strip()]
    if not specs:
        return None
    if AUTO in specs:
        if len(specs) > 1:
            raise ConfigError("--target auto picks one confusion: give it alone, or name the "
                              "confusions as TRUE:PRED")
        return []
    named: List[Tuple[str, int, int]] = []
    for spec in specs:
        if spec.count(":") != 1:
            raise ConfigError(f"--target {spec}: give TRUE:PRED (class names or indices, e.g. "
                              "cat:dog or 3:5) or auto")
        true, pred = (_class_index(part, classes, spec) for part in spec.split(":"))
        if true == pred:
            raise ConfigError(f"--target {spec}: the true and the predicted class are the same; "
                              "a confusion is an image of one class predicted as another")
        if all((t, p) != (true, pred) for _, t, p in named):
            named.append((spec, true, pred))
    return named


def resolve_target(specs: Sequence[str], classes: Sequence[str], repair: EvaluationResult
                   ) -> Optional[Target]:
    """The :class:`Target` of the ``--target`` values (None when none is given).

    Raises:
        ConfigError: the errors of :func:`parse_target`, ``auto`` on a repair set without
            errors, or a confusion with fewer than 2 instances in the repair data (one to
            train on, one to validate; the largest confusions are listed).
    """
    named = parse_target(specs, classes)
    if named is None:
        return None
    counts = confusion_counts(repair, len(classes))
    if not named:
        top = largest_confusions(counts, classes, 1)
        if not top:
            raise ConfigError("--target auto: the model makes no errors on the repair data, "
                              "so there is no confusion to repair")
        return Target(((top[0][1], top[0][2]),), auto=True)
    for spec, true, pred in named:
        if int(counts[true, pred]) < 2:
            raise ConfigError(
                f"--target {spec}: the repair data holds {int(counts[true, pred])} image(s) of "
                f"{classes[true]} predicted as {classes[pred]}; a targeted repair needs at "
                "least 2 (one to train on, one to validate). The largest confusions in the "
                f"repair data: {_describe(largest_confusions(counts, classes), classes)}")
    return Target(tuple((t, p) for _, t, p in named))


