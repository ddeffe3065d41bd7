"""Auto-RGN: the relative gradient norm of each group's parameters (no captum, no layer output).

The relative-gradient-norm selector of surgical fine-tuning (Lee et al., "Surgical Fine-Tuning
Improves Adaptation to Distribution Shifts", ICLR 2023) ranks layers by ``||g|| / ||w||``, the
norm of the loss gradient relative to the norm of the weights. Here the loss is the mean
cross-entropy of the misclassified images at the checkpoint's weights (eval mode, the loss the
replay descends), and a group's value is::

    rgn_G = ||g_G||_2 / ||w_G||_2      (g_G, w_G: all of the group's parameters as one vector)

rather than the RMS of the per-tensor ratios ``|g_t| / |w_t|``. Reasons: (1) it is the paper's
RGN with the group as the layer, which is the unit the tool attributes to; (2) it does not
depend on how a module splits its parameters into tensors; (3) it is robust: biases and
normalisation shifts often have norms near zero (they start at zero), so their per-tensor
ratios explode and would dominate a plain RMS. Indeed ``rgn_G**2 = sum_t (||w_t||^2 /
||w_G||^2) * (||g_t|| / ||w_t||)^2``: it *is* the RMS of the per-tensor ratios, weighted by each
tensor's share of the group's squared weight norm. A group whose weights are all zero gets
``NaN`` (the ratio is undefined). The values are normalised to shares like the others.

Auto-RGN needs no layer output, so it runs on the model as it is (before the layer methods'
preparation wraps the group modules) and gives a value to every group, bare parameters
included.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .._progress import progress_bar
from ..core.layers import LayerGroup
from ..core.replay import summed_gradients
from ._utils import _Counter, _len
from .registry import register_baseline


@register_baseline("auto_rgn", "Auto-RGN", cheap=True, uses_steps=False, captum_class=None,
                   description="relative gradient norm ||g||/||w|| of the misclassified images' "
                               "loss per group (surgical fine-tuning, Lee et al. 2023)")
def _auto_rgn(net: nn.Module, groups: Sequence[LayerGroup], batches: Iterable, device: str,
              counter: _Counter, n: int, progress: bool,
              grad_sq: Optional[Dict[str, float]] = None) -> np.ndarray:
    """``||g_G|| / ||w_G||`` of the mean cross-entropy on the misclassified images, per group.

    ``grad_sq`` (per parameter, the squared norm of that mean gradient, as the replay's first
    step computes it: :attr:`~model_audit.core.replay.ReplayResult.initial_grad_sq`) saves the
    forward and backward pass.
    """
    params = dict(net.named_parameters())
    if grad_sq is not None:
        return _relative_norms(groups, params, grad_sq)
    for p in params.values():
        p.requires_grad_(True)
    with torch.enable_grad():  # a sharded cache's sums are added over the ranks
        grads, _, images = summed_gradients(
            net, params, progress_bar(batches, total=_len(batches), desc="baseline auto_rgn",
                                      enabled=progress), device, dtype=torch.float64,
            all_reduce=getattr(batches, "sharded", False))
    counter.forward += images
    counter.backward += images
    return _relative_norms(groups, params,
                           {k: float(g.div(n).pow(2).sum()) for k, g in grads.items()})


def _relative_norms(groups: Sequence[LayerGroup], params: Dict[str, torch.Tensor],
                    grad_sq: Dict[str, float]) -> np.ndarray:
    values = np.empty(len(groups))
    for j, group in enumerate(groups):
        g2 = sum(grad_sq[p] for p in group.parameter_names)
        w2 = sum(float(params[p].detach().double().pow(2).sum()) for p in group.parameter_names)
        values[j] = math.sqrt(g2) / math.sqrt(w2) if w2 > 0 else math.nan
    return values


def auto_rgn_settings(images: int, from_replay: bool) -> Dict[str, Any]:
    """The settings Auto-RGN reports (:attr:`~model_audit.baselines.BaselineResult.settings`)."""
    return {"target": "true label (mean cross-entropy of the misclassified images)",
            "reduction": "||grad_G||_2 / ||w_G||_2 over the group's parameters as one vector, "
                         "normalised to shares summing to 1 over the groups",
            "n_steps": None, "baseline_input": None, "images": images,
            "gradient": "the replay's first step (no pass of its own)" if from_replay
            else "one forward and backward pass over the images"}
