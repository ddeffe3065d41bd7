"""The baselines' registry: each baseline is its compute function, registered with
:func:`register_baseline` and its properties (cheap or not, whether it needs the group's layer
output, whether it scales the input). Adding a baseline is writing one such function in a
family module (:mod:`.gradient`, :mod:`.path`, :mod:`.rgn`); :mod:`model_audit.baselines`
imports the families, so the registry holds them in that order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional


@dataclass(frozen=True)
class BaselineSpec:
    """A registered baseline: what it computes, whether it is cheap, and the function doing it.

    ``compute`` of a layer method (``captum_class`` set) returns, for one batch, each group's
    per-image sums of ``|attribution|``: ``compute(forward, layers, x, y, n_steps,
    internal_batch_size) -> {group index: tensor}`` (e.g.
    :func:`.gradient.grad_x_activation_totals`). ``compute`` of Auto-RGN, the parameter method
    (``captum_class`` None), returns the raw value of every group over all the batches
    (:func:`.rgn._auto_rgn`).
    """

    name: str
    title: str
    cheap: bool                 # part of the default set: one pass over the errors
    uses_steps: bool            # costs n_steps passes per image (path methods)
    captum_class: Optional[str]  # None: computed without captum
    description: str
    compute: Callable[..., Any] = field(repr=False, compare=False)
    #: evaluates the network at scaled inputs ``a * x`` (a path from zeros in input space):
    #: impossible for integer inputs such as token ids
    scales_input: bool = False

    @property
    def needs_layer(self) -> bool:
        """A layer method: attributes to the output of the group's module."""
        return self.captum_class is not None

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "title": self.title, "cheap": self.cheap,
                "uses_steps": self.uses_steps, "captum_class": self.captum_class,
                "description": self.description}


#: Every baseline by name, in registration order (the order ``all`` and the outputs list them).
BASELINES: Dict[str, BaselineSpec] = {}

Compute = Callable[..., Any]


def register_baseline(name: str, title: str, *, cheap: bool, uses_steps: bool,
                      captum_class: Optional[str], description: str,
                      scales_input: bool = False) -> Callable[[Compute], Compute]:
    """Register ``fn`` as the baseline ``name`` (see :class:`BaselineSpec` for the signature
    of a layer method's and of a parameter method's function)."""
    def register(fn: Compute) -> Compute:
        BASELINES[name] = BaselineSpec(name, title, cheap, uses_steps, captum_class,
                                       description, fn, scales_input=scales_input)
        return fn
    return register
