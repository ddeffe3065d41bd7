"""Established per-layer-group attribution baselines, shown beside the tool's own metric.

The own metric (:mod:`model_audit.core.attribution`) measures how much of the misclassified images'
loss each layer group is responsible for. This package computes, on the same misclassified
images and the same groups, the scores that established methods give, so a report can show
how far they agree (:func:`agreement`). It is the only part of the package that imports
captum (its public API only: ``captum.attr``).

Modules: this one holds the orchestration (:func:`compute_baselines`, :func:`prepare_layers`);
:mod:`.registry` the registry (:data:`BASELINES`, :func:`~.registry.register_baseline`); one
module per family computes and registers the methods: :mod:`.gradient` (gradient x
activation, activation), :mod:`.path` (conductance, integrated gradients, internal influence),
:mod:`.rgn` (Auto-RGN); :mod:`.ranking` holds :func:`agreement` and :mod:`._utils` the helpers
they share. Adding a baseline is writing one registered function in a family module. Import
the public names from this package.

Baselines (:data:`BASELINES`)
-----------------------------

=========================  ======================================  =====  ====================
name                       method                                  cheap  passes per image
=========================  ======================================  =====  ====================
``grad_x_activation``      captum ``LayerGradientXActivation``     yes    1 fwd + 1 bwd
``activation``             captum ``LayerActivation``              yes    1 fwd
``conductance``            captum ``LayerConductance``'s formula   no     n + 1, all groups
``integrated_gradients``   captum ``LayerIntegratedGradients``     no     2 + n per group
``internal_influence``     captum ``InternalInfluence``'s formula  no     n, all groups
``auto_rgn``               relative gradient norm (Lee et al.)     yes    1 fwd + 1 bwd
=========================  ======================================  =====  ====================

(``n`` = ``n_steps``, 50 by default; fwd + bwd passes unless marked.) Every method but
layer integrated gradients handles every group in one pass (:mod:`.path` says how
conductance and internal influence do). :data:`DEFAULT_BASELINES` is the cheap pair
``grad_x_activation`` and ``auto_rgn``.
The exact counts of every run are in :attr:`BaselineResult.forward_images` and
``backward_images``: every image that goes through the network once counts once, the
``n_steps`` expansion included (a backward pass counts each image whose gradient is propagated
from the logits, however deep it goes). ``seconds`` is each method's own wall time; the setup
shared by all methods (one deep copy of the model and, for the layer methods, one forward pass
of the first batch that counts module calls) is in no method's time or counts.

Aggregation (the same for every layer method)
---------------------------------------------

* **Target: the true label** of each misclassified image, i.e. the class the model fails to
  predict. The attributed quantity is captum's usual one, the *logit* of that class (not the
  predicted class, which would explain the wrong answer instead of the missing right one).
  ``activation`` has no target (it is the magnitude of the layer's output).
* **Layer: the group's module output.** For :func:`~model_audit.core.layers.layer_groups` a group
  name is a module path (``model.get_submodule(name)``); the attribution is taken with respect
  to that module's output (``attribute_to_layer_input=False``). A group that has no module of
  its own, i.e. a bare parameter such as a ViT's ``class_token`` (or, at ``module``
  granularity, a module that owns parameters outside the group, or a module that the forward
  pass never calls), has no layer output to attribute to: it gets ``NaN`` from the layer
  methods and only the Auto-RGN value. ``NaN`` groups are left out of the shares and of
  :func:`agreement` (pairwise).
* **Reduction:** per image, the sum of ``|attribution|`` over all elements of the layer's
  output (absolute values, so that positive and negative evidence do not cancel: a group is
  involved in an error whichever way it pushes); per group, the mean of that over the images;
  finally the groups' values are normalised to **shares that sum to 1** over the groups, the
  scale on which the own metric reports its responsibility shares. The un-normalised means are
  kept in :attr:`BaselineResult.raw`.
* **Baseline input and memory** of the path methods: see :mod:`.path` (zeros in the
  normalised input space, Gauss-Legendre quadrature with ``n_steps`` points, at most
  ``internal_batch_size`` images per forward).

Auto-RGN (:mod:`.rgn`) is ``||g_G||_2 / ||w_G||_2`` of the misclassified images' mean
cross-entropy per group, normalised to shares like the others.

Correctness on real architectures
---------------------------------

The layer methods run on a deep copy of the model in eval mode in which every group's module
returns a clone of its output (so in-place successors such as torchvision's ReLUs and
``out += identity`` cannot touch what captum hooked) and a group module called more than once
per forward pass is refused with a :class:`BaselineError`; :mod:`._utils` says why.

The caller's model is never modified: its parameters and buffers, train/eval mode and hooks
are the same afterwards, also when an error is raised midway.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from . import gradient, path, rgn
from .. import distributed
from .._progress import progress_bar
from ..core.layers import LayerGroup
from ..errors import ConfigError
from ._utils import (BaselineError, _abs_sum, _call_counts, _check_settings, _count_images,
                     _Counter, _group_module, _len, _protect, _shares)
from .path import _shared_path_totals
from .ranking import Agreement, agreement
from .registry import BASELINES, BaselineSpec
from .rgn import auto_rgn_settings

__all__ = [
    "BASELINES", "DEFAULT_BASELINES", "Agreement", "BaselineError", "BaselineResult",
    "BaselineSpec", "REDUCTION_DOC", "TARGET_DOC", "agreement", "compute_baselines",
    "prepare_layers", "resolve_baselines",
    # private helpers that bench/baselines_bench.py imports from here
    "_Counter", "_abs_sum", "_shared_path_totals",
]

#: The families register their baselines when imported: this order is the registry's.
_FAMILIES = (gradient, path, rgn)

TARGET_DOC = "true label of each misclassified image (logit of that class)"
REDUCTION_DOC = ("per group: mean over images of sum(|attribution|) over the group module's "
                 "output elements, normalised to shares summing to 1 over the groups")


#: The cheap default set: one forward and one backward pass over the misclassified images each.
DEFAULT_BASELINES: Tuple[str, ...] = ("grad_x_activation", "auto_rgn")

_KEYWORDS = ("all", "none", "default")


def resolve_baselines(spec: Union[None, str, Sequence[str]]) -> Tuple[str, ...]:
    """Baseline names from ``"all"``, ``"none"``, ``"default"`` or a comma-separated list.

    Keywords may be mixed with names (``"default,conductance"``); names are matched
    case-insensitively, ``-`` counts as ``_``, duplicates are dropped and the registry's order
    is kept. ``None`` or an empty string means none.

    Raises:
        ConfigError: an unknown name, listing the valid ones.
    """
    if spec is None:
        return ()
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    chosen: List[str] = []
    for item in items:
        name = str(item).strip().lower().replace("-", "_")
        if not name or name == "none":
            continue
        if name == "all":
            chosen.extend(BASELINES)
        elif name == "default":
            chosen.extend(DEFAULT_BASELINES)
        elif name in BASELINES:
            chosen.append(name)
        else:
            raise ConfigError(
                f"unknown baseline {str(item).strip()!r}; valid: {', '.join(_KEYWORDS)} or a "
                f"comma-separated list of {', '.join(BASELINES)}")
    return tuple(n for n in BASELINES if n in chosen)


@dataclass(frozen=True)
class BaselineResult:
    """One baseline's per-group scores (shares, same order as the groups) and its cost."""

    name: str
    scores: np.ndarray          # share per group, sums to 1 over the finite ones; NaN: no layer
    forward_images: int         # images x forward passes (n_steps expansion included)
    backward_images: int        # images x backward passes
    seconds: float              # wall time
    settings: Dict[str, Any]    # target, reduction, n_steps, baseline input, ...
    raw: np.ndarray = field(default_factory=lambda: np.zeros(0))  # un-normalised group values

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "title": BASELINES[self.name].title if self.name in BASELINES
                else self.name,
                "scores": _json_floats(self.scores), "raw": _json_floats(self.raw),
                "forward_images": int(self.forward_images),
                "backward_images": int(self.backward_images),
                "seconds": round(float(self.seconds), 4), "settings": dict(self.settings)}


def _json_floats(values: np.ndarray) -> List[Optional[float]]:
    """Floats for JSON: NaN/Inf become ``None`` (the report writer refuses NaN)."""
    return [float(v) if math.isfinite(float(v)) else None for v in np.asarray(values).ravel()]


# ------------------------------------------------------------------------------------------
# Computation


def prepare_layers(net: nn.Module, groups: Sequence[LayerGroup],
                   x: torch.Tensor) -> Dict[int, nn.Module]:
    """Make ``net`` (a copy, in eval mode) ready for the layer methods; its group modules.

    Freezes the parameters (the layer methods take gradients w.r.t. layer outputs only),
    refuses a group module that runs more than once per forward pass of ``x``, and wraps every
    group module in a :class:`~._utils._CloneOutput` (in place, in ``net``).

    Returns:
        ``{group index: module}`` for the groups that have a layer (see
        :func:`~._utils._group_module`).

    Raises:
        BaselineError: a group module is called more than once per forward pass.
    """
    for p in net.parameters():
        p.requires_grad_(False)  # gradients w.r.t. layer outputs only
    modules = {j: m for j, m in ((j, _group_module(net, g)) for j, g in enumerate(groups))
               if m is not None}
    counts = _call_counts(net, modules, x)
    reused = [f"{groups[j].name} ({type(modules[j]).__name__}, called {c} times)"
              for j, c in counts.items() if c > 1]
    if reused:
        raise BaselineError(
            "the layer baselines cannot attribute to a module that runs more than once per "
            f"forward pass (captum records only its last call): {', '.join(reused)}. Use "
            "another layer granularity, or run only the auto_rgn baseline")
    layers = {j: m for j, m in modules.items() if counts[j] == 1}
    _protect(net, layers, {j: groups[j].name for j in layers})
    return layers


@dataclass(frozen=True)
class _Run:
    """What the methods of one :func:`compute_baselines` call share."""

    net: nn.Module              # the deep copy, in eval mode
    groups: Sequence[LayerGroup]
    batches: Iterable[Tuple[Any, torch.Tensor, torch.Tensor]]
    device: str
    progress: bool
    n: int                      # images
    batch_size: int             # the largest batch
    ibs: int                    # internal batch size of the path methods
    n_steps: int


def compute_baselines(model: nn.Module, batches: Iterable[Tuple[Any, torch.Tensor, torch.Tensor]],
                      groups: Sequence[LayerGroup], names: Union[str, Sequence[str]], *,
                      device: str = "cpu", progress: bool = False,
                      internal_batch_size: Optional[int] = None,
                      n_steps: int = 50,
                      grad_sq: Optional[Dict[str, float]] = None) -> Dict[str, BaselineResult]:
    """Per-group scores of the baselines ``names`` on the misclassified images in ``batches``.

    Args:
        model: the classifier (not modified: the work happens on a deep copy in eval mode).
        batches: re-iterable ``(positions, images, labels)`` batches of the misclassified
            images (a :class:`~model_audit.io.probe.BatchCache`).
        groups: the layer groups (:func:`~model_audit.core.layers.layer_groups`).
        names: baseline names, or a spec for :func:`resolve_baselines`.
        device: where to compute.
        progress: show a progress bar per method.
        internal_batch_size: most images per forward of the path methods (images x steps);
            default the batch size of ``batches``.
        n_steps: integration steps of the path methods.
        grad_sq: per parameter, the squared norm of the mean error-loss gradient at the
            checkpoint, when the caller has it (the replay's
            :attr:`~model_audit.core.replay.ReplayResult.initial_grad_sq`): Auto-RGN then takes no
            pass of its own, and reports 0 passes and the time of its arithmetic.

    Returns:
        ``{name: BaselineResult}`` in the registry's order; scores in the order of ``groups``.

    Raises:
        ConfigError: unknown baseline, ``n_steps`` or ``internal_batch_size`` < 1.
        BaselineError: no images, or a group module called more than once per forward pass.
    """
    chosen = resolve_baselines(names if isinstance(names, str) else list(names))
    if not chosen:
        return {}
    _check_settings(n_steps, internal_batch_size)
    n, batch_size, first = _count_images(batches, sharded=getattr(batches, "sharded", False))
    ibs = int(internal_batch_size or getattr(batches, "batch_size", None) or batch_size)
    layer_names = [name for name in chosen if BASELINES[name].needs_layer]
    run = _Run(copy.deepcopy(model).to(device).eval(), groups, batches, device, progress, n,
               batch_size, ibs, n_steps)
    # parameter methods first: they read the parameters under their own names, which the layer
    # methods' preparation changes (it wraps the group modules)
    results = {name: _run_parameter_method(name, run, grad_sq)
               for name in chosen if not BASELINES[name].needs_layer}
    if layer_names:
        layers = prepare_layers(run.net, groups, first.to(device))
        for name in layer_names:
            results[name] = _run_layer_method(name, run, layers)
    return {name: results[name] for name in chosen}


def _run_parameter_method(name: str, run: _Run,
                          grad_sq: Optional[Dict[str, float]]) -> BaselineResult:
    """A method without a layer (Auto-RGN, the only one): a value per group from the gradient
    w.r.t. the parameters (or from ``grad_sq``)."""
    counter = _Counter()
    t0 = time.perf_counter()
    raw = BASELINES[name].compute(run.net, run.groups, run.batches, run.device, counter, run.n,
                                  run.progress, grad_sq)
    return BaselineResult(name, _shares(raw), counter.forward, counter.backward,
                          time.perf_counter() - t0,
                          auto_rgn_settings(run.n, grad_sq is not None), raw)


def _run_layer_method(name: str, run: _Run, layers: Dict[int, nn.Module]) -> BaselineResult:
    """A layer method over all the batches: the mean per-image sum per group, as shares."""
    counter = _Counter()
    forward = counter.wrap(run.net)
    totals = np.zeros(len(run.groups))
    t0 = time.perf_counter()
    if layers:
        compute = BASELINES[name].compute
        sharded = getattr(run.batches, "sharded", False)
        with torch.enable_grad(), distributed.agree(sharded):
            for _, x, y in progress_bar(run.batches, total=_len(run.batches),
                                        desc=f"baseline {name}", enabled=run.progress):
                x, y = x.to(run.device), y.to(run.device).long()
                for j, s in compute(forward, layers, x, y, run.n_steps, run.ibs).items():
                    totals[j] += float(s.sum())
        if sharded:  # every rank's shard: the sums over all the images
            summed = torch.from_numpy(totals)
            distributed.all_reduce_sum([summed])
            totals = summed.numpy()
        _sum_counts(counter, run.batches)
    raw = np.full(len(run.groups), np.nan)
    for j in layers:
        raw[j] = totals[j] / run.n
    settings = _layer_settings(name, run, layers)
    return BaselineResult(name, _shares(raw), counter.forward, counter.backward,
                          time.perf_counter() - t0, settings, raw)


def _sum_counts(counter: _Counter, batches: Any) -> None:
    """The passes of every rank (a sharded cache): the cost of the whole computation."""
    if getattr(batches, "sharded", False):
        forward, backward = distributed.sum_values(counter.forward, counter.backward)
        counter.forward, counter.backward = int(forward), int(backward)


def _layer_settings(name: str, run: _Run, layers: Dict[int, nn.Module]) -> Dict[str, Any]:
    """The settings a layer method reports (:attr:`BaselineResult.settings`)."""
    spec = BASELINES[name]
    steps = spec.uses_steps
    return {
        "target": None if name == "activation" else TARGET_DOC,
        "reduction": REDUCTION_DOC,
        "layer": "output of the group's module",
        "n_steps": run.n_steps if steps else None,
        "baseline_input": "zeros (normalised input space)" if steps else None,
        "internal_batch_size": (None if not steps else max(run.ibs, run.batch_size)
                                if name == "integrated_gradients" else
                                max(run.ibs, 2 if name == "conductance" else 1)),
        "groups_per_pass": "one" if name == "integrated_gradients" else "all",
        "captum_class": spec.captum_class, "images": run.n,
        "groups_without_layer": [run.groups[j].name for j in range(len(run.groups))
                                 if j not in layers]}
