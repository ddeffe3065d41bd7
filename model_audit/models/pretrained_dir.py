"""Model directories: what ``save_pretrained`` writes (Hugging Face transformers, the optional
extra ``model-audit[hf]``) and what timm's ``save_for_hf`` writes.

A directory with a ``config.json`` is a checkpoint:

* **transformers** (``config.json`` has ``architectures``, e.g. ``ViTForImageClassification``,
  ``ConvNextForImageClassification``): the class is taken from the transformers package by
  that name, and the weights (``model.safetensors``, or its sharded index) are loaded with
  ``from_pretrained(..., local_files_only=True)``: nothing is fetched from a hub, no code from
  the directory is run (``trust_remote_code`` stays off), and a key the model lacks or does
  not use is an error, as for every checkpoint. The model's output object is reduced to its
  ``logits``. Class names come from ``id2label`` (transformers' placeholders ``LABEL_<i>``
  are not names); normalisation and input size from ``preprocessor_config.json`` when it is
  there.
* **timm** (``config.json`` has ``architecture``): ``timm:<architecture>`` with the weights
  (``model.safetensors`` or ``pytorch_model.bin``, read weights-only), class names from
  ``label_names``, normalisation and input size from the saved ``pretrained_cfg``.

The architecture is named ``hf:<class>`` (``hf:ViTForImageClassification``) or
``timm:<name>``; the layer groups of a transformers model follow its own structure
(:func:`hf_units`): the embeddings, one group per layer or stage, the final norm, the head.
"""
from __future__ import annotations

import json
import os
import sys
import re
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import ArchitectureError, CheckpointError
from ..io.tensors import (META_PREFIX, read_tensors, sha256_file, strip_wrapper_prefixes,
                          validate_safetensors_header)
from . import timm_models
from .loaded import LoadedCheckpoint, load_state

HF_PREFIX = "hf:"
CONFIG = "config.json"
PREPROCESSOR = "preprocessor_config.json"


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def load_model_dir(path: os.PathLike, *, arch: Optional[str] = None,
                   num_classes: Optional[int] = None) -> Any:
    """Load a ``save_pretrained`` (transformers) or ``save_for_hf`` (timm) directory.

    Returns:
        A :class:`~model_audit.models.checkpoint.LoadedCheckpoint` whose ``path`` is the
        directory and ``weights_file`` the weights inside it.

    Raises:
        CheckpointError: no ``config.json`` or weights, or weights that do not fit the model.
        ArchitectureError: the library is not installed, or ``--arch`` names another model.
    """
    path = Path(path)
    config_path = path / CONFIG
    if not config_path.is_file():
        raise CheckpointError(
            f"{path} is a directory without {CONFIG}: give a checkpoint file (.safetensors, "
            ".pt) or a directory written by save_pretrained (transformers) or save_for_hf "
            "(timm)")
    config = _read_json(config_path)
    if "architecture" in config and "architectures" not in config:
        return _load_timm_dir(path, config, arch, num_classes)
    return _load_transformers_dir(path, config, arch, num_classes)


# -- timm ------------------------------------------------------------------------------------


def _load_timm_dir(path: Path, config: Dict[str, Any], arch: Optional[str],
                   num_classes: Optional[int]) -> Any:
    named = timm_models.PREFIX + str(config["architecture"])
    if arch is not None and arch != named:
        raise ArchitectureError(f"{path}/{CONFIG} says the model is {named}, not {arch!r}: "
                                "leave out --arch for a model directory")
    weights = _first_file(path, ("model.safetensors", "pytorch_model.bin"))
    raw, metadata = read_tensors(weights)
    if num_classes is None and isinstance(config.get("num_classes"), int):
        num_classes = int(config["num_classes"])
    loaded = load_state(weights, strip_wrapper_prefixes(raw), metadata, named,
                        num_classes, None)
    cfg = config.get("pretrained_cfg") or {}
    normalize, input_size = timm_models.preprocessing_from_cfg(cfg)
    labels = config.get("label_names")
    if isinstance(labels, dict):  # {class index: name}
        try:
            labels = [labels[k] for k in sorted(labels, key=int)]
        except ValueError:
            labels = None
    classes = tuple(labels) if isinstance(labels, list) and all(
        isinstance(c, str) for c in labels) and len(labels) == loaded.num_classes else None
    return replace(loaded, path=str(path), weights_file=str(weights),
                   normalize=loaded.metadata.get(META_PREFIX + "normalize") or normalize
                   or loaded.normalize,
                   input_size=input_size or loaded.input_size, classes=classes,
                   preprocessing_from=f"{path}/{CONFIG} (timm's pretrained_cfg)")


def _first_file(path: Path, names: Sequence[str]) -> Path:
    for name in names:
        if (path / name).is_file():
            return path / name
    raise CheckpointError(f"{path} has no weights: none of {', '.join(names)} is there")


# -- transformers ----------------------------------------------------------------------------


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise ArchitectureError(
            "this is a Hugging Face model directory, and transformers is not installed: "
            "pip install 'model-audit[hf]' (or pip install transformers)") from exc
    return transformers


@contextmanager
def _offline() -> Iterator[None]:
    """No hub access while loading (and quiet loading logs): a missing local file is an error
    here, never a download."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    transformers = _transformers()
    verbosity = transformers.logging.get_verbosity()
    bars = transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _logits_only(module: nn.Module, args: Any, output: Any) -> torch.Tensor:
    """Forward hook: the classifier's output object becomes its logits tensor."""
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)):
        logits = output[0]
    return logits if logits is not None else output


def _model_class(path: Path, config: Dict[str, Any]) -> Tuple[str, Any]:
    transformers = _transformers()
    if config.get("auto_map"):
        raise CheckpointError(
            f"{path}/{CONFIG} maps to custom model code (auto_map); model-audit never runs code "
            "from a model directory: load the model yourself and pass it to the library API")
    names = config.get("architectures") or []
    if not names or not isinstance(names, list):
        raise CheckpointError(
            f"{path}/{CONFIG} names no model class ('architectures'); save the model with "
            "save_pretrained from its *ForImageClassification (or other *Classification) class")
    name = str(names[0])
    cls = getattr(transformers, name, None) if re.fullmatch(r"[A-Za-z0-9_]+", name) else None
    if cls is None or not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise CheckpointError(
            f"{path}/{CONFIG} names the model class {name!r}, which transformers "
            f"{transformers.__version__} does not have; upgrade transformers, or check the file")
    if "Classification" not in name:
        raise CheckpointError(
            f"{path}: {name} is not a classifier; model-audit audits *Classification models "
            "(their output has logits, one per class)")
    return name, cls


def _load_transformers_dir(path: Path, config: Dict[str, Any], arch: Optional[str],
                           num_classes: Optional[int]) -> Any:

    name, cls = _model_class(path, config)
    named = HF_PREFIX + name
    if arch is not None and arch != named:
        raise ArchitectureError(f"{path}/{CONFIG} says the model is {named}, not {arch!r}: "
                                "leave out --arch for a model directory")
    if (path / "model.safetensors.index.json").is_file():
        weights = path / "model.safetensors.index.json"
        shards = sorted(set(_read_json(weights).get("weight_map", {}).values()))
        files = [path / s for s in shards]
    else:
        if not (path / "model.safetensors").is_file():
            found = [n for n in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack")
                     if (path / n).is_file()]
            raise CheckpointError(
                f"{path} has no model.safetensors" + (
                    f" (it has {found[0]}, which model-audit does not read: load it with "
                    "transformers and save_pretrained(..., safe_serialization=True))"
                    if found else "; nothing is fetched from a hub: save the model with "
                    "save_pretrained into this directory"))
        weights = path / "model.safetensors"
        files = [weights]
    dtypes = set()
    metadata: Dict[str, str] = {}
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"{path}: the shard {file.name} named in {weights.name} is "
                                  "missing")
        header, metadata = validate_safetensors_header(file)
        dtypes.update(v["dtype"] for v in header.values())
    with _offline():
        try:
            model, info = cls.from_pretrained(str(path), local_files_only=True,
                                              output_loading_info=True, use_safetensors=True,
                                              trust_remote_code=False)
        except Exception as exc:  # transformers raises OSError, ValueError and others
            raise CheckpointError(
                f"{path} could not be loaded as {name}: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    problems = [f"{label} ({len(keys)}): {', '.join(map(str, list(keys)[:10]))}"
                for label, keys in (("missing keys", info.get("missing_keys") or []),
                                    ("unexpected keys", info.get("unexpected_keys") or []),
                                    ("shape mismatches", info.get("mismatched_keys") or []))
                if keys]
    if problems:
        raise CheckpointError(f"{path} does not match {name}: " + "; ".join(problems)
                              + ". Re-save the model with save_pretrained from the same class")
    model = model.float().eval()
    model.register_forward_hook(_logits_only)
    labels = int(model.config.num_labels)
    if num_classes is not None and num_classes != labels:
        raise CheckpointError(f"{path}: --num-classes {num_classes}, but the model's config has "
                              f"{labels} labels; leave out --num-classes for a model directory")
    normalize, input_size = _preprocessing(path)
    nonfinite = tuple(n for n, p in model.state_dict().items()
                      if p.is_floating_point() and not bool(torch.isfinite(p).all()))
    return LoadedCheckpoint(
        model=model, arch=named, num_classes=labels,
        in_channels=int(getattr(model.config, "num_channels", 3) or 3), path=str(path),
        sha256=sha256_file(files[0]) if len(files) == 1 else sha256_file(weights),
        parameters=sum(p.numel() for p in model.parameters()),
        source_dtypes=tuple(sorted(_DTYPES.get(d, d.lower()) for d in dtypes)),
        metadata=dict(metadata) if len(files) == 1 else {},
        normalize=normalize, classes=_class_names(model.config, labels), nonfinite=nonfinite,
        input_size=input_size, weights_file=str(weights),
        preprocessing_from=f"{path}/{PREPROCESSOR}" if (path / PREPROCESSOR).is_file() else None)


_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def _class_names(config: Any, labels: int) -> Optional[Tuple[str, ...]]:
    """``id2label`` in index order, unless it is transformers' placeholder ``LABEL_<i>``."""
    id2label = getattr(config, "id2label", None) or {}
    try:
        names = tuple(str(id2label[i]) for i in range(labels))
    except KeyError:
        return None
    if all(n == f"LABEL_{i}" for i, n in enumerate(names)):
        return None
    return names


def _preprocessing(path: Path) -> Tuple[Optional[str], Optional[Tuple[int, int]]]:
    """Normalisation and input size from ``preprocessor_config.json`` (None where absent).

    ``size`` is ``{height, width}`` or ``{shortest_edge}`` (taken as a square: the tool
    resizes, it does not crop; ``crop_pct`` is not applied).
    """
    file = path / PREPROCESSOR
    if not file.is_file():
        return None, None
    cfg = _read_json(file)
    normalize = None
    mean, std = cfg.get("image_mean"), cfg.get("image_std")
    if cfg.get("do_normalize", True) is False:
        normalize = "none"
    elif isinstance(mean, list) and isinstance(std, list) and mean and len(mean) == len(std):
        normalize = ",".join(f"{float(v):g}" for v in mean + std)
    size = cfg.get("size") if cfg.get("do_resize", True) else None
    input_size = None
    if isinstance(size, dict):
        if "height" in size and "width" in size:
            input_size = (int(size["height"]), int(size["width"]))
        elif "shortest_edge" in size:
            input_size = (int(size["shortest_edge"]), int(size["shortest_edge"]))
    elif isinstance(size, int):
        input_size = (size, size)
    return normalize, input_size


def is_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers model. A model of transformers' can only exist once
    transformers is imported, so a process that never imported it is not asked to (importing
    it costs about half a second)."""
    transformers = sys.modules.get("transformers")
    if transformers is None:
        return False
    return isinstance(model, transformers.PreTrainedModel)


def hf_units(model: nn.Module) -> List[Tuple[str, List[str], List[str]]]:
    """A transformers classifier's groups: each child of its base model (``vit.embeddings``,
    ``vit.layernorm``), where a child is or holds the list of layers or stages one group per
    item (``vit.layers.3``, ``convnext.encoder.stages.1``), and the head (``classifier``)."""
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    plan: List[Tuple[str, nn.Module]] = []
    for name, child in model.named_children():
        if child is base:
            for cname, inner in child.named_children():
                plan.extend(_expanded(f"{name}.{cname}", inner))
        else:
            plan.append((name, child))
    units = []
    for name, module in plan:
        params = [f"{name}.{n}" for n, _ in module.named_parameters()]
        if params:
            units.append((name, params, [f"{name}.{n}" for n, _ in module.named_buffers()]))
    if base is not None:
        for pname, _ in base.named_parameters(recurse=False):
            units.append((f"{prefix}.{pname}", [f"{prefix}.{pname}"], []))
    for pname, _ in model.named_parameters(recurse=False):
        units.append((pname, [pname], []))
    return units


def _expanded(name: str, module: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The items of ``module`` when it is a list of layers; when it holds one list of layers
    (an encoder), the list's items and each of its other children with parameters (an
    EfficientNet encoder's top convolution and norm); else ``module`` itself."""
    if isinstance(module, nn.ModuleList):
        return [(f"{name}.{i}", m) for i, m in module.named_children()]
    owning = [(n, c) for n, c in module.named_children() if any(True for _ in c.parameters())]
    lists = [n for n, c in owning if isinstance(c, nn.ModuleList)]
    if len(lists) == 1 and not any(True for _ in module.parameters(recurse=False)):
        out: List[Tuple[str, nn.Module]] = []
        for cname, child in owning:
            if cname == lists[0]:
                out.extend((f"{name}.{cname}.{i}", m) for i, m in child.named_children())
            else:
                out.append((f"{name}.{cname}", child))
        return out
    return [(name, module)]
