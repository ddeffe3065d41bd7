"""Attribution of the model's errors to layer groups: the replay's metrics, the combination
with Auto-RGN, the flag rule and the bootstrap.

The scan's default metric, the group-alone net reduction, is in :mod:`.alone`; it yields the
same per-image matrix ``r[i, g]`` (over the errors and a sample of correct images), so the
scores, the flag rule and the bootstrap below apply to it unchanged. By default the scores
are combined with Auto-RGN's shares (:func:`combined_scores`, ``--method combined``).

**Counterfactual replay reduction** (``--metric replay_reduction``). The replay
(:mod:`model_audit.core.replay`) moves all parameters from ``theta_0`` by ``D`` along a
beta-scheduled heavy-ball trajectory that reduces
the loss on the misclassified images. For every layer group ``g`` and every misclassified
image ``i`` the tool measures, with a real forward pass, how much of image ``i``'s loss is
removed by applying the group's part of that displacement alone::

    r[i, g] = L_i(theta_0) - L_i(theta_0 + D_g)          (D_g = D on group g, 0 elsewhere)

    reduction_g = mean_i r[i, g]
    score_g     = max(reduction_g, 0) / sum_h max(reduction_h, 0)     (responsibility share)

``score_g`` is the group's share of the error loss that the replay can remove: how much of the
model's mistakes this group is responsible for, in the sense of how much they shrink when it
alone is corrected. It is measured (not a first-order estimate), is invariant to the scale of
the loss, and to first order it reduces to the paper's gradient-on-misclassified-images
criterion (``r ~ -g.D_g``).

**Flag rule** (no threshold tuned per model): a group is flagged when its score exceeds both
its share of the parameters (it is responsible beyond its size) and ``1/G``, an equal share of
the ``G`` groups (it matters among the groups), *or* when it has the highest score (and that
score is above 0). The second clause came from the localize benchmark (``python -m bench
localize``): with the first alone a group that holds most of the parameters (ResNet-18's
layer4: 75%) can never be flagged, even when it ranks first and is the known cause; adding it
raised the share of planted faults whose group is flagged from 48% to 64% (ResNet-18) and
from 49% to 59% (digits) at 0.2 more flagged groups, with the same flags on the unmodified
models.

**Stability.** ``r`` is per image, so a bootstrap over probe samples is cheap: each resample
draws the probe's images with replacement, its misclassified ones re-weight the rows of ``r``,
and the rule is applied again. A group's flag frequency is the fraction of resamples that flag
it; the 2.5-97.5 percentiles of its score are its interval. The replay trajectory itself is
not re-run per resample (that would cost a replay each); the interval reflects which images
are in the probe, not the replay's own variability.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .._progress import progress_bar
from ..core.layers import LayerGroup
from ..io.probe import BatchCache
from ..core.replay import detached_params, per_sample_losses
METRIC_NAME = "replay_reduction"
#: The key of the scan's own score (whatever ranks it) in ``compare``'s correlations; files
#: before 2026-12-07 used METRIC_NAME.
SCORE_KEY = "score"


@dataclass(frozen=True)
class GroupReductions:
    """``r[i, g]``: loss removed from misclassified image ``i`` by moving group ``g`` alone."""

    matrix: torch.Tensor          # (n_misclassified, G)
    base_losses: torch.Tensor     # (n_misclassified,)
    group_names: Tuple[str, ...]
    forward_images: int
    backward_images: int = 0


def group_reductions(model: nn.Module, batches: BatchCache, displacement: Dict[str, torch.Tensor],
                     groups: Sequence[LayerGroup], *, device: str = "cpu",
                     progress: bool = False,
                     base_losses: Optional[torch.Tensor] = None) -> GroupReductions:
    """Per-image loss reduction when each group alone takes its replay displacement.

    ``base_losses`` (the per-image losses at the checkpoint, which the replay's first pass
    computes anyway) saves one forward pass; without it they are computed here.
    """
    theta0 = detached_params(model, device)
    if base_losses is None:
        base, _ = per_sample_losses(model, theta0, batches, device)
        extra = 1
    else:
        base, extra = base_losses, 0
    columns = []
    for group in progress_bar(groups, total=len(groups), desc="attribute", enabled=progress):
        moved = dict(theta0)
        for name in group.parameter_names:
            moved[name] = theta0[name] + displacement[name]
        losses, _ = per_sample_losses(model, moved, batches, device)
        columns.append(base - losses)
    n = len(batches.positions)
    return GroupReductions(torch.stack(columns, 1).double(), base, tuple(g.name for g in groups),
                           n * (len(groups) + extra))


def scores_from_reductions(mean_reduction: np.ndarray) -> np.ndarray:
    """Responsibility shares ``max(r, 0) / sum(max(r, 0))`` (zeros when nothing is reduced)."""
    positive = np.clip(mean_reduction, 0.0, None)
    total = positive.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, positive / np.where(total > 0, total, 1.0), 0.0)


def combined_scores(own: Sequence[float], other: Sequence[float]) -> np.ndarray:
    """Per-group shares ``sqrt(own_g * other_g)``, normalised to sum 1: a group ranks high only
    when both rankings point to it (both are made shares first, so neither scale dominates; a
    missing or negative value counts as 0). Works on one vector or a stack (resamples x G).

    >>> [round(float(v), 3) for v in combined_scores([0.5, 0.5, 0.0], [0.2, 0.8, 0.0])]
    [0.333, 0.667, 0.0]
    """
    a = scores_from_reductions(np.nan_to_num(np.asarray(own, dtype=np.float64), nan=0.0))
    b = scores_from_reductions(np.nan_to_num(np.asarray(other, dtype=np.float64), nan=0.0))
    return scores_from_reductions(np.sqrt(a * b))


def flag_rule(scores: np.ndarray, shares: np.ndarray) -> np.ndarray:
    """Flag groups whose score exceeds both their parameter share and ``1/G``, and the
    top-scoring group (ties: each of them) when its score is above 0.

    Works on one score vector or on a stack of them (the bootstrap's resamples x groups).

    >>> flag_rule(np.array([0.5, 0.3, 0.2]), np.array([0.1, 0.1, 0.8])).tolist()
    [True, False, False]
    >>> flag_rule(np.array([0.1, 0.3, 0.6]), np.array([0.1, 0.1, 0.8])).tolist()
    [False, False, True]
    """
    bound = np.maximum(shares, 1.0 / shares.shape[-1])
    top = (scores >= scores.max(axis=-1, keepdims=True)) & (scores > 0)
    return (scores > bound) | top


@dataclass(frozen=True)
class Attribution:
    """Own-metric scores per group, the flags, and their bootstrap stability."""

    reduction: np.ndarray         # mean loss reduction per group
    scores: np.ndarray            # responsibility share per group
    flagged: np.ndarray           # bool per group
    flag_frequency: np.ndarray    # fraction of bootstrap resamples flagging the group
    score_low: np.ndarray         # 2.5th percentile of the score over resamples
    score_high: np.ndarray        # 97.5th percentile
    resamples: int


def bootstrap_counts(rng: np.random.Generator, n: int) -> np.ndarray:
    """How often each of the ``n`` probe images is drawn in one bootstrap resample."""
    return np.bincount(rng.integers(0, n, size=n), minlength=n)


def net_scores(mean: np.ndarray, mean_errors: Optional[np.ndarray] = None,
               prior: Optional[np.ndarray] = None) -> np.ndarray:
    """Shares of the positive mean reductions; when no group has one and the rows include
    correct images (a net metric), the shares of the errors' rows alone (``mean_errors``:
    every group's correction costs the correct images more than it removes, as on an
    under-trained model, so the net shares would all be 0). With ``prior``, combined with it.

    >>> net_scores(np.array([-1.0, -2.0]), np.array([1.0, 3.0])).tolist()
    [0.25, 0.75]
    """
    use = mean if mean_errors is None or (mean > 0).any() else mean_errors
    return scores_from_reductions(use) if prior is None else combined_scores(use, prior)


def error_rows(rows: Sequence[int], errors: Sequence[int]) -> Optional[np.ndarray]:
    """Which rows of a per-image matrix (their probe positions ``rows``) are misclassified
    images; None when all are (the replay's metric), so there is nothing to fall back to.

    >>> error_rows([1, 4, 7], [1, 7]).tolist(), error_rows([1, 7], [1, 7])
    ([True, False, True], None)
    """
    wrong = set(int(e) for e in errors)
    mask = np.array([int(p) in wrong for p in rows], dtype=bool)
    return None if mask.all() else mask


def metric_shares(r: np.ndarray, error_rows: Optional[Sequence[bool]] = None) -> np.ndarray:
    """The metric's own shares from its per-image reductions ``r`` (rows x groups), without a
    prior: :func:`net_scores` of the mean over all rows and over the errors' rows."""
    if len(r) == 0:
        return np.zeros(r.shape[1] if r.ndim == 2 else 0)
    mask = None if error_rows is None else np.asarray(error_rows, dtype=bool)
    return net_scores(r.mean(axis=0),
                      r[mask].mean(axis=0) if mask is not None and mask.any() else None)


def resampled_scores(r: np.ndarray, positions: np.ndarray, counts: np.ndarray,
                     prior: Optional[np.ndarray] = None,
                     error_rows: Optional[np.ndarray] = None) -> np.ndarray:
    """The scores of one resample: each row of ``r`` (the image at probe position
    ``positions[i]``) weighted by how often that image was drawn (``counts``); all zero when
    none of the rows was drawn. With ``prior`` (a fixed per-group share, Auto-RGN's for
    ``--method combined``) the scores are :func:`combined_scores` of the two; ``error_rows``
    (which rows are misclassified images, for a net metric): see :func:`net_scores`.

    >>> r = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> resampled_scores(r, np.array([0, 2]), np.array([3, 0, 1])).tolist()
    [0.75, 0.25]
    """
    w = counts[positions].astype(np.float64)
    total = w.sum()
    mean = (w @ r) / total if total > 0 else np.zeros(r.shape[1])
    mean_errors = None
    if error_rows is not None:
        we = w * error_rows
        mean_errors = (we @ r) / we.sum() if we.sum() > 0 else np.zeros(r.shape[1])
    return net_scores(mean, mean_errors, prior)


def attribute(reductions: GroupReductions, shares: Sequence[float], *, probe_size: int,
              misclassified_positions: Sequence[int], resamples: int = 200,
              seed: int = 0, prior: Optional[Sequence[float]] = None,
              error_rows: Optional[Sequence[bool]] = None) -> Attribution:
    """Scores, flags and bootstrap flag frequencies from the per-image reductions.

    Args:
        reductions: output of :func:`group_reductions`.
        shares: parameter share of each group (same order).
        probe_size: number of probe images the bootstrap resamples.
        misclassified_positions: probe positions of the rows of ``reductions.matrix``.
        resamples: bootstrap resamples (0 disables the bootstrap).
        seed: seed of the resampling.
        prior: a fixed share per group to combine the metric with (:func:`combined_scores`;
            Auto-RGN's for ``--method combined``). It is held fixed in the resamples: the
            interval and flag frequency reflect which images are in the probe through ``r``.
        error_rows: for a net metric, which rows are misclassified images (:func:`net_scores`).
    """
    r = reductions.matrix.numpy()
    share = np.asarray(shares, dtype=np.float64)
    fixed = None if prior is None else np.asarray(prior, dtype=np.float64)
    mask = None if error_rows is None else np.asarray(error_rows, dtype=bool)
    mean = r.mean(axis=0) if len(r) else np.zeros(len(share))
    scores = net_scores(mean, r[mask].mean(axis=0) if mask is not None and mask.any() else None,
                        fixed)
    flagged = flag_rule(scores, share) if len(r) else np.zeros(len(share), dtype=bool)
    if resamples <= 0 or len(r) == 0:
        return Attribution(mean, scores, flagged, flagged.astype(float), scores, scores, 0)
    rng = np.random.default_rng(seed)
    positions = np.asarray(misclassified_positions)
    boot_scores = np.empty((resamples, len(share)))
    for b in range(resamples):
        boot_scores[b] = resampled_scores(r, positions, bootstrap_counts(rng, probe_size), fixed,
                                          mask)
    freq = flag_rule(boot_scores, share).mean(axis=0)
    low, high = np.percentile(boot_scores, [2.5, 97.5], axis=0)
    return Attribution(mean, scores, flagged, freq, low, high, resamples)


# ------------------------------------------------------------------------------------------
# Net reduction: the candidate metric judged by ``python -m bench localize``

#: Scales of a group's replay displacement that :func:`group_net_reductions` tries.
NET_SCALES: Tuple[float, ...] = (1.0, 4.0, 16.0, 64.0)
#: Correctly classified images per misclassified one in the net reduction's image set.
NET_CORRECT_PER_ERROR = 2
NET_METRIC_NAME = "net_reduction"


def net_positions(n_probe: int, errors: Sequence[int], seed: int,
                  correct_per_error: int = NET_CORRECT_PER_ERROR) -> List[int]:
    """The errors and a seeded sample of ``correct_per_error`` times as many correct images."""
    wrong = set(int(e) for e in errors)
    right = np.array([i for i in range(n_probe) if i not in wrong], dtype=np.int64)
    take = min(len(right), correct_per_error * len(wrong))
    rng = np.random.default_rng(seed + 65537)
    chosen = rng.choice(right, size=take, replace=False).tolist() if take else []
    return sorted(list(wrong) + chosen)


def group_net_reductions(model: nn.Module, batches: BatchCache,
                         displacement: Dict[str, torch.Tensor], groups: Sequence[LayerGroup], *,
                         scales: Sequence[float] = NET_SCALES, device: str = "cpu",
                         progress: bool = False) -> Tuple[GroupReductions, np.ndarray]:
    """Loss removed from errors *and* correct images when each group alone is corrected.

    ``batches`` holds the misclassified images and a sample of correct ones
    (:func:`net_positions`). For each group ``g`` the replay displacement ``D_g`` is applied
    alone at each scale ``c`` of ``scales``; the scale with the largest mean reduction of the
    loss over the whole image set is kept, and ``r[i, g] = L_i(theta_0) - L_i(theta_0 + c D_g)``
    at that scale. So a group is credited for what its own correction removes from the
    model's loss overall: fitting the errors at the expense of the correct images does not
    count, and each group gets its own step length (no bias from one shared learning rate).

    Returns:
        The reductions (rows follow ``batches.positions``) and the mean reduction of every
        group at every scale (G x len(scales); the chosen scale is its row's argmax).
    """
    theta0 = detached_params(model, device)
    base, _ = per_sample_losses(model, theta0, batches, device)
    columns = []
    means = np.full((len(groups), len(scales)), np.nan)
    for j, group in enumerate(progress_bar(groups, total=len(groups), desc="attribute (net)",
                                           enabled=progress)):
        best: Optional[Tuple[float, torch.Tensor]] = None
        for k, c in enumerate(scales):
            moved = dict(theta0)
            for name in group.parameter_names:
                moved[name] = theta0[name] + c * displacement[name]
            losses, _ = per_sample_losses(model, moved, batches, device)
            r = base - losses
            mean = float(r.mean())
            if not math.isfinite(mean):
                continue
            means[j, k] = mean
            if best is None or mean > best[0]:
                best = (mean, r)
        columns.append(torch.zeros_like(base) if best is None else best[1])
    n = len(batches.positions)
    return (GroupReductions(torch.stack(columns, 1).double(), base,
                            tuple(g.name for g in groups), n * (1 + len(groups) * len(scales))),
            means)
