"""The repair's batches and its retraining loop (steps 2 and 3 of :mod:`model_audit.commands.fix`).

Public because the benchmarks drive them directly: :func:`batch_plan` draws the train
positions of every optimizer step, :func:`retrain` trains a copy of a model on them with only
the selected groups' parameters free.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ... import distributed
from ..._progress import progress_bar
from ...core.evaluate import fast_layout
from ...core.layers import LayerGroup
from ...core.schedules import MomentumScheduler
from ...errors import ConfigError
from ...io.probe import ProbeSet
from .validate import Trajectory
from ...results.fix import PRESERVE_TEMPERATURE
from ...results.fix import FixConfig


class RepairDiverged(ConfigError):
    """The repair's loss became NaN/Inf."""


def batch_plan(wrong: List[int], right: List[int], steps: int, batch: int, seed: int,
               wrong_fraction: Optional[float] = None, guard: Sequence[int] = ()
               ) -> List[List[int]]:
    """Train positions of every step.

    With a ``wrong_fraction``, each batch holds ``round(batch * wrong_fraction)`` images drawn
    from the errors and the rest from the images the model gets right (with replacement,
    seeded); when one pool is empty the other fills the batch. With ``None`` the repair data
    is sampled uniformly, epoch by epoch without replacement (plain fine-tuning: errors appear
    at their natural rate).

    A ``guard`` pool (with a ``wrong_fraction``) is drawn as often as ``wrong``, from the
    share of the batch that ``right`` would fill: a targeted repair's positive set, the
    predicted class's images the model gets right, which keeps the repair from moving the
    whole class boundary (without it, half of every batch labelled TRUE turns PRED's own images
    into TRUE).

    Args:
        wrong: train positions the model gets wrong.
        right: train positions the model gets right.
        steps: number of optimizer steps (batches).
        batch: images per batch.
        seed: seed of the draws (the same arguments give the same plan).
        wrong_fraction: share of each batch drawn from ``wrong``, or None (natural).
        guard: train positions (usually some of ``right``) drawn as often as ``wrong``, at
            most the rest of the batch, from ``right``'s share; empty: none.

    Returns:
        One list of train positions per step, each of length ``batch``.
    """
    rng = np.random.default_rng(seed)
    plan: List[List[int]] = []
    if wrong_fraction is None:
        pool = np.asarray(sorted(wrong + right))
        order = np.empty(0, dtype=np.int64)
        for _ in range(steps):
            while len(order) < batch:
                order = np.concatenate([order, rng.permutation(pool)])
            plan.append(order[:batch].tolist())
            order = order[batch:]
        return plan
    n_wrong = int(round(batch * wrong_fraction))
    if not right:
        n_wrong = batch
    elif not wrong:
        n_wrong = 0
    guard = list(guard)
    n_guard = min(n_wrong, batch - n_wrong) if guard else 0
    n_right = batch - n_wrong - n_guard
    for _ in range(steps):
        idx: List[int] = []
        if n_wrong:
            idx += rng.choice(wrong, size=n_wrong, replace=True).tolist()
        if n_guard:
            idx += rng.choice(guard, size=n_guard, replace=True).tolist()
        if n_right:
            idx += rng.choice(right, size=n_right, replace=True).tolist()
        plan.append(idx)
    return plan


def _free_selection(model: nn.Module, groups: Sequence[LayerGroup], selected: Sequence[str]
                    ) -> List[nn.Parameter]:
    """Freeze every parameter outside ``selected``; return the selected ones."""
    chosen = {p for g in groups if g.name in selected for p in g.parameter_names}
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(name in chosen)
        if name in chosen:
            trainable.append(p)
    return trainable


def _training_modes(model: nn.Module, groups: Sequence[LayerGroup], selected: Sequence[str],
                    batchnorm: str) -> List[nn.Module]:
    """Put the model in eval mode, except (with ``batchnorm="train"``) the BatchNorm layers of
    the selected groups, which normalise with batch statistics and update their running ones.
    Returns those layers (for :func:`_modes_again`, once they may be wrapped)."""
    model.eval()
    trained: List[nn.Module] = []
    if batchnorm == "train":
        buffers = {b for g in groups if g.name in selected for b in g.buffer_names}
        for name, module in model.named_modules():
            if (isinstance(module, nn.modules.batchnorm._BatchNorm)
                    and f"{name}.running_mean" in buffers):
                module.train()
                trained.append(module)
    return trained


def _modes_again(model: nn.Module, trained: Sequence[nn.Module]) -> None:
    """The modes of :func:`_training_modes` again, after an evaluation put ``model`` in eval
    mode (by module, not by name: under torchrun the BatchNorm layers are wrapped)."""
    model.eval()
    for module in trained:
        module.train()


def retrained_names(model: nn.Module, groups: Sequence[LayerGroup], selected: Sequence[str]
                    ) -> List[str]:
    """The state-dict entries a repair of ``selected`` may change: their parameters and
    buffers (BatchNorm statistics), in the model's order."""
    mine = {n for g in groups if g.name in selected for n in g.parameter_names + g.buffer_names}
    return [k for k in model.state_dict() if k in mine]


@dataclass(frozen=True)
class HeadRows:
    """The rows of the classifier head a repair may change: a targeted repair of a confusion
    changes only the predicted classes' outputs (their rows of the head's weight and bias), so
    that no other class's logit moves."""

    module: str             # the head's module name in the model
    rows: Tuple[int, ...]   # the output rows (classes) that may change

    def retrained(self, groups: Sequence[LayerGroup], selected: Sequence[str]) -> bool:
        """Whether the ``selected`` groups hold the head's parameters."""
        mine = {n for g in groups if g.name in selected for n in g.parameter_names}
        return any(n.rsplit(".", 1)[0] == self.module for n in mine)

    def frozen_params(self, model: nn.Module) -> int:
        """Parameters of the head outside the free rows."""
        head = model.get_submodule(self.module)
        return sum(p.numel() // p.shape[0] * (p.shape[0] - len(self.rows))
                   for p in head.parameters(recurse=False))

    def frozen(self, model: nn.Module) -> List[Tuple[nn.Parameter, torch.Tensor]]:
        """(parameter, mask of its frozen rows) for the head's trainable parameters."""
        out = []
        head = model.get_submodule(self.module)
        for p in head.parameters(recurse=False):
            if p.requires_grad:
                mask = torch.ones(p.shape[0], dtype=torch.bool, device=p.device)
                mask[list(self.rows)] = False
                out.append((p, mask))
        return out


@dataclass(frozen=True)
class Teacher:
    """The original model's outputs on the repair data, computed once: the preservation term
    keeps the repaired model's outputs close to them on the images it classified correctly."""

    logits: torch.Tensor    # (repair images, classes), by repair-data position
    right: torch.Tensor     # bool, by repair-data position: the original got it right
    weight: float
    temperature: float = PRESERVE_TEMPERATURE

    def summed_divergence(self, logits: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
        """``T^2 * KL(p_original || p_repaired)`` at temperature ``T``, summed over the images
        of ``positions`` that the original classified correctly (0 when there are none)."""
        idx = torch.as_tensor(list(positions), dtype=torch.long)
        keep = self.right[idx]
        if not bool(keep.any()):
            return logits.sum() * 0.0
        t = self.temperature
        target = F.log_softmax(self.logits[idx][keep].to(logits.device) / t, dim=1)
        log_p = F.log_softmax(logits[keep.to(logits.device)] / t, dim=1)
        return t * t * F.kl_div(log_p, target, log_target=True, reduction="sum")


def _data_parallel(model: nn.Module, device: str) -> nn.Module:
    """``model`` in DistributedDataParallel: the ranks' gradients of the trainable (selected)
    parameters are averaged after every backward pass."""
    from torch.nn.parallel import DistributedDataParallel
    ids = [torch.device(device).index] if device.startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=ids)


def retrain(base: nn.Module, groups: Sequence[LayerGroup], selected: Sequence[str],
            train: ProbeSet, plan: List[List[int]], config: FixConfig, device: str,
            progress: bool, desc: str, *, teacher: Optional[Teacher] = None,
            trajectory: Optional[Trajectory] = None, head_rows: Optional[HeadRows] = None
            ) -> Tuple[nn.Module, float]:
    """Retrain a copy of ``base`` with only the ``selected`` groups' parameters free.

    One SGD step per batch of ``plan`` (cross-entropy on ``train``, plus ``teacher.weight``
    times the preservation term when a ``teacher`` is given), with a cosine learning rate from
    ``config.lr`` to 0 and the momentum of ``config.schedule`` applied by
    :class:`~model_audit.core.schedules.MomentumScheduler`; every module outside the
    selection stays in eval mode (see ``config.batchnorm`` for the selection's BatchNorm
    layers). With a ``trajectory``, the validation part is scored at its checkpoints (the
    caller then puts back the state it keeps: :meth:`Trajectory.restore`). ``base`` is not
    modified.

    Args:
        base: the model to start from (copied).
        groups: the layer groups (or modules) that ``selected`` names.
        selected: names of the units to train.
        train: the repair data that ``plan`` indexes.
        plan: train positions of every step (see :func:`batch_plan`).
        config: ``lr``, ``schedule``, ``batchnorm`` and ``options.seed`` are used.
        device: where to train.
        progress: show a progress bar.
        desc: the progress bar's label.
        teacher: the original's outputs on ``train`` (the preservation term), or None.
        trajectory: scores the states on the validation part and copies the best, or None.
        head_rows: when the head is retrained, only these rows of it change (the other rows'
            gradients are zeroed before every step), or None (every row).

    Returns:
        (the retrained copy in its last state, in eval mode, on ``device``; the seconds the
        loop took).

    Raises:
        RepairDiverged: the loss became NaN/Inf.
    """
    ctx = distributed.current()
    model = copy.deepcopy(base).to(device).eval()
    trainable = _free_selection(model, groups, selected)
    trained_bn = _training_modes(model, groups, selected, config.batchnorm)
    frozen_rows = head_rows.frozen(model) if head_rows is not None else []
    opt = torch.optim.SGD(trainable, lr=config.lr, momentum=0.0)
    lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=len(plan))
    momentum = MomentumScheduler(opt, config.schedule)
    start = time.perf_counter()
    torch.manual_seed(config.options.seed)
    # channels-last kernels would not match DistributedDataParallel's contiguous gradient
    # buckets: the fast layout is for a single process
    layout = fast_layout(model, device) if not ctx.active else contextlib.nullcontext()
    with layout:
        # the tensors the optimizer updates in place, under their own names (synced_batchnorm
        # wraps the BatchNorm layers under torchrun, which renames them in model.state_dict())
        state = model.state_dict()
        with distributed.synced_batchnorm(model):
            forward = _data_parallel(model, device) if ctx.active and trainable else model
            for step, idx in enumerate(progress_bar(plan, total=len(plan), desc=desc,
                                                    enabled=progress)):
                _step(forward, train, idx, config, device, selected, step, opt, teacher,
                      frozen_rows)
                lr_sched.step()
                momentum.step()
                if trajectory is not None and trajectory.due(step + 1, len(plan)):
                    trajectory.observe(step + 1, model, state)
                    _modes_again(model, trained_bn)
    for p in model.parameters():
        p.requires_grad_(True)
    return model.eval(), time.perf_counter() - start


def _step(forward: nn.Module, train: ProbeSet, idx: List[int], config: FixConfig, device: str,
          selected: Sequence[str], step: int, opt: torch.optim.Optimizer,
          teacher: Optional[Teacher],
          frozen_rows: Sequence[Tuple[nn.Parameter, torch.Tensor]] = ()) -> None:
    """One optimizer step on the batch ``idx`` (this rank's contiguous part of it); the rows
    of ``frozen_rows`` get no gradient (with no momentum or weight decay, they stay as
    they are)."""
    ctx = distributed.current()
    mine = distributed.local_part(idx)
    with distributed.agree():
        x = train.load(mine).to(device)
    y = train.labels[mine].to(device)
    logits = forward(x).float()
    summed = F.cross_entropy(logits, y, reduction="sum")
    if teacher is not None and teacher.weight > 0:
        summed = summed + teacher.weight * teacher.summed_divergence(logits, mine)
    mean = distributed.sum_values(float(summed.detach()))[0] / len(idx)
    if not math.isfinite(mean):
        raise RepairDiverged(
            f"the repair of {', '.join(selected)} diverged at step {step} (loss "
            f"{mean}) with lr {config.lr}; lower --lr")
    # DistributedDataParallel averages the ranks' gradients: scaled by the world size,
    # each rank's share of the sum gives the gradient of the mean over the whole batch
    loss = summed / (len(idx) / ctx.world_size)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    with torch.no_grad():
        for p, frozen in frozen_rows:
            if p.grad is not None:
                p.grad[frozen] = 0
    opt.step()
