"""The architecture registry: torchvision classifiers, their ``-cifar`` stems, the bundled
small model, ``timm:<name>`` (when timm is installed: :mod:`.timm_models`), and
``package.module:factory`` specs from the command line."""
from __future__ import annotations

import difflib
from contextlib import contextmanager
import importlib
import os
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from torch import nn

import sys

import torch
import torchvision.models as tvm

from ..errors import ArchitectureError
from . import timm_models
from .matching import KeyCache, keys_digest, shapes_match
from .tiny import TinyResNet

#: Training-only auxiliary classifiers of torchvision models (saved by default with the model,
#: never used in eval mode): their key prefixes, by architecture.
AUX_HEADS: Dict[str, Tuple[str, ...]] = {"googlenet": ("aux1.", "aux2."),
                                         "inception_v3": ("AuxLogits.",)}


def _torchvision_classifiers() -> List[str]:
    return sorted(tvm.list_models(module=tvm))


def _cifar_bases() -> List[str]:
    return [n for n in _torchvision_classifiers()
            if n.startswith(("resnet", "resnext", "wide_resnet"))]


def _build_torchvision(name: str, num_classes: int) -> nn.Module:
    kwargs: Dict[str, Any] = {"weights": None, "num_classes": num_classes}
    if name in ("inception_v3", "googlenet"):
        kwargs.update(aux_logits=False, init_weights=False)
    return tvm.get_model(name, **kwargs)


def _build_cifar(base: str, num_classes: int) -> nn.Module:
    model = _build_torchvision(base, num_classes)
    # The CIFAR stem (He et al. 2016, sec. 4.2; the paper's ResNet-18): a 3x3 stride-1 first
    # convolution and no max-pool, so 32x32 inputs are not downsampled 4x before layer1.
    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def _build_tiny(num_classes: int, shapes: Mapping[str, Sequence[int]]) -> nn.Module:
    conv = shapes.get("conv1.weight")
    width, in_ch = (int(conv[0]), int(conv[1])) if conv is not None and len(conv) == 4 else (16, 3)
    return TinyResNet(num_classes, in_channels=in_ch, width=width)


#: Registered names besides the torchvision classifiers and their ``-cifar`` variants.
EXTRA_ARCHS: Dict[str, Callable[[int, Mapping[str, Sequence[int]]], nn.Module]] = {
    "tiny-resnet": _build_tiny,
}


def available_architectures() -> List[str]:
    """Every registered architecture name (torchvision, ``-cifar`` variants, tool models)."""
    return sorted(_torchvision_classifiers() + [f"{b}-cifar" for b in _cifar_bases()]
                  + list(EXTRA_ARCHS))


def _unknown_arch(name: str) -> ArchitectureError:
    names = available_architectures()
    close = difflib.get_close_matches(name, names, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return ArchitectureError(
        f"unknown architecture {name!r}.{hint} Valid names: {', '.join(names)}; "
        "'timm:<name>' for a timm model (pip install 'model-audit[timm]'); or "
        "'package.module:factory' for your own model (the factory gets num_classes).")


def is_factory_spec(arch: str) -> bool:
    """``package.module:factory`` (imports the user's code); ``timm:<name>`` is not one."""
    return ":" in arch and not timm_models.is_timm_arch(arch)


def build_model(arch: str, num_classes: int,
                shapes: Optional[Mapping[str, Sequence[int]]] = None) -> nn.Module:
    """Build an untrained model of ``arch`` with ``num_classes`` outputs.

    Args:
        arch: a torchvision classifier name, ``<resnet>-cifar``, ``tiny-resnet``,
            ``timm:<name>`` or ``package.module:factory``.
        num_classes: outputs of the classifier head.
        shapes: tensor shapes of the checkpoint (used by ``tiny-resnet`` for its width).

    Raises:
        ArchitectureError: unknown name, or a factory that cannot be imported or fails.
    """
    shapes = shapes or {}
    if timm_models.is_timm_arch(arch):
        return timm_models.build(arch, num_classes)
    if is_factory_spec(arch):
        module_name, _, attr = arch.partition(":")
        added = os.getcwd() not in sys.path
        if added:  # `model-audit` is a console script: put the user's directory on the path
            sys.path.insert(0, os.getcwd())
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ArchitectureError(
                f"cannot import factory {arch!r}: {exc}. Give 'package.module:function' with the "
                "package importable (installed, or in the current directory).") from exc
        finally:
            if added:
                sys.path.remove(os.getcwd())
        try:
            model = factory(num_classes=num_classes)
        except Exception as exc:  # a user's factory may raise anything
            raise ArchitectureError(
                f"factory {arch!r} failed with num_classes={num_classes}: "
                f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(model, nn.Module):
            raise ArchitectureError(
                f"factory {arch!r} returned {type(model).__name__}, not a torch.nn.Module")
        return model
    if arch in EXTRA_ARCHS:
        return EXTRA_ARCHS[arch](num_classes, shapes)
    if arch.endswith("-cifar") and arch[: -len("-cifar")] in _cifar_bases():
        return _build_cifar(arch[: -len("-cifar")], num_classes)
    if arch in _torchvision_classifiers():
        return _build_torchvision(arch, num_classes)
    raise _unknown_arch(arch)


def head_name(model: nn.Module) -> str:
    """Name of the classifier head: the one a timm model's config names, else the last
    ``Linear`` (else the last ``Conv2d``) module."""
    cfg = getattr(model, "pretrained_cfg", None)
    named = cfg.get("classifier") if isinstance(cfg, dict) else None
    if isinstance(named, str) and named in dict(model.named_modules()):
        return named
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linear:
        return linear[-1]
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if convs:
        return convs[-1]
    raise ArchitectureError("the model has no Linear or Conv2d layer to use as classifier head")


def input_channels(model: nn.Module) -> int:
    """Channels of the model's input: ``in_channels`` of its first convolution."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return int(module.in_channels)
        if isinstance(module, nn.Linear):
            break
    return 3


def template(arch: str, num_classes: int,
             shapes: Optional[Mapping[str, Sequence[int]]] = None) -> nn.Module:
    """``arch`` with its parameters on the meta device (no memory), to read its keys and
    shapes. A constructor that cannot run on meta tensors (torchvision's RegNets compute with
    the tensors they make) runs on the CPU, each parameter moving to meta as it is registered."""
    try:
        with torch.device("meta"):
            return build_model(arch, num_classes, shapes)
    except (NotImplementedError, RuntimeError):
        with _registered_on_meta():
            return build_model(arch, num_classes, shapes)


@contextmanager
def _registered_on_meta() -> Iterator[None]:
    """Parameters and buffers move to the meta device as modules register them (one tensor
    in memory at a time; the idea of accelerate's ``init_empty_weights``)."""
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def parameter(self: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
        register_parameter(self, name, param)
        if param is not None:
            self._parameters[name] = nn.Parameter(param.to("meta"), param.requires_grad)

    def buffer(self: nn.Module, name: str, tensor: Optional[torch.Tensor],
               persistent: bool = True) -> None:
        register_buffer(self, name, tensor, persistent)
        if tensor is not None:
            self._buffers[name] = tensor.to("meta")

    nn.Module.register_parameter, nn.Module.register_buffer = parameter, buffer
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer


def matching_architectures(shapes: Mapping[str, Sequence[int]]) -> List[str]:
    """The registered architectures whose state dict has exactly these keys and shapes (the
    classifier head's number of classes, and training-only auxiliary heads, aside).

    torchvision and its ``-cifar`` stems are compared first; timm's architectures (when timm
    is installed) only when none of those matches. timm re-implements several torchvision
    networks with the same keys and shapes (``timm:resnet50`` and ``resnet50``): a torchvision
    checkpoint would otherwise always match two names.
    """
    out = _registered_matches(shapes)
    if not out and timm_models.installed():
        out = timm_models.timm_matches(shapes)
    return out


def _registered_matches(shapes: Mapping[str, Sequence[int]]) -> List[str]:
    """The registered architectures that match, building only those whose keys (kept per
    torchvision version in a :class:`~.matching.KeyCache`) are the checkpoint's."""
    import torchvision

    cache = KeyCache("torchvision", torchvision.__version__)
    out = []
    for name in available_architectures():
        aux = set(aux_head_keys(name, list(shapes)))  # training-only heads are left out
        if name in cache and cache[name] != keys_digest(set(shapes) - aux):
            continue
        try:
            model = template(name, 1000, shapes)
        except Exception:  # a registered name that cannot be built here is not a match
            continue
        expected = model.state_dict()
        cache[name] = keys_digest(expected)
        if set(expected) != set(shapes) - aux:
            continue
        head = head_name(model)
        if shapes_match(expected, shapes, (f"{head}.weight", f"{head}.bias")):
            out.append(name)
    cache.save()
    return out


def aux_head_keys(arch: str, keys: Sequence[str]) -> List[str]:
    """The keys of ``arch``'s training-only auxiliary heads among ``keys``."""
    base = arch[: -len("-cifar")] if arch.endswith("-cifar") else arch
    prefixes = AUX_HEADS.get(base, ())
    return [k for k in keys if k.startswith(prefixes)] if prefixes else []
