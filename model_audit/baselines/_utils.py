"""Helpers shared by the baseline families: model preparation, hooks, counting, reduction.

The model preparation (:class:`_CloneOutput`, :func:`_group_module`, :func:`_protect`,
:func:`_call_counts`) is what :func:`model_audit.baselines.prepare_layers` does to the copy of
the model, for the following reasons.

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
  afterwards), and refused with a :class:`~model_audit.baselines.BaselineError` naming it.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from .. import distributed
from ..core.layers import LayerGroup
from ..errors import ConfigError, ReplayError


class BaselineError(ReplayError):
    """A baseline attribution cannot run (e.g. a group module is called twice per forward)."""

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


@contextmanager
def _forward_hooks(modules: Dict[int, nn.Module],
                   hook_for: Callable[[int], Callable[..., None]]) -> Iterator[None]:
    """Forward hooks ``hook_for(i)`` on ``modules[i]`` while the block runs; removed after."""
    handles = []
    try:
        for i, module in modules.items():
            handles.append(module.register_forward_hook(hook_for(i)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _call_counts(net: nn.Module, modules: Dict[int, nn.Module], x: torch.Tensor) -> Dict[int, int]:
    """How often each module runs in one forward pass (of one batch)."""
    counts = {i: 0 for i in modules}

    def counter(i: int) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            counts[i] += 1
        return hook

    with _forward_hooks(modules, counter), torch.no_grad():
        net(x)
    return counts


# ------------------------------------------------------------------------------------------
# Counting and reduction


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


# ------------------------------------------------------------------------------------------
# Settings and batches


def _check_settings(n_steps: int, internal_batch_size: Optional[int]) -> None:
    if n_steps < 1:
        raise ConfigError(f"baseline n_steps must be >= 1, got {n_steps}")
    if internal_batch_size is not None and internal_batch_size < 1:
        raise ConfigError(f"internal batch size must be >= 1, got {internal_batch_size}")


def _count_images(batches: Iterable[Tuple[Any, torch.Tensor, torch.Tensor]], *,
                  sharded: bool = False) -> Tuple[int, int, torch.Tensor]:
    """The number of images, the largest batch size and the first non-empty batch's images.

    ``sharded``: ``batches`` is this rank's shard of a
    :class:`~model_audit.io.probe.BatchCache`; the counts are then those of every rank, and
    the first images are the cache's first position (a rank's shard may be empty).
    """
    n = 0
    first: Optional[torch.Tensor] = None
    batch_size = 0
    with distributed.agree(sharded):
        for _, x, _ in batches:
            n += int(x.shape[0])
            batch_size = max(batch_size, int(x.shape[0]))
            if first is None and len(x):
                first = x
    if sharded:
        n = int(distributed.sum_values(n)[0])
        batch_size = distributed.max_value(batch_size)
        positions = batches.positions  # type: ignore[attr-defined]
        first = batches.probe.load(positions[:1]) if positions else None  # type: ignore
    if n == 0 or first is None:
        raise BaselineError("no misclassified images: there is nothing for the baselines to "
                            "attribute")
    return n, batch_size, first


def _len(batches: Iterable) -> Optional[int]:
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return None
