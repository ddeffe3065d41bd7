"""Single-pass layer baselines: captum's ``LayerGradientXActivation`` and ``LayerActivation``.

Both take every group's layer in one pass per batch (``grad_x_activation``: one forward and one
backward, ``activation``: one forward) and give, per image, the sum of ``|attribution|`` over
the layer's output (:func:`~model_audit.baselines._utils._abs_sum`). ``grad_x_activation``
attributes the true-class logit; ``activation`` has no target (the magnitude of the output).

Every function here has the signature of a layer method in the registry
(:data:`model_audit.baselines.BASELINES`): ``(forward, layers, x, y, n_steps,
internal_batch_size) -> {group index: per-image sums}``; these two ignore the last two.
"""
from __future__ import annotations

from typing import Callable, Dict

import captum.attr as ca
import torch
from torch import nn

from ._utils import _abs_sum
from .registry import register_baseline


@register_baseline("grad_x_activation", "Gradient x Activation", cheap=True, uses_steps=False,
                   captum_class="LayerGradientXActivation",
                   description="gradient of the true-class logit w.r.t. the group's output, "
                               "times that output")
def grad_x_activation_totals(forward: Callable[..., torch.Tensor], layers: Dict[int, nn.Module],
                             x: torch.Tensor, y: torch.Tensor, n_steps: int,
                             internal_batch_size: int) -> Dict[int, torch.Tensor]:
    """Per-image |gradient x activation| sums of one batch, for each group with a layer."""
    idx = list(layers)
    attrs = ca.LayerGradientXActivation(forward, [layers[i] for i in idx]).attribute(x, target=y)
    return {i: _abs_sum(a) for i, a in zip(idx, attrs)}


@register_baseline("activation", "Activation", cheap=True, uses_steps=False,
                   captum_class="LayerActivation",
                   description="magnitude of the group's output (no target)")
def activation_totals(forward: Callable[..., torch.Tensor], layers: Dict[int, nn.Module],
                      x: torch.Tensor, y: torch.Tensor, n_steps: int,
                      internal_batch_size: int) -> Dict[int, torch.Tensor]:
    """Per-image |activation| sums of one batch, for each group with a layer (no target)."""
    idx = list(layers)
    attrs = ca.LayerActivation(forward, [layers[i] for i in idx]).attribute(x)
    return {i: _abs_sum(a) for i, a in zip(idx, attrs)}
