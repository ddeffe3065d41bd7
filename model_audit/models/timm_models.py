"""timm models (the optional extra ``model-audit[timm]``): ``--arch timm:<name>``.

* Built with ``timm.create_model(name, pretrained=False, num_classes=...)``: nothing is fetched,
  the weights come from the checkpoint.
* Preprocessing: the model's pretrained config (``mean``, ``std``, ``input_size``) gives the
  normalisation and the input size when the checkpoint's metadata does not
  (:func:`preprocessing`).
* Layer groups follow timm's own split of the model into stem, stages and head
  (``model.group_matcher``, the grouping timm uses for layer-wise learning-rate decay): see
  :func:`timm_units`.
* Architecture guessing: when a checkpoint names no architecture and nothing in torchvision
  matches it, the timm architectures whose pretrained config names a first convolution and a
  classifier present in the file are built on the meta device and compared key by key
  (:func:`timm_matches`). The sorted key list of each one built is kept in a cache file per
  timm version, so that the cost (about 0.1 s per candidate) is paid once.
"""
from __future__ import annotations

import re
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from torch import nn

from ..errors import ArchitectureError
from .matching import KeyCache, keys_digest, shapes_match

PREFIX = "timm:"


def is_timm_arch(arch: str) -> bool:
    return arch.startswith(PREFIX)


def installed() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def _timm() -> Any:
    try:
        import timm
    except ImportError as exc:
        raise ArchitectureError(
            "timm is not installed, and the architecture is a timm one: "
            "pip install 'model-audit[timm]' (or pip install timm)") from exc
    return timm


def build(arch: str, num_classes: int) -> nn.Module:
    """``timm:<name>`` with ``num_classes`` outputs, untrained (nothing is fetched).

    Raises:
        ArchitectureError: timm missing, or a name timm does not know (close names suggested).
    """
    timm = _timm()
    name = arch[len(PREFIX):]
    if not timm.is_model(name):
        import difflib
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" Did you mean {', '.join(PREFIX + c for c in close)}?" if close else ""
        raise ArchitectureError(f"timm has no model {name!r}.{hint} `python -c \"import timm; "
                                "print(timm.list_models())\"` lists them")
    return timm.create_model(name, pretrained=False, num_classes=num_classes)


def is_timm_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("timm.") and hasattr(model, "group_matcher")


def preprocessing(model: nn.Module) -> Tuple[Optional[str], Optional[Tuple[int, int]]]:
    """The normalisation (``MEAN,STD`` form of :func:`~model_audit.io.probe.parse_normalize`)
    and the input size (H, W) of a timm model's pretrained config; None where it has none."""
    return preprocessing_from_cfg(getattr(model, "pretrained_cfg", None) or {})


def preprocessing_from_cfg(cfg: Mapping[str, Any]
                           ) -> Tuple[Optional[str], Optional[Tuple[int, int]]]:
    """:func:`preprocessing` of a pretrained config (a dict, as timm saves it)."""
    mean, std = cfg.get("mean"), cfg.get("std")
    normalize = None
    if mean and std and len(mean) == len(std):
        normalize = ",".join(f"{float(v):g}" for v in list(mean) + list(std))
    size = cfg.get("input_size")
    input_size = (int(size[-2]), int(size[-1])) if size and len(size) >= 2 else None
    return normalize, input_size


def _common_prefix(names: Sequence[str]) -> str:
    parts = [n.split(".")[:-1] for n in names]
    out: List[str] = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        out.append(level[0])
    return ".".join(out)


def timm_units(model: nn.Module, coarse: bool) -> List[Tuple[str, List[str], List[str]]]:
    """timm's grouping of ``model``: (name, parameter names, buffer names) per group.

    ``coarse``: stem, one group per stage, head (``group``); else timm's finer split, one
    group per block (``block``). The group holding the matcher's ``stem`` is named ``stem``,
    the parameters no matcher claims (the classifier) ``head``, and the others after the
    module path their parameters share (``layer1``, ``stages.2``, ``blocks.5``).
    """
    from timm.models import group_parameters

    matcher = model.group_matcher(coarse=coarse)
    grouped = group_parameters(model, matcher)
    stem = matcher.get("stem") if isinstance(matcher, dict) else None
    ordinals = sorted(grouped)
    units: List[Tuple[str, List[str], List[str]]] = []
    used = set()
    for i, ordinal in enumerate(ordinals):
        names = list(grouped[ordinal])
        if isinstance(stem, str) and any(re.match(stem, n) for n in names):
            label = "stem"
        elif i == len(ordinals) - 1 and len(ordinals) > 1 and not _claimed(matcher, names):
            label = "head"
        else:
            first = names[0].split(".")[0]
            label = _common_prefix([n for n in names if n.split(".")[0] == first])
            matched = _matched_prefix(matcher, names[0])
            if matched and (not label or len(label) > len(matched)):
                label = matched  # a stage of one block is still named after the stage
            label = label or f"group{i}"
        while label in used:
            label += "+"
        used.add(label)
        units.append((label, names, []))
    return _with_buffers(model, units)


def _patterns(matcher: Any, *, stem: bool = True) -> List[str]:
    patterns: List[str] = []
    for key, value in (matcher.items() if isinstance(matcher, dict) else []):
        if key == "stem" and not stem:
            continue
        if isinstance(value, str):
            patterns.append(value)
        else:
            patterns.extend(p[0] if isinstance(p, (tuple, list)) else p for p in value)
    return patterns


def _claimed(matcher: Any, names: Sequence[str]) -> bool:
    """Whether a matcher pattern claims any of ``names`` (the head is what none claims)."""
    return any(re.match(p, n) for p in _patterns(matcher) for n in names)


def _matched_prefix(matcher: Any, name: str) -> str:
    """The module path a (non-stem) matcher pattern matches at the start of ``name``."""
    for pattern in _patterns(matcher, stem=False):
        found = re.match(pattern, name)
        if found and found.group(0):
            return found.group(0).rstrip(".")
    return ""


def _with_buffers(model: nn.Module, units: List[Tuple[str, List[str], List[str]]]
                  ) -> List[Tuple[str, List[str], List[str]]]:
    """Each buffer goes with the group of the parameters of its own module (else of the
    parameter whose name shares the longest prefix with it)."""
    owner: Dict[str, int] = {}
    for i, (_, pnames, _) in enumerate(units):
        for p in pnames:
            owner.setdefault(p.rsplit(".", 1)[0] if "." in p else "", i)
    out = [(name, pnames, []) for name, pnames, _ in units]
    for bname, _ in model.named_buffers():
        module = bname.rsplit(".", 1)[0] if "." in bname else ""
        while module not in owner and module:
            module = module.rsplit(".", 1)[0] if "." in module else ""
        if module in owner:
            out[owner[module]][2].append(bname)
    return out


# -- architecture guessing ------------------------------------------------------------------


def candidates(keys: Sequence[str]) -> List[str]:
    """timm architectures whose pretrained config's first convolution and classifier are
    among ``keys`` (no model is built)."""
    from timm.models import get_pretrained_cfg

    timm = _timm()
    present = set(keys)
    out = []
    for name in timm.list_models():
        cfg = get_pretrained_cfg(name)
        if cfg is None:
            continue
        first = cfg.first_conv if isinstance(cfg.first_conv, (list, tuple)) else [cfg.first_conv]
        head = cfg.classifier if isinstance(cfg.classifier, (list, tuple)) else [cfg.classifier]
        if all(f"{m}.weight" in present for m in first if m) and \
                all(f"{m}.weight" in present for m in head if m):
            out.append(name)
    return out


def timm_matches(shapes: Mapping[str, Sequence[int]]) -> List[str]:
    """``timm:<name>`` for every timm architecture with exactly these keys and shapes (the
    head's number of classes aside)."""
    import torch

    timm = _timm()
    names = candidates(list(shapes))
    cache = KeyCache("timm", timm.__version__)
    digest = keys_digest(shapes)
    todo = [n for n in names if n not in cache]
    if len(todo) > 20:
        print(f"model-audit: comparing the checkpoint with {len(todo)} timm architectures "
              f"(about {len(todo) // 8 + 1} s, once: kept in {cache.path})", file=sys.stderr)
    out = []
    for name in names:
        if name in cache and cache[name] != digest:
            continue
        try:
            with torch.device("meta"):
                expected = timm.create_model(name, pretrained=False, num_classes=1000).state_dict()
        except Exception:  # a timm model that cannot be built here is not a match
            continue
        cache[name] = keys_digest(expected)
        if cache[name] != digest:
            continue
        head = [k for k in expected if tuple(expected[k].shape)[:1] == (1000,)]
        if shapes_match(expected, shapes, head):
            out.append(PREFIX + name)
    cache.save()
    return out
