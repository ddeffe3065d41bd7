"""An Arachne-style targeted repair of the last layer: the anchor of ``python -m bench fix
--target``.

Arachne (Sohn, Kang and Yoo, "Arachne: Search-Based Repair of Deep Neural Networks", TOSEM
2023) repairs one misbehaviour, the negative inputs (here: images of class TRUE predicted as
PRED), while keeping the positive inputs (images the model classifies correctly):

1. **Localisation** (bidirectional): every weight of the last layer gets two scores on the
   negative inputs, the magnitude of the loss's gradient with respect to it (backward) and
   its forward impact, ``|activation_j * w_ij|`` (the share of the output neuron's input it
   carries); the weights on the Pareto front of the two, at most ``max_weights`` of them (the
   front's first members by the product of both scores), are the ones repaired.
2. **Search**: differential evolution (``scipy.optimize.differential_evolution``) over the
   localised weights, within three standard deviations of the layer's weights around their
   values, maximising Arachne's fitness
   ``(n_patched + 1) / (loss_neg + 1) + (n_intact + 1) / (loss_pos + 1)``: negative inputs now
   right, positive inputs still right, and the cross-entropy on each set.

Only the last layer changes, so the penultimate features are computed once and every fitness
evaluation is a small matrix product. The search stops at a wall-time budget (the tool's own
targeted repair time in the bench), or after ``maxiter`` generations.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def head_and_features(model: nn.Module) -> Tuple[nn.Linear, nn.Module]:
    """The last Linear layer (the classifier head) and the model up to it (same input, its
    input as output)."""
    from model_audit.models.registry import head_name

    name = head_name(model)
    head = model.get_submodule(name)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"the head {name} is not a Linear layer")

    class Features(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen: List[torch.Tensor] = []
            handle = head.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
            try:
                self.inner(x)
            finally:
                handle.remove()
            return seen[0]

    return head, Features()


@torch.no_grad()
def features(model: nn.Module, probe: Any, positions: Sequence[int], batch: int = 256
             ) -> torch.Tensor:
    """Penultimate features (the head's input) of the probe images at ``positions``."""
    model.eval()
    _, feat = head_and_features(model)
    out = [torch.empty(0)]
    for start in range(0, len(positions), batch):
        chunk = list(positions[start:start + batch])
        out.append(feat(probe.load(chunk)).float().flatten(1))
    return torch.cat(out) if len(out) > 1 else torch.empty(0)


def localise(w: torch.Tensor, b: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor,
             max_weights: int) -> List[Tuple[int, int]]:
    """(row, column) of the last-layer weights on the Pareto front of gradient magnitude and
    forward impact over the negative inputs ``feats`` (their labels: the true classes)."""
    w = w.clone().requires_grad_(True)
    loss = F.cross_entropy(feats @ w.T + b, labels, reduction="sum")
    (grad,) = torch.autograd.grad(loss, [w])
    g = grad.abs().detach().numpy()
    impact = (feats.abs().mean(0, keepdim=True) * w.detach().abs()).numpy()  # |a_j * w_ij|
    impact = impact / np.maximum(impact.sum(1, keepdims=True), 1e-12)   # share of neuron i
    flat_g, flat_fi = g.reshape(-1), impact.reshape(-1)
    order = np.lexsort((-flat_fi, -flat_g))  # by gradient, then impact (descending)
    front: List[int] = []
    best_fi = -np.inf
    for k in order:  # non-dominated: no weight with a larger gradient has a larger impact
        if flat_fi[k] > best_fi:
            front.append(int(k))
            best_fi = flat_fi[k]
    front.sort(key=lambda k: -(flat_g[k] * flat_fi[k]))
    cols = w.shape[1]
    return [(k // cols, k % cols) for k in front[:max_weights]]


@dataclass
class ArachneResult:
    weights: List[Tuple[int, int]]
    w: torch.Tensor
    seconds: float
    evaluations: int
    generations: int
    fitness: float
    fitness_before: float


def _fitness(w: torch.Tensor, b: torch.Tensor, neg: torch.Tensor, neg_y: torch.Tensor,
             pos: torch.Tensor, pos_y: torch.Tensor) -> float:
    ln, lp = neg @ w.T + b, pos @ w.T + b
    patched = int((ln.argmax(1) == neg_y).sum())
    intact = int((lp.argmax(1) == pos_y).sum())
    loss_neg = float(F.cross_entropy(ln, neg_y, reduction="mean")) if len(neg_y) else 0.0
    loss_pos = float(F.cross_entropy(lp, pos_y, reduction="mean")) if len(pos_y) else 0.0
    return (patched + 1) / (loss_neg + 1) + (intact + 1) / (loss_pos + 1)


def repair(head: nn.Linear, neg: torch.Tensor, neg_y: torch.Tensor, pos: torch.Tensor,
           pos_y: torch.Tensor, *, budget_s: float, seed: int, max_weights: int = 20,
           popsize: int = 20, maxiter: int = 1000) -> ArachneResult:
    """Localise, then search; the best weights found within ``budget_s`` seconds."""
    from scipy.optimize import differential_evolution

    start = time.perf_counter()
    w0, b = head.weight.detach().float().clone(), head.bias.detach().float().clone()
    chosen = localise(w0, b, neg, neg_y, max_weights)
    rows = torch.tensor([r for r, _ in chosen])
    cols = torch.tensor([c for _, c in chosen])
    values = w0[rows, cols].numpy()
    spread = 3.0 * float(w0.std())
    bounds = [(float(v) - spread, float(v) + spread) for v in values]
    count = {"evals": 0, "gens": 0}

    def objective(x: np.ndarray) -> float:
        count["evals"] += 1
        w = w0.clone()
        w[rows, cols] = torch.as_tensor(x, dtype=w.dtype)
        return -_fitness(w, b, neg, neg_y, pos, pos_y)

    def stop(*_: Any, **__: Any) -> bool:
        count["gens"] += 1
        return time.perf_counter() - start > budget_s

    init = np.random.default_rng(seed).normal(values, spread / 3.0,
                                              size=(popsize * len(values), len(values)))
    init[0] = values  # the original weights are one member of the population
    init = np.clip(init, [lo for lo, _ in bounds], [hi for _, hi in bounds])
    result = differential_evolution(objective, bounds, maxiter=maxiter, popsize=popsize,
                                    seed=seed, init=init, polish=False, tol=0, callback=stop)
    w = w0.clone()
    w[rows, cols] = torch.as_tensor(result.x, dtype=w.dtype)
    return ArachneResult(chosen, w, time.perf_counter() - start, count["evals"], count["gens"],
                         -float(result.fun), _fitness(w0, b, neg, neg_y, pos, pos_y))


@torch.no_grad()
def predict(head: nn.Linear, w: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    return (feats @ w.T + head.bias.detach().float()).argmax(1)
