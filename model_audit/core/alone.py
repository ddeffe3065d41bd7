"""Group-alone net reduction: how much of the model's error loss one layer group can remove on
its own, net of what that costs the images the model gets right. The default metric.

For every layer group ``g`` the tool takes ``ALONE_STEPS`` gradient steps of that group alone
on the mean cross-entropy of the misclassified probe images; every other parameter stays at
the checkpoint's ``theta_0``. Each group gets its own step length, from an Armijo search that
starts at a step of ``ALONE_RELATIVE`` times the group's weight norm (so it adapts to the scale
of the loss and of the group, with at most ``ALONE_HALVINGS`` trials per step). Then, per
image ``i`` of the errors and a seeded sample of twice as many correct images
(:func:`~model_audit.core.attribution.net_positions`), with a real forward pass::

    r[i, g] = L_i(theta_0) - L_i(theta_g)         (theta_g: group g alone after its steps)

    score_g = max(mean_i r[i, g], 0) / sum_h max(mean_i r[i, h], 0)

Why: the replay's shared displacement moves all groups with one learning rate, so a group
that holds 0.01% of the parameters (a BatchNorm layer, a stem convolution) gets a tiny step
whatever its responsibility; here every group is asked on its own how much of the error it
can remove, and the correct images keep a group that merely overfits the errors from scoring
high. It is measured per image (so the scan's bootstrap applies unchanged), it is a share
(scale-free), and it needs no learning rate from the user.

Measured (``python -m bench localize``, bench/RESULTS.md section 2): alone it localises
planted faults best on the digits sample; ranked together with Auto-RGN (the scan's default
``--method combined``) it is the best ranking on the reference ResNet-18s.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.func import functional_call

from .._progress import progress_bar
from ..io.probe import BatchCache
from .attribution import GroupReductions
from .layers import LayerGroup
from .replay import detached_params, per_sample_losses, summed_gradients

ALONE_METRIC_NAME = "alone_net"

#: Gradient steps per group; the first step's length relative to the group's weight norm;
#: the most halvings the Armijo search tries per step; its sufficient-decrease constant.
ALONE_STEPS, ALONE_RELATIVE, ALONE_HALVINGS, ALONE_ARMIJO = 3, 0.1, 12, 0.5


def alone_step(model: nn.Module, theta: Dict[str, torch.Tensor], names: Sequence[str],
               batches: BatchCache, device: str, lr: Optional[float]
               ) -> Tuple[Dict[str, torch.Tensor], Optional[float]]:
    """One gradient step of the ``names`` tensors on the mean loss over ``batches``.

    Its length comes from an Armijo search: from ``lr`` (the last accepted one), or for the
    first step from ``ALONE_RELATIVE`` times the tensors' norm over the gradient's, halved
    until the loss falls by at least ``ALONE_ARMIJO`` of the first-order prediction. Returns
    ``theta`` unchanged (and ``lr``) when the gradient is zero or no trial passes.
    """
    work = {k: (v.detach().clone().requires_grad_(True) if k in names else v)
            for k, v in theta.items()}
    with torch.enable_grad():
        grads, total, n = summed_gradients(
            lambda x: functional_call(model, work, (x,), strict=False),
            {k: work[k] for k in names}, batches, device, all_reduce=batches.sharded)
    n = max(n, 1)
    loss = total / n
    g2 = sum(float((grads[k] / n).double().pow(2).sum()) for k in names)
    if not (math.isfinite(g2) and g2 > 0):
        return theta, lr
    if lr is None:
        w = math.sqrt(sum(float(theta[k].double().pow(2).sum()) for k in names)) or 1.0
        lr = ALONE_RELATIVE * w / math.sqrt(g2)
    for _ in range(ALONE_HALVINGS):
        moved = dict(theta)
        for k in names:
            moved[k] = theta[k] - lr * grads[k] / n
        new = float(per_sample_losses(model, moved, batches, device)[0].mean())
        if math.isfinite(new) and new <= loss - ALONE_ARMIJO * lr * g2:
            return moved, lr
        lr *= 0.5
    return theta, lr


def group_alone_reductions(model: nn.Module, errors: BatchCache, rows: BatchCache,
                           groups: Sequence[LayerGroup], *, device: str = "cpu",
                           steps: int = ALONE_STEPS, progress: bool = False) -> GroupReductions:
    """``r[i, g]`` on the images of ``rows`` (the errors and a sample of correct images) after
    group ``g`` alone took ``steps`` gradient steps on the images of ``errors``.

    The model's own parameters and buffers are not written (the steps work on copies through
    ``functional_call``) and it stays in eval mode.
    """
    theta0 = detached_params(model, device)
    base, _ = per_sample_losses(model, theta0, rows, device)
    columns, trials = [], 0
    for group in progress_bar(groups, total=len(groups), desc="attribute (alone)",
                              enabled=progress):
        names = [k for k in group.parameter_names if theta0[k].is_floating_point()]
        theta, lr = theta0, None
        for _ in range(steps if names else 0):
            theta, lr = alone_step(model, theta, names, errors, device, lr)
            trials += 1
        losses, _ = per_sample_losses(model, theta, rows, device)
        columns.append(base - losses)
    n_rows, n_err = len(rows.positions), len(errors.positions)
    # forward images: the rows at theta_0 and per group; per step one pass with its gradient
    # and at least one trial (the count is a floor: halvings add trials)
    return GroupReductions(torch.stack(columns, 1).double(), base, tuple(g.name for g in groups),
                           n_rows * (1 + len(groups)) + 2 * n_err * trials, n_err * trials)
