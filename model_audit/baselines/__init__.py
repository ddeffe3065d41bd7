"""Established per-layer-group attribution baselines, shown beside the tool's own metric.

The own metric (:mod:`model_audit.core.attribution`) measures how much of the misclassified images'
loss each layer group is responsible for. This module computes, on the same misclassified
images and the same groups, the scores that established methods give, so a report can show
how far they agree (:func:`agreement`). It is the only module of the package that imports
captum, and it imports it lazily (inside the functions), so ``import model_audit`` stays fast.

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
layer integrated gradients handles every group in one pass. Conductance and internal
influence evaluate the network along the *input* path and need, at each point, the gradient
of the target w.r.t. a layer's output: one backward pass gives it for every group's output, so
:func:`_shared_path_totals` computes all groups together with captum's arithmetic (its
Gauss-Legendre points and weights; the tests check the numbers against captum's
``LayerConductance`` and ``InternalInfluence`` run one layer at a time, which costs the group
count times as many passes). Layer integrated gradients interpolates *at* the layer, so it runs
captum's class once per group. :data:`DEFAULT_BASELINES` is the cheap pair
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

Auto-RGN
--------

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

Correctness on real architectures
---------------------------------

captum reads a layer through forward hooks on its module. torchvision's ResNets call one
``relu`` module twice per block, use in-place ReLU and ``out += identity``; MobileNet uses
in-place Hardswish/ReLU. Everything runs on a deep copy of the model in eval mode in which

* every group's module is replaced in its parent by a transparent wrapper that calls the
  original module and returns a *clone* of its output, so no later in-place operation can touch
  what captum hooked (captum hooks the original module object inside the wrapper). captum's own
  hooks already clone for the gradient methods, but ``LayerIntegratedGradients`` substitutes the
  layer's output by its interpolated leaf tensors, and an in-place successor (e.g. the in-place
  ``relu`` after ``bn1`` in a ResNet) then fails with "a leaf Variable that requires grad is
  being used in an in-place operation"; and
* a group module that is called more than once per forward pass (captum records only its last
  call) is detected, by counting calls with temporary forward hooks over one batch (removed
  afterwards), and refused with a :class:`BaselineError` naming it.

The caller's model is never modified: its parameters and buffers, train/eval mode and hooks
are the same afterwards, also when an error is raised midway.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._progress import progress_bar
from ..core.stats import kendall_tau_b, rankdata, spearman  # noqa: F401 (re-exported)
from ..errors import ConfigError, ReplayError
from ..core.layers import LayerGroup
TARGET_DOC = "true label of each misclassified image (logit of that class)"
REDUCTION_DOC = ("per group: mean over images of sum(|attribution|) over the group module's "
                 "output elements, normalised to shares summing to 1 over the groups")


class BaselineError(ReplayError):
    """A baseline attribution cannot run (e.g. a group module is called twice per forward)."""


@dataclass(frozen=True)
class BaselineSpec:
    """A registered baseline: what it computes and whether it is cheap."""

    name: str
    title: str
    cheap: bool                 # part of the default set: one pass over the errors
    uses_steps: bool            # costs n_steps passes per image (path methods)
    captum_class: Optional[str]  # None: computed without captum
    description: str

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "title": self.title, "cheap": self.cheap,
                "uses_steps": self.uses_steps, "captum_class": self.captum_class,
                "description": self.description}


BASELINES: Dict[str, BaselineSpec] = {
    "grad_x_activation": BaselineSpec(
        "grad_x_activation", "Gradient x Activation", True, False, "LayerGradientXActivation",
        "gradient of the true-class logit w.r.t. the group's output, times that output"),
    "activation": BaselineSpec(
        "activation", "Activation", True, False, "LayerActivation",
        "magnitude of the group's output (no target)"),
    "conductance": BaselineSpec(
        "conductance", "Layer Conductance", False, True, "LayerConductance",
        "conductance of the group's output for the true-class logit (Dhamdhere et al. 2018)"),
    "integrated_gradients": BaselineSpec(
        "integrated_gradients", "Layer Integrated Gradients", False, True,
        "LayerIntegratedGradients",
        "integrated gradients of the true-class logit along the group's output (Sundararajan "
        "et al. 2017)"),
    "internal_influence": BaselineSpec(
        "internal_influence", "Internal Influence", False, True, "InternalInfluence",
        "gradient of the true-class logit w.r.t. the group's output, integrated along the input "
        "path (Leino et al. 2018)"),
    "auto_rgn": BaselineSpec(
        "auto_rgn", "Auto-RGN", True, False, None,
        "relative gradient norm ||g||/||w|| of the misclassified images' loss per group "
        "(surgical fine-tuning, Lee et al. 2023)"),
}

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
# Model preparation


def _clone_output(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, tuple) and hasattr(out, "_fields"):  # namedtuple
        return type(out)(*(_clone_output(o) for o in out))
    if isinstance(out, (tuple, list)):
        return type(out)(_clone_output(o) for o in out)
    if isinstance(out, dict):
        return type(out)((k, _clone_output(v)) for k, v in out.items())
    return out


class _CloneOutput(nn.Module):
    """Calls the wrapped module and returns a clone of its output.

    In-place operations after the group (``relu(inplace=True)``, ``out += identity``) then work
    on the clone, never on the tensor captum's hook on the wrapped module saw or substituted.
    Attribute look-ups fall through to the wrapped module, so forward code that reads e.g.
    ``self.fc.in_features`` keeps working, and any arguments are passed on.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return _clone_output(self.inner(*args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)

    def __getitem__(self, idx: Any) -> Any:  # a wrapped container stays indexable
        return self.inner[idx]  # type: ignore[index]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.inner)  # type: ignore[call-overload]

    def __bool__(self) -> bool:  # ``if self.layer:`` must not depend on the wrapped module
        return True


def _group_module(model: nn.Module, group: LayerGroup) -> Optional[nn.Module]:
    """The module whose output is the group's layer, or None (bare parameter, partial module)."""
    try:
        module = model.get_submodule(group.name)
    except AttributeError:
        return None
    if module is model:
        return None
    own = sorted(f"{group.name}.{n}" for n, _ in module.named_parameters())
    return module if own == sorted(group.parameter_names) else None


def _protect(net: nn.Module, modules: Dict[int, nn.Module], names: Dict[int, str]) -> None:
    """Replace every group module in its parent (in ``net``) by a :class:`_CloneOutput`."""
    for i, module in modules.items():
        parent_name, _, child = names[i].rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        if getattr(parent, "_modules", {}).get(child) is not module:
            continue  # reached through another path: captum still hooks it, no clone
        parent._modules[child] = _CloneOutput(module)


def _call_counts(net: nn.Module, modules: Dict[int, nn.Module], x: torch.Tensor) -> Dict[int, int]:
    """How often each module runs in one forward pass (of one batch)."""
    counts = {i: 0 for i in modules}
    handles = []

    def counter(i: int) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            counts[i] += 1
        return hook

    try:
        for i, module in modules.items():
            handles.append(module.register_forward_hook(counter(i)))
        with torch.no_grad():
            net(x)
    finally:
        for handle in handles:
            handle.remove()
    return counts


# ------------------------------------------------------------------------------------------
# Computation


class _Counter:
    """Counts the images that go forward through the network and back from its logits."""

    def __init__(self) -> None:
        self.forward = 0
        self.backward = 0

    def wrap(self, net: nn.Module) -> Callable[..., torch.Tensor]:
        def forward(x: torch.Tensor, *args: Any) -> torch.Tensor:
            out = net(x, *args)
            self.forward += int(x.shape[0])
            if isinstance(out, torch.Tensor) and out.requires_grad:
                out.register_hook(self._on_backward)
            return out
        return forward

    def _on_backward(self, grad: torch.Tensor) -> None:
        self.backward += int(grad.shape[0])


def _abs_sum(attr: Any) -> torch.Tensor:
    """Per-image sum of |attribution| over every element of a layer's output (tensor/tuple)."""
    if isinstance(attr, torch.Tensor):
        a = attr.detach()
        return a.abs().reshape(a.shape[0], -1).sum(1).double().cpu() if a.dim() else \
            a.abs().reshape(1).double().cpu()
    parts = [_abs_sum(a) for a in attr]
    return torch.stack(parts).sum(0)


def _tensors(out: Any) -> List[torch.Tensor]:
    """The tensors of a module's output (a tensor, or tuples/lists/dicts of them), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    return []


def _shares(raw: np.ndarray) -> np.ndarray:
    """``raw / sum(raw)`` over the finite groups (NaN stays NaN; all zeros when nothing is)."""
    finite = np.isfinite(raw)
    total = raw[finite].sum() if finite.any() else 0.0
    out = np.full(raw.shape, np.nan)
    out[finite] = raw[finite] / total if total > 0 else 0.0
    return out


#: Path methods computed for every group in one pass (see :func:`_shared_path_totals`).
SHARED_PATH = ("conductance", "internal_influence")


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
    from captum.attr._utils.approximation_methods import approximation_parameters

    step_sizes_func, alphas_func = approximation_parameters("gausslegendre")
    conductance = name == "conductance"
    alphas = alphas_func(n_steps + 1) if conductance else alphas_func(n_steps)
    weights = None if conductance else step_sizes_func(n_steps)
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
    handles = [layers[i].register_forward_hook(saver(i)) for i in idx]
    try:
        for start in range(0, int(x.shape[0]), per_forward):
            xs, ys = x[start:start + per_forward], y[start:start + per_forward]
            m = int(xs.shape[0])
            totals: Dict[int, Optional[List[torch.Tensor]]] = {i: None for i in idx}
            k = 0
            while True:
                stop = min(k + chunk, points)
                a = torch.tensor(alphas[k:stop], dtype=xs.dtype, device=xs.device)
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
                for i in idx:
                    parts = []
                    for h in saved[i]:
                        g = next(grads)
                        g = torch.zeros_like(h) if g is None else g
                        g = g.reshape(steps, m, *h.shape[1:])
                        if conductance:
                            h = h.detach().reshape(steps, m, *h.shape[1:])
                            parts.append((g[:-1] * (h[1:] - h[:-1])).sum(0))
                        else:
                            w = torch.tensor(weights[k:stop], dtype=g.dtype, device=g.device)
                            parts.append((g * w.view(-1, *([1] * (g.dim() - 1)))).sum(0))
                    totals[i] = parts if totals[i] is None else [
                        t + p for t, p in zip(totals[i], parts)]
                saved.clear()
                if stop >= points:
                    break
                # conductance: the next chunk starts at this one's last point
                k = stop - 1 if conductance else stop
            for i in idx:
                out[i].append(_abs_sum(tuple(totals[i])) if totals[i] else
                              torch.zeros(m, dtype=torch.float64))
    finally:
        for handle in handles:
            handle.remove()
    return {i: torch.cat(out[i]) for i in idx}


def _layer_totals(name: str, forward: Callable[..., torch.Tensor], layers: Dict[int, nn.Module],
                  x: torch.Tensor, y: torch.Tensor, n_steps: int,
                  internal_batch_size: int) -> Dict[int, torch.Tensor]:
    """Per-image |attribution| sums of one batch, for each group with a layer."""
    import captum.attr as ca

    idx = list(layers)
    mods = [layers[i] for i in idx]
    b = int(x.shape[0])
    if name == "grad_x_activation":
        attrs = ca.LayerGradientXActivation(forward, mods).attribute(x, target=y)
        return {i: _abs_sum(a) for i, a in zip(idx, attrs)}
    if name == "activation":
        attrs = ca.LayerActivation(forward, mods).attribute(x)
        return {i: _abs_sum(a) for i, a in zip(idx, attrs)}
    if name in SHARED_PATH:
        return _shared_path_totals(name, forward, layers, x, y, n_steps, internal_batch_size)
    if name != "integrated_gradients":  # pragma: no cover - registry and code list the same
        raise ConfigError(f"unknown layer baseline {name!r}")
    # Layer IG interpolates *at* the layer, so every group needs passes of its own.
    return {i: _abs_sum(ca.LayerIntegratedGradients(forward, module).attribute(
        x, target=y, n_steps=n_steps, internal_batch_size=max(internal_batch_size, b)))
        for i, module in layers.items()}


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
    names = list(params)
    grads = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in params.items()}
    with torch.enable_grad():
        for _, x, y in progress_bar(batches, total=_len(batches), desc="baseline auto_rgn",
                                    enabled=progress):
            x, y = x.to(device), y.to(device)
            logits = net(x).float()
            counter.forward += int(x.shape[0])
            loss = F.cross_entropy(logits, y, reduction="sum")
            chunk = torch.autograd.grad(loss, [params[k] for k in names], allow_unused=True)
            counter.backward += int(x.shape[0])
            for k, g in zip(names, chunk):
                if g is not None:
                    grads[k] += g.double()
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


def _len(batches: Iterable) -> Optional[int]:
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return None


def prepare_layers(net: nn.Module, groups: Sequence[LayerGroup],
                   x: torch.Tensor) -> Dict[int, nn.Module]:
    """Make ``net`` (a copy, in eval mode) ready for the layer methods; its group modules.

    Freezes the parameters (the layer methods take gradients w.r.t. layer outputs only),
    refuses a group module that runs more than once per forward pass of ``x``, and wraps every
    group module in a :class:`_CloneOutput` (in place, in ``net``).

    Returns:
        ``{group index: module}`` for the groups that have a layer (see :func:`_group_module`).

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
    if n_steps < 1:
        raise ConfigError(f"baseline n_steps must be >= 1, got {n_steps}")
    if internal_batch_size is not None and internal_batch_size < 1:
        raise ConfigError(f"internal batch size must be >= 1, got {internal_batch_size}")
    n = 0
    first: Optional[torch.Tensor] = None
    batch_size = 0
    for _, x, _ in batches:
        n += int(x.shape[0])
        batch_size = max(batch_size, int(x.shape[0]))
        if first is None and len(x):
            first = x
    if n == 0 or first is None:
        raise BaselineError("no misclassified images: there is nothing for the baselines to "
                            "attribute")
    ibs = int(internal_batch_size or getattr(batches, "batch_size", None) or batch_size)

    if any(BASELINES[name].captum_class for name in chosen):
        import captum.attr  # noqa: F401  (imported here so that no method's time includes it)
    net = copy.deepcopy(model).to(device).eval()
    results: Dict[str, BaselineResult] = {}
    if "auto_rgn" in chosen:
        counter = _Counter()
        t0 = time.perf_counter()
        raw = _auto_rgn(net, groups, batches, device, counter, n, progress, grad_sq)
        results["auto_rgn"] = BaselineResult(
            "auto_rgn", _shares(raw), counter.forward, counter.backward,
            time.perf_counter() - t0,
            {"target": "true label (mean cross-entropy of the misclassified images)",
             "reduction": "||grad_G||_2 / ||w_G||_2 over the group's parameters as one vector, "
                          "normalised to shares summing to 1 over the groups",
             "n_steps": None, "baseline_input": None, "images": n,
             "gradient": "the replay's first step (no pass of its own)" if grad_sq is not None
             else "one forward and backward pass over the images"}, raw)
    layer_names = [name for name in chosen if BASELINES[name].captum_class]
    if layer_names:
        layers = prepare_layers(net, groups, first.to(device))
        for name in layer_names:
            counter = _Counter()
            forward = counter.wrap(net)
            totals = np.zeros(len(groups))
            t0 = time.perf_counter()
            if layers:
                with torch.enable_grad():
                    for _, x, y in progress_bar(batches, total=_len(batches),
                                                desc=f"baseline {name}", enabled=progress):
                        x, y = x.to(device), y.to(device).long()
                        for j, s in _layer_totals(name, forward, layers, x, y, n_steps,
                                                  ibs).items():
                            totals[j] += float(s.sum())
            raw = np.full(len(groups), np.nan)
            for j in layers:
                raw[j] = totals[j] / n
            spec = BASELINES[name]
            steps = spec.uses_steps
            settings: Dict[str, Any] = {
                "target": None if name == "activation" else TARGET_DOC,
                "reduction": REDUCTION_DOC,
                "layer": "output of the group's module",
                "n_steps": n_steps if steps else None,
                "baseline_input": "zeros (normalised input space)" if steps else None,
                "internal_batch_size": (None if not steps else max(ibs, batch_size)
                                        if name == "integrated_gradients" else
                                        max(ibs, 2 if name == "conductance" else 1)),
                "groups_per_pass": "one" if name == "integrated_gradients" else "all",
                "captum_class": spec.captum_class, "images": n,
                "groups_without_layer": [groups[j].name for j in range(len(groups))
                                         if j not in layers]}
            results[name] = BaselineResult(name, _shares(raw), counter.forward, counter.backward,
                                           time.perf_counter() - t0, settings, raw)
    return {name: results[name] for name in chosen}


# ------------------------------------------------------------------------------------------
# Agreement with the own metric


@dataclass(frozen=True)
class Agreement:
    """Rank agreement of a baseline with the own metric over the groups."""

    spearman: Optional[float]       # Spearman's rho (average ranks for ties)
    kendall: Optional[float]        # Kendall's tau-b
    topk_overlap: Optional[float]   # |top-k by the baseline & flagged| / k, k = #flagged
    n: int = 0                      # groups compared (both scores finite)
    k: int = 0                      # flagged groups

    def to_dict(self) -> Dict[str, Any]:
        return {"spearman": self.spearman, "kendall": self.kendall,
                "topk_overlap": self.topk_overlap, "n": self.n, "k": self.k}


def agreement(own_scores: Sequence[float], other_scores: Sequence[float],
              flagged: Sequence[bool]) -> Agreement:
    """How far a baseline's group scores agree with the own metric's.

    ``spearman`` and ``kendall`` (tau-b) compare the two rankings over the groups where both
    scores are finite (NaN, e.g. a bare-parameter group under a layer method, is dropped
    pairwise); fewer than 3 such groups, or a constant vector, gives None. ``topk_overlap`` is
    the fraction of the own metric's ``k`` flagged groups that are among the baseline's ``k``
    highest-scoring groups (NaN scores are never among them; ties at the k-th place are broken
    by group order); None when nothing is flagged.
    """
    own = np.asarray(own_scores, dtype=np.float64).ravel()
    other = np.asarray(other_scores, dtype=np.float64).ravel()
    flags = np.asarray(flagged, dtype=bool).ravel()
    if not (len(own) == len(other) == len(flags)):
        raise ValueError(f"lengths differ: own {len(own)}, other {len(other)}, "
                         f"flagged {len(flags)}")
    valid = np.isfinite(own) & np.isfinite(other)
    n = int(valid.sum())
    rho = tau = None
    if n >= 3:
        rho = spearman(own[valid], other[valid])
        tau = kendall_tau_b(own[valid], other[valid])
    k = int(flags.sum())
    overlap = None
    if k > 0:
        key = np.where(np.isfinite(other), other, -np.inf)
        order = np.argsort(-key, kind="mergesort")
        top = [j for j in order[:k] if np.isfinite(other[j])]
        overlap = float(flags[top].sum()) / k
    return Agreement(rho, tau, overlap, n, k)
