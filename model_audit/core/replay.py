"""Beta-scheduled replay: short heavy-ball gradient passes from the checkpoint over its errors.

From the checkpoint's weights ``theta_0`` the replay takes ``steps`` full-batch heavy-ball steps
on the mean cross-entropy of the misclassified probe images::

    lr_t  = cosine from lr down to lr * lr_min_ratio over the steps
    mu_t  = schedule(lr_t)          (beta: 1 - 2*sqrt(lr_t), critically damped)
    g_t   = grad of the loss at theta_t   (gradients accumulated over batches)
    v_t   = mu_t * v_{t-1} + g_t            (torch.optim.SGD, dampening 0, nesterov off)
    theta_{t+1} = theta_t - lr_t * v_t

It works on copies of the parameters through ``torch.func.functional_call``: the model's own
parameters and buffers are never written, and the model stays in eval mode, so BatchNorm uses
and keeps its running statistics and dropout is off. No hooks are registered. The result is
the displacement ``theta_K - theta_0`` per parameter and the damping regime of every step.

Defaults (:class:`ReplayConfig`): 5 steps from lr 0.01 (momentum 0.80) to 0.001 (0.94). The
learning rate is that of a typical fine-tuning run, halved while the first step fails an
Armijo check (see :func:`replay`), so that a model with sharper curvature gets a smaller rate
instead of an overshooting replay; a handful of steps is enough to see which parameters the
errors pull on, and keeps the cost at a few passes over the errors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .. import distributed
from .._progress import progress_bar
from ..errors import ConfigError, ReplayError
from ..io.probe import BatchCache
from .schedules import MomentumSchedule, MomentumScheduler, StepRecord, cosine_lr, step_record


@dataclass(frozen=True)
class ReplayConfig:
    """Options of the replay (documented defaults; see the module docstring)."""

    steps: int = 5              # K full-batch steps over the misclassified images
    lr: float = 0.01            # peak learning rate (first step), halved while too large
    lr_search: bool = True      # halve lr until the first step passes the Armijo check
    lr_min_ratio: float = 0.1   # last step's lr = lr * lr_min_ratio (cosine in between)
    schedule: str = "beta"      # beta | hybrid | constant (0.9)

    def validate(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"replay steps must be >= 1, got {self.steps}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"replay lr must be > 0, got {self.lr}")
        if not 0 < self.lr_min_ratio <= 1:
            raise ConfigError(f"replay lr_min_ratio must be in (0, 1], got {self.lr_min_ratio}")
        MomentumSchedule(self.schedule)

    def to_dict(self) -> Dict[str, Any]:
        return {"steps": self.steps, "lr": self.lr, "lr_min_ratio": self.lr_min_ratio,
                "schedule": self.schedule, "lr_search": self.lr_search}


@dataclass(frozen=True)
class ReplayStep:
    """One replay step: its schedule record and the error loss at the start of the step."""

    record: StepRecord
    loss: float
    grad_norm: float

    def to_dict(self) -> Dict[str, Any]:
        return {**self.record.to_dict(), "loss": self.loss, "grad_norm": self.grad_norm}


@dataclass(frozen=True)
class ReplayResult:
    """Displacement of every parameter after the replay, and the trajectory's records."""

    steps: Tuple[ReplayStep, ...]
    displacement: Dict[str, torch.Tensor]
    initial_loss: float
    final_loss: float
    fixed: int                 # misclassified images predicted right at theta_K
    n: int                     # misclassified images replayed
    forward_images: int
    backward_images: int
    peak_lr: float = 0.0       # the peak learning rate used (after the step-size check)
    lr_trials: int = 0         # forward passes the step-size check took
    initial_losses: Optional[torch.Tensor] = None   # per image, at theta_0
    lr_check_passed: bool = True   # False: no rate in the search passed the Armijo check
    #: per parameter, the squared norm of the mean error-loss gradient at theta_0 (the first
    #: step's): Auto-RGN's numerator, so that baseline needs no pass of its own in a scan
    initial_grad_sq: Optional[Dict[str, float]] = None
    lr_skipped: int = 0        # halvings skipped unrun: above the loss-scale bound 2 L / |g|^2

    def to_dict(self) -> Dict[str, Any]:
        return {"n": self.n, "initial_loss": self.initial_loss, "final_loss": self.final_loss,
                "fixed_by_replay": self.fixed, "peak_lr": self.peak_lr,
                "lr_trials": self.lr_trials, "lr_check_passed": self.lr_check_passed,
                "lr_halvings_skipped": self.lr_skipped,
                "steps": [s.to_dict() for s in self.steps]}


def detached_params(model: nn.Module, device: str) -> Dict[str, torch.Tensor]:
    """Copies of the model's parameters (float32, on ``device``), sharing no storage."""
    return {n: p.detach().to(device=device, dtype=torch.float32, copy=True)
            for n, p in model.named_parameters()}


def per_sample_losses(model: nn.Module, params: Dict[str, torch.Tensor], batches: BatchCache,
                      device: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample cross-entropy and correctness at ``params`` (no gradient), in the order of
    ``batches.positions`` (gathered from every rank when the cache is sharded)."""
    losses, right = [torch.empty(0)], [torch.empty(0, dtype=torch.bool)]
    with torch.no_grad(), distributed.agree(batches.sharded):
        for _, x, y in batches:
            x, y = x.to(device), y.to(device)
            logits = functional_call(model, params, (x,), strict=False).float()
            losses.append(F.cross_entropy(logits, y, reduction="none").cpu())
            right.append((logits.argmax(1) == y).cpu())
    return batches.gathered(torch.cat(losses)), batches.gathered(torch.cat(right))


#: Largest number of halvings of the peak learning rate in the step-size check.
MAX_HALVINGS = 10
#: Largest number of halvings skipped without a trial because the loss scale rules them out
#: (2^-200 covers any float32 loss).
MAX_SKIPPED = 200
#: Armijo constant of the step-size check: the first (momentum-free) step must remove at least
#: this fraction of the loss decrease that its gradient predicts to first order.
ARMIJO = 0.5


def _mean_loss(model: nn.Module, params: Dict[str, torch.Tensor], batches: BatchCache,
               device: str) -> float:
    losses, _ = per_sample_losses(model, params, batches, device)
    return float(losses.mean())


def summed_gradients(forward: Callable[[torch.Tensor], torch.Tensor],
                     params: Dict[str, torch.Tensor], batches: Iterable, device: str, *,
                     dtype: Optional[torch.dtype] = None,
                     per_image: Optional[List[torch.Tensor]] = None,
                     all_reduce: bool = False
                     ) -> Tuple[Dict[str, torch.Tensor], float, int]:
    """The gradient of the summed cross-entropy over all ``batches``, accumulated batch by
    batch (memory bounded by one batch), with respect to ``params``.

    Args:
        forward: images -> logits, computed from ``params`` (which require grad).
        params: the tensors to differentiate by name.
        batches: ``(positions, images, labels)`` triples.
        dtype: accumulate in this dtype (default: each parameter's own).
        per_image: when given, each batch's per-image losses are appended (detached, CPU).
        all_reduce: ``batches`` are this rank's shard (a sharded
            :class:`~model_audit.io.probe.BatchCache`): the sums are then added over the
            ranks, so every rank returns the gradient of the whole set (``per_image`` stays
            this rank's).

    Returns:
        (the summed gradient per name, the summed loss, the number of images).
    """
    names = list(params)
    grads = {k: torch.zeros_like(v, dtype=dtype or v.dtype) for k, v in params.items()}
    total, images = 0.0, 0
    with distributed.agree(all_reduce):
        for _, x, y in batches:
            x, y = x.to(device), y.to(device)
            losses = F.cross_entropy(forward(x).float(), y, reduction="none")
            loss = losses.sum()
            chunk = torch.autograd.grad(loss, [params[k] for k in names], allow_unused=True)
            for k, g in zip(names, chunk):
                if g is not None:
                    grads[k] += g if dtype is None else g.to(dtype)
            if per_image is not None:
                per_image.append(losses.detach().cpu())
            total += float(loss.detach())
            images += len(y)
    if all_reduce:
        distributed.all_reduce_sum(list(grads.values()))
        total, count = distributed.sum_values(total, images)
        images = int(count)
    return grads, total, images


def replay(model: nn.Module, batches: BatchCache, *, config: ReplayConfig = ReplayConfig(),
           device: str = "cpu", progress: bool = False) -> ReplayResult:
    """Run the beta-scheduled replay over the images in ``batches``.

    The steps are ``torch.optim.SGD`` (heavy ball, no dampening) on copies of the parameters,
    with the cosine learning rate set before each step and the momentum from it by
    :class:`~model_audit.core.schedules.MomentumScheduler`, as ``fix`` trains.

    Step size: the peak learning rate ``config.lr`` is halved until the first step, which has
    no momentum yet, passes the Armijo check
    ``L(theta_0 - lr g_0) <= L(theta_0) - ARMIJO * lr * |g_0|^2``; a learning rate too large for
    the model's curvature would otherwise overshoot and make the displacement a poor direction.
    Since the loss is non-negative, no rate above ``L / (ARMIJO |g_0|^2)`` can pass: the
    halvings down to that bound are skipped without a trial (recorded as ``lr_skipped``), so
    the search adapts to the loss's scale; then up to :data:`MAX_HALVINGS` halvings are tried,
    one forward pass over the errors each. The chosen rate is recorded.

    Raises:
        ReplayError: empty batches or a non-finite loss/gradient (e.g. NaN weights).
    """
    config.validate()
    n = len(batches.positions)
    if n == 0:
        raise ReplayError("nothing to replay: the model makes no errors on the probe")
    if model.training:
        raise ReplayError("internal error: the replay needs the model in eval mode")
    theta0 = detached_params(model, device)
    theta = {k: v.clone().requires_grad_(True) for k, v in theta0.items()}
    steps: List[ReplayStep] = []
    search = _StepSize(config.lr, passed=not config.lr_search)
    initial: List[torch.Tensor] = []
    initial_grad_sq: Dict[str, float] = {}
    for t in progress_bar(range(config.steps), total=config.steps, desc="replay", enabled=progress):
        grads, total, _ = summed_gradients(
            lambda x: functional_call(model, theta, (x,), strict=False), theta, batches,
            device, per_image=initial if t == 0 else None, all_reduce=batches.sharded)
        mean_loss = total / n
        with torch.no_grad():
            per_param = {k: float(g.div_(n).pow(2).sum()) for k, g in grads.items()}
        sq = sum(per_param.values())
        _check_finite(t, mean_loss, sq, steps, search.peak, config)
        if t == 0:
            initial_grad_sq = per_param
            if config.lr_search:
                search.run(model, theta0, grads, mean_loss, sq, batches, device)
            lr = cosine_lr(0, config.steps, search.peak, search.peak * config.lr_min_ratio)
            opt = torch.optim.SGD(list(theta.values()), lr=lr, momentum=0.0)
            momentum = MomentumScheduler(opt, config.schedule)
        else:
            lr = cosine_lr(t, config.steps, search.peak, search.peak * config.lr_min_ratio)
            for group in opt.param_groups:
                group["lr"] = lr
            momentum.step()
        for k, p in theta.items():
            p.grad = grads[k]
        opt.step()
        steps.append(ReplayStep(step_record(t, lr, opt.param_groups[0]["momentum"]), mean_loss,
                                math.sqrt(sq)))
    theta = {k: v.detach() for k, v in theta.items()}
    final_losses, right = per_sample_losses(model, theta, batches, device)
    if not bool(torch.isfinite(final_losses).all()):
        raise ReplayError(
            f"the replay diverged in its last step (loss {float(final_losses.mean())} after "
            f"starting at {steps[0].loss:.4g}) with peak learning rate {search.peak:.4g}; lower "
            "the replay learning rate (--replay-lr)")
    displacement = {k: theta[k] - theta0[k] for k in theta}
    passes = n * config.steps
    return ReplayResult(tuple(steps), displacement, steps[0].loss, float(final_losses.mean()),
                        int(right.sum()), n, passes + n * search.trials + n, passes,
                        search.peak, search.trials,
                        batches.gathered(torch.cat([torch.empty(0)] + initial)), search.passed,
                        initial_grad_sq, lr_skipped=search.skipped)


def _check_finite(t: int, mean_loss: float, sq: float, steps: List[ReplayStep], peak: float,
                  config: ReplayConfig) -> None:
    if math.isfinite(mean_loss) and math.isfinite(sq):
        return
    if t == 0:
        raise ReplayError(
            f"the loss or gradient on the misclassified images is not finite (loss "
            f"{mean_loss}) before any replay step: the checkpoint's weights or the probe "
            "images hold NaN/Inf values")
    raise ReplayError(
        f"the replay diverged at step {t} (loss {mean_loss} after starting at "
        f"{steps[0].loss:.4g}) with peak learning rate {peak:.4g} and the "
        f"{config.schedule} schedule; lower the replay learning rate (--replay-lr)")


@dataclass
class _StepSize:
    """The Armijo search of the peak learning rate on the first (momentum-free) step."""

    peak: float
    passed: bool
    trials: int = 0
    skipped: int = 0   # halvings that could not pass (above the loss-scale bound), not run

    @torch.no_grad()
    def run(self, model: nn.Module, theta0: Dict[str, torch.Tensor],
            grads: Dict[str, torch.Tensor], mean_loss: float, sq: float, batches: BatchCache,
            device: str) -> None:
        # the loss is >= 0, so no rate above 2 L / |g|^2 can pass the check (it would have to
        # bring the loss below 0): those halvings are skipped unrun, which adapts the search to
        # any loss scale (a random-weight network's loss of 1e9 needs rates near 1e-12) and
        # leaves every rate the search would have reached unchanged
        bound = mean_loss / (ARMIJO * sq) if sq > 0 else math.inf
        while self.peak > bound and self.skipped < MAX_SKIPPED:
            self.peak /= 2.0
            self.skipped += 1
        for _ in range(MAX_HALVINGS + 1):
            trial = {k: theta0[k] - self.peak * grads[k] for k in theta0}
            self.trials += 1
            value = _mean_loss(model, trial, batches, device)
            if math.isfinite(value) and value <= mean_loss - ARMIJO * self.peak * sq:
                self.passed = True
                return
            if self.trials > MAX_HALVINGS:
                return
            self.peak /= 2.0
