"""Regression bisection between two releases of one architecture: which group's change
caused the new errors? Measured exactly, not estimated.

When a release (the candidate) is checked against the previous one (the baseline) and both
load into the same architecture, the groups can be swapped: put one group's tensors of the
baseline (parameters and buffers, BatchNorm statistics included) into the candidate and
evaluate. On the probe:

* the **regression set**: the images the baseline gets right and the candidate gets wrong;
* the **new fixes**: the images the candidate gets right and the baseline wrong;
* for each group, the regression images that are right again with the baseline's tensors of
  that group (``recovered``), and the new fixes that are lost (``lost_fixes``).

That is one forward pass per group over the regression and fix sets only (and per pair of
groups, when no single group recovers most of the regression). The counts are exact for these
two checkpoints on this probe: no sampling and no approximation. The interactions between
groups are what the pairs show: a regression that needs two groups back shows in no single
one.

Examples:
    >>> regression = bisect(baseline_model, candidate_model, groups, probe)  # doctest: +SKIP
    >>> regression.best.groups, regression.best.recovered, regression.regressed  # doctest: +SKIP
"""
from __future__ import annotations

import copy
import itertools
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..core.evaluate import evaluate
from ..core.layers import LayerGroup
from ..errors import AuditError
from ..io.probe import ProbeSet
from ..results.compare import Regression, Swap

#: Pairs of groups are measured when no single group recovers more than this share of the
#: regression, among this many groups that recover the most alone.
PAIRS_BELOW, PAIR_CANDIDATES = 0.5, 6


class BisectError(AuditError):
    """The two checkpoints cannot be bisected (not the same architecture)."""


def check_swappable(baseline: nn.Module, candidate: nn.Module) -> None:
    """BisectError unless the two models have the same state-dict keys, shapes and dtypes."""
    a, b = baseline.state_dict(), candidate.state_dict()
    if set(a) != set(b):
        only = sorted(set(a) ^ set(b))
        raise BisectError(
            f"the two checkpoints do not share an architecture ({len(only)} tensor(s) only in "
            f"one of them, e.g. {only[0]}): regression bisection swaps tensors between them; "
            "compare releases of one architecture, or pass --allow-partial to skip it")
    for k in a:
        if a[k].shape != b[k].shape or a[k].dtype != b[k].dtype:
            raise BisectError(
                f"the two checkpoints do not share an architecture: {k} is "
                f"{tuple(a[k].shape)} {a[k].dtype} in the baseline and {tuple(b[k].shape)} "
                f"{b[k].dtype} in the candidate; compare releases of one architecture, or "
                "pass --allow-partial to skip the bisection")


def _tensors(groups: Sequence[LayerGroup], names: Sequence[str]) -> List[str]:
    return [t for g in groups if g.name in names for t in g.parameter_names + g.buffer_names]


@torch.no_grad()
def bisect(baseline: nn.Module, candidate: nn.Module, groups: Sequence[LayerGroup],
           probe: ProbeSet, *, device: str = "cpu", batch_size: int = 256,
           predictions: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> Regression:
    """Swap each group of ``candidate`` back to ``baseline``'s tensors; count what it recovers.

    Args:
        baseline, candidate: the two releases (same architecture; neither is modified).
        groups: the layer groups (of the candidate; the baseline has the same tensors).
        probe: the images both are judged on.
        predictions: the two models' predictions on ``probe`` when already known (from their
            scans), else they are evaluated.

    Raises:
        BisectError: the models do not have the same tensors.
    """
    check_swappable(baseline, candidate)
    if predictions is None:
        predictions = tuple(evaluate(m, probe, device=device, batch_size=batch_size).predictions
                            for m in (baseline, candidate))
    labels = probe.labels
    right_a, right_b = predictions[0] == labels, predictions[1] == labels
    regressed = torch.nonzero(right_a & ~right_b).flatten().tolist()
    fixes = torch.nonzero(~right_a & right_b).flatten().tolist()
    if not regressed:
        return Regression(len(probe), 0, len(fixes), ())
    subset = probe.subset(regressed + fixes)
    work = copy.deepcopy(candidate).to(device).eval()
    state, base = work.state_dict(), baseline.state_dict()
    own = {k: v.detach().clone() for k, v in state.items()}

    def swap(names: Tuple[str, ...]) -> Swap:
        keys = _tensors(groups, names)
        for k in keys:
            state[k].copy_(base[k])
        right = evaluate(work, subset, device=device, batch_size=batch_size).predictions \
            == subset.labels
        for k in keys:
            state[k].copy_(own[k])
        n = len(regressed)
        return Swap(names, int(right[:n].sum()), int((~right[n:]).sum()))

    singles = sorted((swap((g.name,)) for g in groups),
                     key=lambda s: (-s.recovered, s.lost_fixes))
    pairs: Tuple[Swap, ...] = ()
    if singles[0].recovered <= PAIRS_BELOW * len(regressed):
        order = {g.name: i for i, g in enumerate(groups)}
        top = sorted((s.groups[0] for s in singles[:PAIR_CANDIDATES]), key=order.get)
        pairs = tuple(sorted((swap(pair) for pair in itertools.combinations(top, 2)),
                             key=lambda s: (-s.recovered, s.lost_fixes)))
    return Regression(len(probe), len(regressed), len(fixes), tuple(singles), pairs)
