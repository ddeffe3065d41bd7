"""The repaired checkpoint: written, then verified (step 6 of :mod:`model_audit.commands.fix`).

A new safetensors file (for a model directory, a new directory: the weights as
``model.safetensors`` beside copies of its other files, config.json included), written
atomically (temp file in the same directory, fsync, rename), re-opened and verified: every
tensor outside the retrained groups is byte-identical to the input (same key, dtype and
bytes), retrained tensors are cast back to their input dtype, and the provenance metadata
reads back as written. The input is never modified.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Optional, Sequence, Set, Tuple

import torch
from safetensors.torch import save
from torch import nn

from ..._version import __version__
from ...core.layers import LayerGroup
from ...errors import OutputError
from ...io.files import atomic_write_bytes, atomic_write_files, refuse_inputs
from ...io.tensors import META_PREFIX, read_tensors, sha256_file, strip_wrapper_prefixes
from ...models.checkpoint import LoadedCheckpoint, audit_metadata
from ...models.registry import is_factory_spec
from ...results.fix import FixConfig


def check_output_path(output: Path, inputs: Sequence[Path]) -> None:
    """Refuse an output that is not a new ``.safetensors`` file in an existing directory (for
    a model directory, ``inputs[0]``: not a new directory in an existing one)."""
    if inputs and Path(inputs[0]).is_dir():
        _check_output_dir(output, Path(inputs[0]))
        return
    if output.suffix.lower() != ".safetensors":
        raise OutputError(f"--output {output} must end in .safetensors (the repaired "
                          "checkpoint is always written as safetensors)")
    if output.exists() and output.is_dir():
        raise OutputError(f"--output {output} is a directory; give a file path")
    refuse_inputs([output], inputs, "; give a new file name for --output")
    for src in inputs:
        if Path(os.path.abspath(output)) == Path(os.path.abspath(src)):
            raise OutputError(f"--output {output} is an input ({src})")
    if not output.parent.exists():
        raise OutputError(f"--output directory {output.parent} does not exist")


def _check_output_dir(output: Path, source: Path) -> None:
    if output.exists():
        raise OutputError(f"--output {output} exists; the checkpoint is a model directory, so "
                          "the repaired model is written as a new directory: give a new name")
    if not output.parent.exists():
        raise OutputError(f"--output directory {output.parent} does not exist")
    if (source / "model.safetensors.index.json").is_file():
        raise OutputError(f"{source} holds a sharded model (model.safetensors.index.json); "
                          "fix writes single-file models only: re-save it with a larger "
                          "max_shard_size")


def _raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes (any dtype, any shape, 0-d included) as a flat uint8 tensor."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def repair_metadata(ckpt: LoadedCheckpoint, config: FixConfig, selected: Sequence[str],
                     normalize: str, classes: Optional[Sequence[str]], steps: int,
                     kept: Optional[Tuple[int, bool]] = None) -> Dict[str, str]:
    """The input's metadata, the audit metadata of a registry model, and the provenance
    (``kept``: the step of the state written and whether validation accepted it)."""
    meta = dict(ckpt.metadata)
    if not is_factory_spec(ckpt.arch) and ckpt.weights_file is None:
        # a model directory's config.json names the model (and is copied beside the weights)
        meta.update(audit_metadata(ckpt.arch, ckpt.num_classes, normalize=normalize,
                                   classes=ckpt.classes or classes))
    meta.update({
        META_PREFIX + "version": __version__,
        META_PREFIX + "fix.source_sha256": ckpt.sha256,
        META_PREFIX + "fix.groups": json.dumps(list(selected)),
        META_PREFIX + "fix.schedule": config.schedule,
        META_PREFIX + "fix.seed": str(config.options.seed),
        META_PREFIX + "fix.steps": str(steps),
        META_PREFIX + "fix.lr": repr(config.lr),
        META_PREFIX + "fix.preserve": repr(config.preserve),
        META_PREFIX + "fix.validation": repr(config.validation),
    })
    if config.target:
        meta[META_PREFIX + "fix.target"] = json.dumps(list(config.target))
        meta[META_PREFIX + "fix.head_rows"] = config.head_rows
    if kept is not None:
        meta[META_PREFIX + "fix.kept_step"] = str(kept[0])
        meta[META_PREFIX + "fix.accepted"] = json.dumps(kept[1])
    return meta


def write_repaired(ckpt: LoadedCheckpoint, model: nn.Module, groups: Sequence[LayerGroup],
                   selected: Sequence[str], output: Path, metadata: Dict[str, str]
                   ) -> Tuple[str, int]:
    """Write the repaired checkpoint; verify it. Returns (sha256, identical tensor count).

    Tensors outside the retrained groups are the input file's own tensors (key, dtype and
    bytes unchanged); retrained ones are cast back to their input dtype.
    """
    if ckpt.in_memory:  # a module given in memory: its own state (float32) is the source
        raw = {k: v.detach().cpu() for k, v in ckpt.model.state_dict().items()}
    else:
        raw, _ = read_tensors(ckpt.weights_file or ckpt.path)
    key_of = {}
    for key in raw:
        stripped = strip_wrapper_prefixes({key: raw[key]})
        key_of[next(iter(stripped))] = key
    # the selected groups' parameters and buffers (BatchNorm statistics change with
    # batchnorm="train"; with "frozen" they are written back unchanged)
    retrained = {n for g in groups if g.name in selected
                 for n in g.parameter_names + g.buffer_names if n in key_of}
    new_state = model.state_dict()
    out: Dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        out[key] = value.contiguous()
    for name in retrained:
        key = key_of[name]
        out[key] = new_state[name].detach().cpu().to(raw[key].dtype).contiguous()
    data = save(out, metadata=metadata)
    if ckpt.weights_file is not None:  # a model directory: weights and its other files
        source = Path(ckpt.path)
        weights = Path(ckpt.weights_file).name
        copies = [(output / f.name, f.read_bytes()) for f in sorted(source.iterdir())
                  if f.is_file() and not f.name.startswith(".") and f.name != weights
                  and f.name != "model.safetensors"]
        atomic_write_files([(output / "model.safetensors", data)] + copies)
        output = output / "model.safetensors"
    else:
        atomic_write_bytes(output, data)
    identical = _verify_written(output, raw, out, {key_of[n] for n in retrained}, metadata)
    return sha256_file(output), identical


def _verify_written(output: Path, raw: Dict[str, torch.Tensor], out: Dict[str, torch.Tensor],
                    retrained: Set[str], metadata: Dict[str, str]) -> int:
    """Re-open ``output`` and check it against the input; return the identical tensor count.

    ``raw`` is the input's tensors, ``out`` what was written, ``retrained`` the keys that may
    differ from the input (they must be as computed); every other tensor must be the input's
    own bytes, and the metadata must read back unchanged.
    """
    back, meta_back = read_tensors(output)
    identical = 0
    for key, value in raw.items():
        written = back.get(key)
        if written is None or written.dtype != value.dtype or written.shape != value.shape:
            raise OutputError(f"verification of {output} failed: tensor {key} differs in name, "
                              "dtype or shape")
        same = torch.equal(_raw_bytes(written), _raw_bytes(value))
        is_retrained = key in retrained
        if not is_retrained:
            if not same:
                raise OutputError(f"verification of {output} failed: frozen tensor {key} changed")
            identical += 1
        elif not torch.equal(written, out[key]):
            raise OutputError(f"verification of {output} failed: tensor {key} was not written "
                              "as computed")
    if meta_back != metadata:
        raise OutputError(f"verification of {output} failed: metadata differs")
    return identical
