"""Layer groups: the units the audit attributes errors to.

Granularities:

* ``group`` (default): the model's top-level children that own parameters. When the model has
  fewer than :data:`MIN_TOP_LEVEL_GROUPS` such children, its plain containers
  (``nn.Sequential``/``nn.ModuleList``, like ``features`` and ``classifier`` in VGG or
  MobileNet) are expanded one level, so a network that keeps all its blocks in one container
  still gets one group per block. ResNet-18 gives the paper's seven groups: conv1, bn1,
  layer1, layer2, layer3, layer4, fc.
* ``block``: every ``group`` that has parameter-owning children is split one level further
  (``layer1.0``, ``layer1.1``, ...).
* ``module``: every module that owns parameters directly (each conv, norm, linear layer).

A timm model is grouped the way timm groups it (``model.group_matcher``): ``group`` gives its
stem, one group per stage and its head; ``block`` one group per block. A Hugging Face
transformers classifier gets its embeddings, one group per layer (or stage), its final norm
and its head; ``block`` splits each of those one level further.

Parameters owned directly by a module that is split (e.g. a ViT's ``class_token``) form a group
of their own, named after the parameter, so every parameter belongs to exactly one group.

Examples:
    >>> from model_audit.models.registry import build_model
    >>> [g.name for g in layer_groups(build_model("resnet18-cifar", 10))]
    ['conv1', 'bn1', 'layer1', 'layer2', 'layer3', 'layer4', 'fc']
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from torch import nn

from ..errors import ConfigError
from ..models import pretrained_dir, timm_models

GRANULARITIES = ("group", "block", "module")

#: Below this many parameter-owning top-level children, containers are expanded one level.
MIN_TOP_LEVEL_GROUPS = 4


@dataclass(frozen=True)
class LayerGroup:
    """A named set of parameters (and the buffers of the same modules)."""

    name: str
    parameter_names: Tuple[str, ...]
    buffer_names: Tuple[str, ...]
    params: int
    share: float

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "params": self.params, "share": self.share,
                "parameters": list(self.parameter_names)}


def _owns_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _units(module: nn.Module, prefix: str) -> List[Tuple[str, List[str], List[str]]]:
    """Split ``module`` one level: (name, parameter names, buffer names) per unit."""
    units: List[Tuple[str, List[str], List[str]]] = []
    join = (lambda n: f"{prefix}.{n}") if prefix else (lambda n: n)
    for pname, _ in module.named_parameters(recurse=False):
        units.append((join(pname), [join(pname)], []))
    for cname, child in module.named_children():
        if not _owns_params(child):
            continue
        full = join(cname)
        units.append((full, [f"{full}.{n}" for n, _ in child.named_parameters()],
                      [f"{full}.{n}" for n, _ in child.named_buffers()]))
    return units


def _split_group(model: nn.Module, unit: Tuple[str, List[str], List[str]]
                 ) -> List[Tuple[str, List[str], List[str]]]:
    name = unit[0]
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return [unit]  # a bare parameter
    if not any(_owns_params(child) for child in module.children()):
        return [unit]  # a leaf layer (conv, norm, linear) is not split into weight and bias
    inner = _units(module, name)
    return inner if len(inner) > 1 else [unit]


def _source_units(model: nn.Module, granularity: str
                  ) -> Optional[List[Tuple[str, List[str], List[str]]]]:
    """The grouping a model's own library defines, where it has one: timm's stem, stages and
    head (``group``) or blocks (``block``); None for every other model."""
    if timm_models.is_timm_model(model):
        return timm_models.timm_units(model, coarse=granularity == "group")
    if pretrained_dir.is_hf_model(model):
        units = pretrained_dir.hf_units(model)
        if granularity == "block":
            units = [u for unit in units for u in _split_group(model, unit)]
        return units
    return None


def layer_groups(model: nn.Module, granularity: str = "group") -> List[LayerGroup]:
    """The layer groups of ``model`` at ``granularity``, in forward (registration) order.

    Raises:
        ConfigError: unknown granularity, or a model without parameters.
    """
    if granularity not in GRANULARITIES:
        raise ConfigError(f"unknown granularity {granularity!r}; valid: {', '.join(GRANULARITIES)}")
    if granularity == "module":
        units = []
        for mname, module in model.named_modules():
            own = [n for n, _ in module.named_parameters(recurse=False)]
            if own:
                join = (lambda n, m=mname: f"{m}.{n}" if m else n)
                units.append((mname or own[0], [join(n) for n in own],
                              [join(n) for n, _ in module.named_buffers(recurse=False)]))
    elif (own := _source_units(model, granularity)) is not None:
        units = own
    else:
        units = _units(model, "")
        if len([u for u in units if "." not in u[0]]) < MIN_TOP_LEVEL_GROUPS:
            expanded = []
            for unit in units:
                try:
                    module = model.get_submodule(unit[0])
                except AttributeError:
                    module = None
                if isinstance(module, (nn.Sequential, nn.ModuleList)):
                    expanded.extend(_split_group(model, unit))
                else:
                    expanded.append(unit)
            units = expanded
        if granularity == "block":
            units = [u for unit in units for u in _split_group(model, unit)]
    counts = dict(model.named_parameters())
    total = sum(p.numel() for p in counts.values())
    if total == 0:
        raise ConfigError("the model has no parameters to audit")
    groups = []
    for name, pnames, bnames in units:
        n = sum(counts[p].numel() for p in pnames)
        groups.append(LayerGroup(name, tuple(pnames), tuple(bnames), n, n / total))
    covered = sorted(p for g in groups for p in g.parameter_names)
    if covered != sorted(counts):
        raise ConfigError("internal error: layer groups do not partition the parameters")
    return groups
