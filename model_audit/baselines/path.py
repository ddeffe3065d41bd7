"""Path layer baselines: integrated gradients, conductance and internal influence.

Conductance and internal influence evaluate the network along the *input* path and need, at
each point, the gradient of the target w.r.t. a layer's output: one backward pass gives it for
every group's output, so :func:`_shared_path_totals` computes all groups together with
captum's arithmetic (its Gauss-Legendre points and weights; the tests check the numbers against
captum's ``LayerConductance`` and ``InternalInfluence`` run one layer at a time, which costs
the group count times as many passes). Layer integrated gradients interpolates *at* the layer,
so it runs captum's class once per group.

* **Baseline input** of the path methods (conductance, integrated gradients, internal
  influence): zeros in the normalised input space (captum's default; the data set's mean image
  under the usual ``(x - mean) / std`` normalisation), Gauss-Legendre quadrature with
  ``n_steps`` points.
* **Memory:** the path methods run ``images x points`` evaluations in forwards of at most
  ``internal_batch_size`` images (default: the batch size of ``batches``). Conductance and
  influence put ``internal_batch_size // points`` images' whole paths in one forward, or split
  one image's path when it does not fit (conductance's chunks then share one point, since it
  takes differences between consecutive points, so it needs at least 2); layer integrated
  gradients takes one step of a whole batch per forward at least (captum's batching).

The Gauss-Legendre points and weights are computed here (:func:`_gauss_legendre_alphas`,
:func:`_gauss_legendre_step_sizes`) exactly as captum computes them, so that only captum's
public API is used; a test checks that they equal captum's.

Every ``*_totals`` function has the signature of a layer method in the registry
(:data:`model_audit.baselines.BASELINES`): ``(forward, layers, x, y, n_steps,
internal_batch_size) -> {group index: per-image sums of |attribution|}``.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import captum.attr as ca
import torch
from torch import nn

from ._utils import _abs_sum, _forward_hooks, _tensors
from .registry import register_baseline


def _gauss_legendre_alphas(n: int) -> List[float]:
    """The ``n`` Gauss-Legendre points on [0, 1] (captum's ``gausslegendre`` alphas)."""
    return (0.5 * (1 + np.polynomial.legendre.leggauss(n)[0])).tolist()


def _gauss_legendre_step_sizes(n: int) -> List[float]:
    """The ``n`` Gauss-Legendre weights on [0, 1], summing to 1 (captum's step sizes)."""
    return (0.5 * np.polynomial.legendre.leggauss(n)[1]).tolist()


def _one_pass_per_point(name: str) -> Callable[..., Dict[int, torch.Tensor]]:
    """The registered function of a method that takes every group in one backward pass per
    path point (:func:`_shared_path_totals`): per-image |attribution| sums of one batch."""
    def totals(forward: Callable[..., torch.Tensor], layers: Dict[int, nn.Module],
               x: torch.Tensor, y: torch.Tensor, n_steps: int,
               internal_batch_size: int) -> Dict[int, torch.Tensor]:
        return _shared_path_totals(name, forward, layers, x, y, n_steps, internal_batch_size)
    totals.__name__ = totals.__qualname__ = f"{name}_totals"
    return totals


conductance_totals = register_baseline(
    "conductance", "Layer Conductance", cheap=False, uses_steps=True,
    captum_class="LayerConductance", scales_input=True,
    description="conductance of the group's output for the true-class logit (Dhamdhere et al. "
                "2018)")(_one_pass_per_point("conductance"))


@register_baseline("integrated_gradients", "Layer Integrated Gradients", cheap=False,
                   uses_steps=True, captum_class="LayerIntegratedGradients",
                   description="integrated gradients of the true-class logit along the group's "
                               "output (Sundararajan et al. 2017)")
def integrated_gradients_totals(forward: Callable[..., torch.Tensor],
                                layers: Dict[int, nn.Module], x: torch.Tensor, y: torch.Tensor,
                                n_steps: int, internal_batch_size: int) -> Dict[int, torch.Tensor]:
    """Per-image |layer integrated gradients| sums of one batch, one group at a time."""
    b = int(x.shape[0])
    # Layer IG interpolates *at* the layer, so every group needs passes of its own.
    return {i: _abs_sum(ca.LayerIntegratedGradients(forward, module).attribute(
        x, target=y, n_steps=n_steps, internal_batch_size=max(internal_batch_size, b)))
        for i, module in layers.items()}


internal_influence_totals = register_baseline(
    "internal_influence", "Internal Influence", cheap=False, uses_steps=True,
    captum_class="InternalInfluence", scales_input=True,
    description="gradient of the true-class logit w.r.t. the group's output, integrated along "
                "the input path (Leino et al. 2018)")(_one_pass_per_point("internal_influence"))


def _shared_path_totals(name: str, forward: Callable[..., torch.Tensor],
                        layers: Dict[int, nn.Module], x: torch.Tensor, y: torch.Tensor,
                        n_steps: int, internal_batch_size: int) -> Dict[int, torch.Tensor]:
    """Conductance or internal influence of every group at once: per-image |attribution| sums.

    Both methods evaluate the network at points ``x' + alpha (x - x')`` of the *input* path and
    need, at each point, the gradient of the target logit w.r.t. a layer's output (and, for
    conductance, that output). One backward pass gives those gradients for every group's output
    at once, so this costs ``n_steps + 1`` (conductance) or ``n_steps`` (influence) passes per
    image for all groups together, where captum's ``LayerConductance`` / ``InternalInfluence``
    take that many per group. The arithmetic is theirs (the tests check it against them):

    * conductance: ``sum_k g(a_k) * (h(a_{k+1}) - h(a_k))`` over the ``n_steps + 1``
      Gauss-Legendre points ``a_k``;
    * internal influence: ``sum_k w_k * g(a_k)`` over ``n_steps`` points with weights ``w_k``.

    Memory: at most ``internal_batch_size`` points (images x steps) per forward. When a whole
    path fits, ``internal_batch_size // points`` images go together; otherwise one image's path
    is split into chunks, which for conductance share one point (the difference needs both
    ends), as captum's ``_batch_attribution`` does.
    """
    conductance = name == "conductance"
    alphas = _gauss_legendre_alphas(n_steps + 1 if conductance else n_steps)
    weights = None if conductance else _gauss_legendre_step_sizes(n_steps)
    points = len(alphas)
    ibs = max(internal_batch_size, 2 if conductance else 1)
    per_forward = max(1, ibs // points)  # images whose whole path fits in one forward
    chunk = min(points, ibs)              # points per forward (>= 2 for conductance)
    idx = list(layers)
    saved: Dict[int, List[torch.Tensor]] = {}  # each group's output tensors in this forward

    def saver(i: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            saved[i] = _tensors(output)
        return hook

    out: Dict[int, List[torch.Tensor]] = {i: [] for i in idx}
    with _forward_hooks(layers, saver):
        for start in range(0, int(x.shape[0]), per_forward):
            xs, ys = x[start:start + per_forward], y[start:start + per_forward]
            totals = _path_totals(forward, saved, idx, xs, ys, alphas, weights, chunk)
            for i in idx:
                out[i].append(_abs_sum(tuple(totals[i])) if totals[i] else
                              torch.zeros(int(xs.shape[0]), dtype=torch.float64))
    return {i: torch.cat(out[i]) for i in idx}


def _path_totals(forward: Callable[..., torch.Tensor], saved: Dict[int, List[torch.Tensor]],
                 idx: List[int], xs: torch.Tensor, ys: torch.Tensor, alphas: List[float],
                 weights: Optional[List[float]],
                 chunk: int) -> Dict[int, Optional[List[torch.Tensor]]]:
    """Each group's attribution (one tensor per output tensor) of the images ``xs``: the sum
    over their whole path, taken ``chunk`` points per forward (``weights`` None: conductance)."""
    conductance = weights is None
    points = len(alphas)
    totals: Dict[int, Optional[List[torch.Tensor]]] = {i: None for i in idx}
    k = 0
    while True:
        stop = min(k + chunk, points)
        parts = _chunk_parts(forward, saved, idx, xs, ys, alphas[k:stop],
                             None if weights is None else weights[k:stop])
        for i in idx:
            previous = totals[i]
            totals[i] = parts[i] if previous is None else [
                t + p for t, p in zip(previous, parts[i])]
        if stop >= points:
            return totals
        # conductance: the next chunk starts at this one's last point
        k = stop - 1 if conductance else stop


def _chunk_parts(forward: Callable[..., torch.Tensor], saved: Dict[int, List[torch.Tensor]],
                 idx: List[int], xs: torch.Tensor, ys: torch.Tensor, alphas: Sequence[float],
                 weights: Optional[Sequence[float]]) -> Dict[int, List[torch.Tensor]]:
    """One forward and backward pass at the points ``alphas`` for the images ``xs``: each
    group's summed contribution of these points (one tensor per output tensor)."""
    m = int(xs.shape[0])
    a = torch.tensor(alphas, dtype=xs.dtype, device=xs.device)
    steps = len(a)
    # step-major, as captum stacks them: [all images at a_k, all at a_k+1, ...];
    # the baseline input is zeros, so a point is a * x
    scaled = (a.view(-1, *([1] * xs.dim())) * xs.unsqueeze(0)).reshape(
        steps * m, *xs.shape[1:]).requires_grad_()
    saved.clear()
    logits = forward(scaled)
    picked = logits.gather(1, ys.repeat(steps).view(-1, 1)).sum()
    flat = [t for i in idx for t in saved[i]]
    grads = iter(torch.autograd.grad(picked, flat, allow_unused=True))
    parts = {i: [_point_sum(next(grads), h, steps, m, weights) for h in saved[i]] for i in idx}
    saved.clear()
    return parts


def _point_sum(g: Optional[torch.Tensor], h: torch.Tensor, steps: int, m: int,
               weights: Optional[Sequence[float]]) -> torch.Tensor:
    """One output tensor's contribution, summed over the ``steps`` points of a chunk:
    conductance (``weights`` None) ``sum g(a_k) * (h(a_{k+1}) - h(a_k))``, influence
    ``sum w_k * g(a_k)``; ``g`` None (the output does not reach the logits) counts as zeros."""
    g = torch.zeros_like(h) if g is None else g
    g = g.reshape(steps, m, *h.shape[1:])
    if weights is None:
        h = h.detach().reshape(steps, m, *h.shape[1:])
        return (g[:-1] * (h[1:] - h[:-1])).sum(0)
    w = torch.tensor(weights, dtype=g.dtype, device=g.device)
    return (g * w.view(-1, *([1] * (g.dim() - 1)))).sum(0)
