"""The loaded-checkpoint type and the loader every checkpoint source shares.

:func:`load_state` builds the architecture, checks the state dict against it strictly (with
hints when it does not fit) and returns a :class:`LoadedCheckpoint`. A checkpoint file
(:mod:`.checkpoint`) and a model directory (:mod:`.pretrained_dir`) both end here, so neither
imports the other's private code.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import CheckpointError
from ..io.tensors import META_PREFIX, sha256_file
from . import timm_models
from .registry import (aux_head_keys, build_model, head_name, input_channels, is_factory_spec,
                       template)


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A checkpoint loaded into a model (eval mode, float32, on CPU)."""

    model: nn.Module
    arch: str
    num_classes: int
    in_channels: int
    path: str
    sha256: str
    parameters: int
    source_dtypes: Tuple[str, ...]
    metadata: Dict[str, str] = field(default_factory=dict)
    normalize: Optional[str] = None
    classes: Optional[Tuple[str, ...]] = None
    nonfinite: Tuple[str, ...] = ()
    #: tensors of the file left out of the model: training-only auxiliary heads
    left_out: Tuple[str, ...] = ()
    #: the file names no architecture: this one is the only registered match of its keys
    guessed: bool = False
    #: the input size (H, W) the model expects, when its source says (timm, Hugging Face)
    input_size: Optional[Tuple[int, int]] = None
    #: where ``normalize``/``input_size`` came from when not from the file's metadata
    preprocessing_from: Optional[str] = None
    #: the weights file, when ``path`` is a model directory (``save_pretrained``)
    weights_file: Optional[str] = None
    #: an ``nn.Module`` given in memory (:mod:`.module`): there is no file behind ``path``
    in_memory: bool = False

    def to_dict(self) -> Dict[str, Any]:
        return {"arch": self.arch, "num_classes": self.num_classes,
                "in_channels": self.in_channels, "path": self.path, "sha256": self.sha256,
                "parameters": self.parameters, "source_dtypes": list(self.source_dtypes),
                "nonfinite_tensors": list(self.nonfinite)}


def _fmt_shape(shape: Sequence[int]) -> str:
    return "x".join(str(int(d)) for d in shape) or "scalar"


def _matches(arch: str, num_classes: int, state: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``arch`` (built on the meta device, no memory) has exactly the state's keys/shapes."""
    try:
        expected = template(arch, num_classes,
                            {k: tuple(v.shape) for k, v in state.items()}).state_dict()
    except Exception:  # a candidate that cannot be built is simply not suggested
        return False
    return (set(expected) == set(state) and
            all(tuple(expected[k].shape) == tuple(state[k].shape) for k in expected))


def _mismatch_hints(arch: str, num_classes: int, state: Mapping[str, torch.Tensor],
                    missing: List[str], unexpected: List[str],
                    candidates: Sequence[str]) -> List[str]:
    hints: List[str] = []
    tried = [c for c in dict.fromkeys(candidates) if c and c != arch and not is_factory_spec(c)]
    conv = state.get("conv1.weight")
    if conv is not None and conv.dim() == 4:
        if tuple(conv.shape[2:]) == (3, 3) and not arch.endswith("-cifar"):
            tried.insert(0, f"{arch}-cifar")
        elif tuple(conv.shape[2:]) == (7, 7) and arch.endswith("-cifar"):
            tried.insert(0, arch[: -len("-cifar")])
    for candidate in tried:
        if _matches(candidate, num_classes, state):
            kernel = "x".join(str(d) for d in conv.shape[2:]) if conv is not None and conv.dim() == 4 else ""
            lead = f"conv1.weight is {kernel}: " if kernel and candidate.split("-")[0] == arch.split("-")[0] else ""
            hints.append(f"{lead}did you mean {candidate}?")
            break
    if unexpected and missing:
        prefixes = {k.split(".", 1)[0] + "." for k in unexpected if "." in k}
        if len(prefixes) == 1:
            prefix = prefixes.pop()
            if all(k.startswith(prefix) and k[len(prefix):] in missing for k in unexpected[:20]):
                hints.append(f"every unexpected key starts with {prefix!r}: strip that prefix")
    return hints


def _strict_check(path: Path, arch: str, num_classes: int, model: nn.Module,
                  state: Mapping[str, torch.Tensor], candidates: Sequence[str] = ()) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = {k: (tuple(state[k].shape), tuple(expected[k].shape))
                  for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)}
    if not (missing or unexpected or mismatched):
        return
    parts = [f"{path} does not match architecture {arch!r}"
             f" (the checkpoint has {len(state)} tensors, the model expects {len(expected)}):"]

    def listed(label: str, keys: Sequence[str]) -> None:
        if keys:
            shown = ", ".join(keys[:10]) + (f", ... ({len(keys) - 10} more)" if len(keys) > 10 else "")
            parts.append(f"{label} ({len(keys)}): {shown}.")

    listed("missing keys", missing)
    listed("unexpected keys", unexpected)
    if mismatched:
        items = [f"{k} is {_fmt_shape(g)} but the model wants {_fmt_shape(w)}"
                 for k, (g, w) in list(mismatched.items())[:10]]
        parts.append(f"shape mismatches ({len(mismatched)}): " + "; ".join(items) + ".")
    hints = _mismatch_hints(arch, num_classes, state, missing, unexpected, candidates)
    parts.append("Hint: " + " ".join(hints) if hints else
                 "Check --arch (and --num-classes); list names with `model-audit archs`.")
    raise CheckpointError(" ".join(parts))


def _float32(state: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Tuple[str, ...]]:
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in state.values()
                     if v.is_floating_point()})
    out = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    return out, tuple(dtypes)


def _classes_from_head(path: Path, arch: str, state: Mapping[str, torch.Tensor],
                       shapes: Mapping[str, Sequence[int]]) -> int:
    """The number of classes read off the classifier head's weight (the model is built on the
    meta device to find the head: no memory)."""
    head = head_name(template(arch, 1000, shapes)) + ".weight"
    if head not in state:
        raise CheckpointError(
            f"{path}: cannot find the classifier head {head!r} of {arch!r} in the "
            f"checkpoint to read the number of classes; give --num-classes (keys start: "
            f"{', '.join(list(state)[:5])})")
    return int(state[head].shape[0])


def _class_names(metadata: Mapping[str, str]) -> Optional[Tuple[str, ...]]:
    """The class names in the metadata (a JSON list of strings), else None."""
    try:
        parsed = json.loads(metadata.get(META_PREFIX + "classes", "null"))
    except (ValueError, RecursionError):
        return None
    if isinstance(parsed, list) and all(isinstance(c, str) for c in parsed):
        return tuple(parsed)
    return None


def load_state(path: Path, state: Dict[str, torch.Tensor], metadata: Dict[str, str], arch: str,
          num_classes: Optional[int], meta_arch: Optional[str]) -> LoadedCheckpoint:
    left_out = tuple(aux_head_keys(arch, list(state)))
    state = {k: v for k, v in state.items() if k not in set(left_out)}
    if num_classes is None and META_PREFIX + "num_classes" in metadata and arch == meta_arch:
        try:
            num_classes = int(metadata[META_PREFIX + "num_classes"])
        except ValueError as exc:
            raise CheckpointError(f"{path}: metadata model_audit.num_classes is not an integer") from exc
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    if num_classes is None:
        num_classes = _classes_from_head(path, arch, state, shapes)
    if num_classes < 1:
        raise CheckpointError(f"number of classes must be >= 1, got {num_classes}")
    model = build_model(arch, num_classes, shapes)
    _strict_check(path, arch, num_classes, model, state, candidates=[meta_arch or ""])
    state32, dtypes = _float32(state)
    model.load_state_dict(_with_versions(state32, model), strict=True)
    model.float().eval()
    nonfinite = tuple(k for k, v in state32.items()
                      if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    normalize = metadata.get(META_PREFIX + "normalize")
    input_size, source = None, None
    if timm_models.is_timm_model(model):
        timm_normalize, input_size = timm_models.preprocessing(model)
        source = f"timm's pretrained config of {arch[len(timm_models.PREFIX):]}"
        if normalize is None and timm_normalize is not None:
            normalize = timm_normalize
    return LoadedCheckpoint(
        model=model, arch=arch, num_classes=num_classes, in_channels=input_channels(model),
        path=str(path), sha256=sha256_file(path),
        parameters=sum(p.numel() for p in model.parameters()), source_dtypes=dtypes,
        metadata=dict(metadata), normalize=normalize,
        classes=_class_names(metadata), nonfinite=nonfinite, left_out=left_out,
        input_size=input_size, preprocessing_from=source)


def _with_versions(state: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """``state`` with the module versions torch keeps beside a state dict (``_metadata``).

    A safetensors file (or a plain dict) has none, and a module that checks its version when
    loading (torchvision's MNASNet) refuses ``None``: the freshly built model's own versions
    are those of the code that wrote a current checkpoint.
    """
    out: Dict[str, torch.Tensor] = OrderedDict(state)
    out._metadata = getattr(model.state_dict(), "_metadata", OrderedDict())  # type: ignore[attr-defined]
    return out
