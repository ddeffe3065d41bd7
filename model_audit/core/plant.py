"""Planted defects: damage ONE layer group of a model by a known amount, to test the scan.

A diagnostic that says "these groups are responsible for the errors" has to show that it names
the cause when the cause is known. This module makes such cases: it copies a model, damages
one group with one of four defects, and calibrates the severity so that the damage costs a
chosen accuracy drop on a probe, so that every group is compared at equal damage. The
``sanity`` command and ``python -m bench localize`` use it.

Defects (``severity`` ``s``; ``t0`` a tensor of the group, ``z`` seeded standard normal noise of
its shape, fixed for the case so that the damage grows smoothly with ``s``):

* ``noise``: Gaussian weight noise relative to each tensor's scale,
  ``t = t0 + s * rms(t0) * z`` (``s`` in [0, 64]);
* ``reinit``: interpolation toward a fresh initialisation of the group's modules (their own
  ``reset_parameters``, seeded), ``t = (1 - s) * t0 + s * t_init`` (``s`` in [0, 1]);
* ``labelswap``: a trained-in defect. The group *alone* is fine-tuned (Adam, the rest frozen,
  the model in eval mode) on the data with the labels of two classes swapped; ``s`` scales the
  resulting displacement, ``t = t0 + s * (t_ft - t0)`` (``s`` in [0, 1]);
* ``bnstats``: shifted running statistics of the group's normalisation layers,
  ``mean = m0 + s * sqrt(v0 + eps) * z1`` and ``var = v0 * exp(s * z2)`` (``s`` in [0, 64]);
  only for groups with BatchNorm layers.

Each defect is one function registered with :func:`register_defect` (its severity range,
where it applies): it draws the case's damage once, as a direction or a log-scale per tensor,
and the severity scales it. Adding a defect is writing one such function.

Only the chosen group's tensors change (parameters, or for ``bnstats`` its running statistics);
the caller's model is never modified. :func:`~model_audit.core.calibrate.changed_tensors`
checks this.

Calibration (:func:`model_audit.core.calibrate.calibrate`): the accuracy drop on the probe
is measured at trial severities. The search brackets the target (doubling the severity from a small start for the
unbounded defects; the bounded ones start from their full severity), then narrows the bracket
by safeguarded linear interpolation (false position, never closer than a tenth of the bracket
to its ends) until the drop is within ``tolerance`` of the target or ``max_evaluations`` is
spent. A defect whose full severity does not cost the target drop, or whose drop jumps past
the target between two severities the search can tell apart (e.g. ``fc`` moved toward a
fresh init: nothing, then far more than the target), is reported as not reached
(``reached=False``) with the closest drop it found: never skipped.

Examples:
    >>> planted = calibrate(model, probe, group, "noise", drop=0.10)  # doctest: +SKIP
    >>> planted.result.drop, planted.model  # doctest: +SKIP
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..core.layers import LayerGroup
@dataclass
class Damage:
    """What a defect changes in the working copy: each tensor's undamaged value, and either a
    direction (``t = t0 + s * d``) or a log-scale (``t = t0 * exp(s * z)``) per tensor."""

    base: Dict[str, torch.Tensor] = field(default_factory=dict)
    direction: Dict[str, torch.Tensor] = field(default_factory=dict)
    log_scale: Dict[str, torch.Tensor] = field(default_factory=dict)
    details: Dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PlantCase:
    """What a defect's function is given: the caller's model (never modified), the working copy
    to damage, the group, the case's seeded generator and the labelswap settings."""

    model: nn.Module
    work: nn.Module
    group: LayerGroup
    seed: int
    gen: torch.Generator
    swap: Optional[SwapData] = None
    device: str = "cpu"
    swap_steps: int = 30
    swap_batch: int = 32
    swap_lr: float = 1e-2

    def floats(self) -> Dict[str, torch.Tensor]:
        """The group's floating-point parameters in the working copy, as they are."""
        state = self.work.state_dict()
        return {p: state[p].detach().clone() for p in self.group.parameter_names
                if state[p].is_floating_point()}


def _has_float_parameters(model: nn.Module, group: LayerGroup) -> bool:
    params = dict(model.named_parameters())
    return any(params[p].is_floating_point() and params[p].numel() for p in group.parameter_names)


@dataclass(frozen=True)
class DefectSpec:
    """A registered defect: its severity range, what it does, where it applies, and the
    function that draws its damage (:func:`register_defect`)."""

    name: str
    bounded: bool          # severity in [0, 1]; otherwise [0, MAX_SEVERITY], searched upward
    start: float           # first trial severity of the upward search (unbounded defects)
    description: str
    damage: Callable[[PlantCase], Damage] = field(repr=False, compare=False)
    applies: Callable[[nn.Module, LayerGroup], bool] = field(
        default=_has_float_parameters, repr=False, compare=False)
    needs: str = "floating-point parameters"   # what a group must have (for the message)


#: Largest severity the upward search of an unbounded defect tries.
MAX_SEVERITY = 64.0

#: The defects, in the order ``all`` lists them; :func:`register_defect` adds one.
DEFECTS: Dict[str, DefectSpec] = {}


def register_defect(name: str, *, bounded: bool, start: float, description: str,
                    applies: Callable[[nn.Module, LayerGroup], bool] = _has_float_parameters,
                    needs: str = "floating-point parameters"
                    ) -> Callable[[Callable[[PlantCase], Damage]], Callable[[PlantCase], Damage]]:
    """Register a defect: a function from a :class:`PlantCase` to its :class:`Damage`, drawn
    once per case (the severity only scales it). Adding a defect is writing one such function.
    """
    def register(fn: Callable[[PlantCase], Damage]) -> Callable[[PlantCase], Damage]:
        DEFECTS[name] = DefectSpec(name, bounded, start, description, fn, applies, needs)
        return fn
    return register


def resolve_defects(spec: Any) -> Tuple[str, ...]:
    """Defect names from ``"all"`` or a comma-separated list / sequence (registry order).

    Raises:
        ConfigError: an unknown name, listing the valid ones.
    """
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    chosen: List[str] = []
    for item in items:
        name = str(item).strip().lower()
        if not name:
            continue
        if name == "all":
            chosen.extend(DEFECTS)
        elif name in DEFECTS:
            chosen.append(name)
        else:
            raise ConfigError(f"unknown defect {str(item).strip()!r}; valid: all or a "
                              f"comma-separated list of {', '.join(DEFECTS)}")
    if not chosen:
        raise ConfigError(f"no defect given; valid: all or a comma-separated list of "
                          f"{', '.join(DEFECTS)}")
    return tuple(n for n in DEFECTS if n in chosen)


def _batchnorms(model: nn.Module, group: LayerGroup) -> List[Tuple[str, nn.Module]]:
    buffers = set(group.buffer_names)
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and f"{name}.running_mean" in buffers and m.running_mean is not None]


def applicable(model: nn.Module, group: LayerGroup, defect: str) -> bool:
    """Whether ``defect`` can be planted in ``group`` (``bnstats`` needs BatchNorm layers)."""
    return DEFECTS[defect].applies(model, group)


def _generator(seed: int, *keys: str) -> torch.Generator:
    """A generator seeded from ``seed`` and the case's names (stable across runs)."""
    text = "/".join(keys)
    mixed = seed * 1_000_003 + sum((i + 1) * ord(c) for i, c in enumerate(text))
    return torch.Generator().manual_seed(mixed % (2 ** 63))


def _fresh_init(model: nn.Module, group: LayerGroup, seed: int) -> Dict[str, torch.Tensor]:
    """The group's parameters after ``reset_parameters`` of a copy of its modules (seeded)."""
    fresh = copy.deepcopy(model)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(int(_generator(seed, "reinit", group.name).initial_seed()) % (2 ** 31))
        owners = {p.rsplit(".", 1)[0] for p in group.parameter_names if "." in p}
        for name, module in fresh.named_modules():
            if name in owners and hasattr(module, "reset_parameters"):
                module.reset_parameters()
    finally:
        torch.random.set_rng_state(state)
    params = dict(fresh.named_parameters())
    return {p: params[p].detach().clone() for p in group.parameter_names}


@dataclass(frozen=True)
class SwapData:
    """Images and labels for the ``labelswap`` fine-tune, and the swapped class pair."""

    images: torch.Tensor
    labels: torch.Tensor
    pair: Tuple[int, int]


def swap_pair(labels: torch.Tensor, seed: int) -> Tuple[int, int]:
    """Two distinct classes present in ``labels``, drawn with ``seed``."""
    present = torch.unique(labels).tolist()
    if len(present) < 2:
        raise ConfigError("the labelswap defect needs at least two classes in the probe")
    rng = np.random.default_rng(seed + 104729)
    a, b = rng.choice(len(present), size=2, replace=False)
    return int(present[int(a)]), int(present[int(b)])


def _labelswap_direction(model: nn.Module, group: LayerGroup, data: SwapData, *, seed: int,
                         steps: int, batch_size: int, lr: float, device: str
                         ) -> Dict[str, torch.Tensor]:
    """``t_ft - t0`` of the group alone fine-tuned on ``data`` with its pair's labels swapped.

    The fine-tune runs in float64. Adam divides each step by the gradient's own running scale,
    so over its 30 steps float32 summation-order differences grew into a 2% different
    direction between 1 and 2 threads (and a planted severity of 0.253 against 0.236); in
    float64 the direction was the same to the last bit across thread counts and CPU kernels
    (``python -m bench numerics``). The direction is cast back to each tensor's dtype.
    """
    work = copy.deepcopy(model).to(device).double().eval()
    chosen = set(group.parameter_names)
    trainable = []
    for name, p in work.named_parameters():
        p.requires_grad_(name in chosen)
        if name in chosen:
            trainable.append(p)
    a, b = data.pair
    swapped = data.labels.clone()
    swapped[data.labels == a] = b
    swapped[data.labels == b] = a
    # Half of each batch from the two swapped classes (the defect), half from the rest (so the
    # group does not simply forget the other classes): a targeted, trained-in fault.
    pair_idx = torch.nonzero((data.labels == a) | (data.labels == b)).flatten()
    rest_idx = torch.nonzero((data.labels != a) & (data.labels != b)).flatten()
    gen = _generator(seed, "labelswap", group.name)
    opt = torch.optim.Adam(trainable, lr=lr)
    base = {n: p.detach().clone() for n, p in work.named_parameters() if n in chosen}
    for _ in range(steps):
        half = batch_size // 2 if len(rest_idx) else batch_size
        idx = pair_idx[torch.randint(len(pair_idx), (half,), generator=gen)]
        if len(rest_idx) and batch_size - half:
            idx = torch.cat([idx, rest_idx[torch.randint(len(rest_idx), (batch_size - half,),
                                                         generator=gen)]])
        x, y = data.images[idx].to(device), swapped[idx].to(device)
        x = x.double() if x.is_floating_point() else x  # token ids stay integers
        loss = F.cross_entropy(work(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {n: (p.detach() - base[n]).cpu() for n, p in work.named_parameters() if n in chosen}


# ------------------------------------------------------------------------------------------
# The defects (registry order: noise, reinit, labelswap, bnstats)


@register_defect("noise", bounded=False, start=0.25,
                 description="Gaussian weight noise relative to each tensor's RMS")
def _noise(case: PlantCase) -> Damage:
    base = case.floats()
    return Damage(base, {p: t0.pow(2).mean().sqrt() * torch.randn(t0.shape, generator=case.gen)
                         .to(t0) for p, t0 in base.items()})


@register_defect("reinit", bounded=True, start=1.0,
                 description="interpolation toward a fresh random initialisation")
def _reinit(case: PlantCase) -> Damage:
    base = case.floats()
    fresh = _fresh_init(case.model, case.group, case.seed)
    return Damage(base, {p: fresh[p].to(t0) - t0 for p, t0 in base.items()})


@register_defect("labelswap", bounded=True, start=1.0,
                 description="the group alone fine-tuned on two classes with swapped labels")
def _labelswap(case: PlantCase) -> Damage:
    base = case.floats()
    if case.swap is None:
        raise ConfigError("the labelswap defect needs data to fine-tune on")
    delta = _labelswap_direction(case.model, case.group, case.swap, seed=case.seed,
                                 steps=case.swap_steps, batch_size=case.swap_batch,
                                 lr=case.swap_lr, device=case.device)
    return Damage(base, {p: delta[p].to(t0) for p, t0 in base.items()},
                  details={"pair": list(case.swap.pair), "steps": case.swap_steps,
                           "lr": case.swap_lr, "batch_size": case.swap_batch})


@register_defect("bnstats", bounded=False, start=0.5,
                 description="shifted running statistics of the group's BatchNorm layers",
                 applies=lambda model, group: bool(_batchnorms(model, group)),
                 needs="BatchNorm layer")
def _bnstats(case: PlantCase) -> Damage:
    damage = Damage()
    for name, m in _batchnorms(case.work, case.group):
        mean, var = m.running_mean.detach().clone(), m.running_var.detach().clone()
        damage.base[f"{name}.running_mean"] = mean
        damage.base[f"{name}.running_var"] = var
        z1 = torch.randn(mean.shape, generator=case.gen).to(mean)
        z2 = torch.randn(var.shape, generator=case.gen).to(var)
        damage.direction[f"{name}.running_mean"] = (var + m.eps).sqrt() * z1
        damage.log_scale[f"{name}.running_var"] = z2
    return damage


class Planter:
    """Plants one defect in one group of a working copy of ``model`` at any severity.

    The random directions (noise, fresh initialisation, fine-tune displacement) are drawn once
    at construction, so :meth:`apply` is deterministic in the severity and costs only tensor
    copies. The caller's ``model`` is never modified.
    """

    def __init__(self, model: nn.Module, group: LayerGroup, defect: str, *, seed: int = 0,
                 swap: Optional[SwapData] = None, device: str = "cpu",
                 swap_steps: int = 30, swap_batch: int = 32, swap_lr: float = 1e-2) -> None:
        if defect not in DEFECTS:
            resolve_defects(defect)
        if not applicable(model, group, defect):
            raise ConfigError(f"the {defect} defect does not apply to group {group.name!r} "
                              f"(it has no {DEFECTS[defect].needs})")
        self.group, self.defect, self.seed = group, defect, seed
        self.spec = DEFECTS[defect]
        self.model = copy.deepcopy(model).to(device).eval()
        damage = self.spec.damage(PlantCase(model, self.model, group, seed,
                                            _generator(seed, defect, group.name), swap, device,
                                            swap_steps, swap_batch, swap_lr))
        self._base, self._direction = damage.base, damage.direction
        self._log_scale, self.details = damage.log_scale, damage.details

    def apply(self, severity: float) -> nn.Module:
        """The working copy with the defect at ``severity`` (the same object every call)."""
        state = dict(self.model.named_parameters())
        state.update(dict(self.model.named_buffers()))
        with torch.no_grad():
            for name, base in self._base.items():
                if name in self._log_scale:
                    state[name].copy_(base * torch.exp(severity * self._log_scale[name]))
                elif name in self._direction:
                    state[name].copy_(base + severity * self._direction[name])
        return self.model

    @property
    def max_severity(self) -> float:
        return 1.0 if self.spec.bounded else MAX_SEVERITY
