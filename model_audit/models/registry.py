"""The architecture registry: torchvision classifiers, their ``-cifar`` stems, the bundled
small model, and ``package.module:factory`` specs from the command line."""
from __future__ import annotations

import difflib
import importlib
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from torch import nn

from ..errors import ArchitectureError
from .tiny import TinyResNet
import sys
import torchvision.models as tvm



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
        f"unknown architecture {name!r}.{hint} Valid names: {', '.join(names)}; or give "
        "'package.module:factory' for your own model (the factory gets num_classes).")


def is_factory_spec(arch: str) -> bool:
    return ":" in arch


def build_model(arch: str, num_classes: int,
                shapes: Optional[Mapping[str, Sequence[int]]] = None) -> nn.Module:
    """Build an untrained model of ``arch`` with ``num_classes`` outputs.

    Args:
        arch: a torchvision classifier name, ``<resnet>-cifar``, ``tiny-resnet`` or
            ``package.module:factory``.
        num_classes: outputs of the classifier head.
        shapes: tensor shapes of the checkpoint (used by ``tiny-resnet`` for its width).

    Raises:
        ArchitectureError: unknown name, or a factory that cannot be imported or fails.
    """
    shapes = shapes or {}
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
    """Name of the classifier head: the last ``Linear`` (else the last ``Conv2d``) module."""
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


