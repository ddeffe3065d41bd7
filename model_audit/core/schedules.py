"""Momentum from critical damping (the beta schedule), the hybrid schedule and damping regimes.

Heavy-ball SGD ``v <- mu*v + g; theta <- theta - alpha*v`` behaves like a damped oscillator
(Qian 1999). On a quadratic with curvature ``lambda`` it is critically damped when
``mu = (1 - sqrt(alpha*lambda))**2``; to first order in ``sqrt(alpha)`` and with ``lambda = 1``
this is the paper's schedule ``mu(t) = 1 - 2*sqrt(alpha(t))``: no free parameter, the momentum
follows the learning rate.

The damping ratio of one step is ``zeta = (1 - mu) / (2*sqrt(alpha))``: ``zeta < 1`` is
underdamped (the momentum is larger than critical: oscillation), ``zeta > 1`` overdamped
(smaller than critical: sluggish), ``zeta == 1`` critical. The beta schedule gives ``zeta = 1``
by construction except where the momentum is clipped.

Examples:
    >>> round(beta_momentum(0.01), 4)
    0.8
    >>> damping_regime(0.9, 0.1)
    'underdamped'
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Union

from ..errors import ConfigError

#: Upper clip of the beta momentum. As alpha -> 0 the formula tends to 1, where heavy ball no
#: longer forgets old gradients; 0.999 keeps a finite memory (about 1,000 steps).
DEFAULT_MAX_MOMENTUM = 0.999

#: Relative tolerance of "critical": |zeta - 1| <= 0.05 counts as critically damped. The
#: formula is a first-order approximation, so a few percent either side is within its accuracy.
DEFAULT_CRITICAL_TOLERANCE = 0.05

#: Constant momentum of the hybrid schedule's late phase (the usual SGD default).
DEFAULT_HYBRID_MOMENTUM = 0.9

REGIMES = ("underdamped", "critical", "overdamped")


def _check_lr(lr: float) -> float:
    lr = float(lr)
    if not math.isfinite(lr) or lr < 0:
        raise ConfigError(f"learning rate must be a finite number >= 0, got {lr!r}")
    return lr


def beta_momentum(lr: float, max_momentum: float = DEFAULT_MAX_MOMENTUM) -> float:
    """Critical-damping momentum ``clip(1 - 2*sqrt(lr), 0, max_momentum)``.

    Args:
        lr: the current learning rate ``alpha`` (>= 0).
        max_momentum: upper clip, in (0, 1).

    Returns:
        The momentum. For ``lr >= 0.25`` the formula is <= 0 and the result is 0 (plain SGD).

    Raises:
        ConfigError: for a negative or non-finite learning rate or a bad clip.

    Examples:
        >>> [round(beta_momentum(a), 2) for a in (0.1, 0.01, 0.0025)]
        [0.37, 0.8, 0.9]
    """
    lr = _check_lr(lr)
    if not 0.0 < max_momentum < 1.0:
        raise ConfigError(f"max_momentum must be in (0, 1), got {max_momentum!r}")
    return min(max(1.0 - 2.0 * math.sqrt(lr), 0.0), max_momentum)


def crossover_lr(momentum: float) -> float:
    """The learning rate at which the beta schedule reaches ``momentum``: ``((1-mu)/2)**2``."""
    return ((1.0 - momentum) / 2.0) ** 2


def hybrid_momentum(
    lr: float,
    *,
    switched: bool = False,
    constant: float = DEFAULT_HYBRID_MOMENTUM,
    max_momentum: float = DEFAULT_MAX_MOMENTUM,
) -> float:
    """Hybrid schedule: beta momentum early, constant momentum late.

    The switch point is parameter-free: the hybrid follows the beta schedule until the beta
    momentum reaches ``constant`` (at ``lr = crossover_lr(constant)``, 0.0025 for 0.9) and keeps
    ``constant`` from then on. With a decreasing learning rate this is
    ``min(beta_momentum(lr), constant)``; ``switched=True`` (set by
    :class:`MomentumScheduler` once the crossover happened) keeps the constant even if a
    warm restart raises the learning rate again.

    Examples:
        >>> round(hybrid_momentum(0.01), 2), hybrid_momentum(0.0001)
        (0.8, 0.9)
    """
    if not 0.0 <= constant < 1.0:
        raise ConfigError(f"hybrid constant momentum must be in [0, 1), got {constant!r}")
    beta = beta_momentum(lr, max_momentum)
    if switched or beta >= constant:
        return constant
    return beta


def damping_ratio(momentum: float, lr: float) -> float:
    """Damping ratio ``zeta = (1 - momentum) / (2*sqrt(lr))``; ``inf`` for ``lr == 0``."""
    lr = _check_lr(lr)
    if not 0.0 <= momentum <= 1.0:
        raise ConfigError(f"momentum must be in [0, 1], got {momentum!r}")
    if lr == 0.0:
        return math.inf
    return (1.0 - momentum) / (2.0 * math.sqrt(lr))


def damping_regime(
    momentum: float, lr: float, tolerance: float = DEFAULT_CRITICAL_TOLERANCE
) -> str:
    """Classify one step as ``underdamped``, ``critical`` or ``overdamped``.

    ``critical`` when ``|zeta - 1| <= tolerance``; otherwise ``underdamped`` for ``zeta < 1``
    and ``overdamped`` for ``zeta > 1``.

    Examples:
        >>> damping_regime(beta_momentum(0.01), 0.01), damping_regime(0.5, 0.0001)
        ('critical', 'overdamped')
    """
    if tolerance < 0:
        raise ConfigError(f"tolerance must be >= 0, got {tolerance!r}")
    zeta = damping_ratio(momentum, lr)
    if abs(zeta - 1.0) <= tolerance:
        return "critical"
    return "underdamped" if zeta < 1.0 else "overdamped"


# --------------------------------------------------------------------------------------------
# Registry of momentum schedules: name -> f(lr, state) -> momentum.

MomentumFn = Callable[[float], float]

SCHEDULES = ("beta", "hybrid", "constant")


@dataclass(frozen=True)
class StepRecord:
    """Momentum, learning rate and damping regime of one optimizer step."""

    step: int
    lr: float
    momentum: float
    zeta: float
    regime: str

    def to_dict(self) -> Dict[str, Any]:
        zeta = self.zeta if math.isfinite(self.zeta) else None
        return {"step": self.step, "lr": self.lr, "momentum": self.momentum,
                "zeta": zeta, "regime": self.regime}


def step_record(step: int, lr: float, momentum: float) -> StepRecord:
    """Build the :class:`StepRecord` of one step."""
    return StepRecord(step, float(lr), float(momentum), damping_ratio(momentum, lr),
                      damping_regime(momentum, lr))


class MomentumSchedule:
    """A named momentum schedule with the little state the hybrid needs.

    Args:
        name: ``beta``, ``hybrid`` or ``constant``.
        constant: the constant momentum (for ``constant`` and the hybrid's late phase).
        max_momentum: clip of the beta momentum.
    """

    def __init__(self, name: str = "beta", *, constant: float = DEFAULT_HYBRID_MOMENTUM,
                 max_momentum: float = DEFAULT_MAX_MOMENTUM) -> None:
        if name not in SCHEDULES:
            raise ConfigError(
                f"unknown momentum schedule {name!r}; valid: {', '.join(SCHEDULES)}")
        if not 0.0 <= constant < 1.0:
            raise ConfigError(f"constant momentum must be in [0, 1), got {constant!r}")
        self.name = name
        self.constant = constant
        self.max_momentum = max_momentum
        self.switched = False

    def __call__(self, lr: float) -> float:
        if self.name == "beta":
            return beta_momentum(lr, self.max_momentum)
        if self.name == "constant":
            _check_lr(lr)
            return self.constant
        mu = hybrid_momentum(lr, switched=self.switched, constant=self.constant,
                             max_momentum=self.max_momentum)
        if mu == self.constant:
            self.switched = True
        return mu


class MomentumScheduler:
    """Sets an optimizer's momentum from its current learning rate, every step.

    Works beside any ``torch.optim.lr_scheduler``: call ``lr_scheduler.step()`` first, then
    ``momentum_scheduler.step()``, which reads each param group's ``lr`` and writes
    ``momentum`` (SGD, RMSprop) or ``betas[0]`` (Adam, AdamW, ...). The schedule is applied once
    at construction, so the first step already uses it.

    Args:
        optimizer: a torch optimizer whose param groups have ``momentum`` or ``betas``.
        schedule: ``beta``, ``hybrid``, ``constant``, a :class:`MomentumSchedule`, or any
            callable ``lr -> momentum``.

    Raises:
        ConfigError: when the optimizer has neither ``momentum`` nor ``betas``.

    Examples:
        >>> import torch
        >>> p = torch.nn.Parameter(torch.zeros(1))
        >>> opt = torch.optim.SGD([p], lr=0.01, momentum=0.0)
        >>> ms = MomentumScheduler(opt, "beta")
        >>> round(opt.param_groups[0]["momentum"], 2)
        0.8
    """

    def __init__(self, optimizer: Any,
                 schedule: Union[str, MomentumSchedule, MomentumFn] = "beta") -> None:
        self.optimizer = optimizer
        self.schedule: MomentumFn = (
            MomentumSchedule(schedule) if isinstance(schedule, str) else schedule)
        for i, group in enumerate(optimizer.param_groups):
            if "momentum" not in group and "betas" not in group:
                raise ConfigError(
                    f"{type(optimizer).__name__} param group {i} has neither 'momentum' nor "
                    "'betas'; use SGD, RMSprop or an Adam-family optimizer")
        self.history: List[StepRecord] = []
        self._step = 0
        self._apply()

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            mu = float(self.schedule(group["lr"]))
            if "betas" in group:
                group["betas"] = (mu, group["betas"][1])
            else:
                # torch's SGD reads group["momentum"] on every step (also when it was built
                # with momentum=0), so writing the group is enough.
                group["momentum"] = mu
        first = self.optimizer.param_groups[0]
        mu0 = first["betas"][0] if "betas" in first else first["momentum"]
        self.history.append(step_record(self._step, first["lr"], mu0))

    def step(self) -> None:
        """Read the current learning rates and set the momentum for the next step."""
        self._step += 1
        self._apply()

    def state_dict(self) -> Dict[str, Any]:
        return {"step": self._step,
                "switched": getattr(self.schedule, "switched", False)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._step = int(state["step"])
        if isinstance(self.schedule, MomentumSchedule):
            self.schedule.switched = bool(state.get("switched", False))


def cosine_lr(step: int, total: int, lr_max: float, lr_min: float = 0.0) -> float:
    """Cosine-annealed learning rate at ``step`` of ``total`` (``step`` 0 gives ``lr_max``)."""
    if total <= 1:
        return lr_max
    frac = min(max(step / (total - 1), 0.0), 1.0)
    return lr_min + 0.5 * (lr_max - lr_min) * (1.0 + math.cos(math.pi * frac))


__all__ = [
    "DEFAULT_CRITICAL_TOLERANCE", "DEFAULT_HYBRID_MOMENTUM", "DEFAULT_MAX_MOMENTUM", "REGIMES",
    "SCHEDULES", "MomentumSchedule", "MomentumScheduler", "StepRecord", "beta_momentum",
    "cosine_lr", "crossover_lr", "damping_ratio", "damping_regime", "hybrid_momentum",
    "step_record",
]
