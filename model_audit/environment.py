"""What a result was computed on: the ``environment`` object of every result file.

A number in a result can move with the machine (float32 summation order differs between CPU
kernels and thread counts; ``python -m bench numerics`` measures by how much), so every file
says what produced it: library versions, the CPU kernels torch chose
(``torch.backends.cpu.get_cpu_capability()``), the intra-op thread count, the CUDA devices, the
memory layout, and the torchrun world (size and backend) of a distributed run.

Examples:
    >>> env = describe()
    >>> env["distributed"]["world_size"] >= 1 and env["threads"] >= 1
    True
"""
from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Any, Dict, Optional

import torch

from . import distributed

#: The libraries whose versions can change a number in a result (those installed are listed).
LIBRARIES = ("torch", "torchvision", "numpy", "scipy", "captum", "safetensors", "timm",
             "transformers")

#: Set to 1 to run convolutions in the channels-last layout on the CPU (opt-in; see
#: :func:`model_audit.core.evaluate.fast_layout`).
CHANNELS_LAST_ENV = "MODEL_AUDIT_CHANNELS_LAST"


def channels_last_requested() -> bool:
    """Whether ``MODEL_AUDIT_CHANNELS_LAST`` asks for the channels-last layout (default: no)."""
    return os.environ.get(CHANNELS_LAST_ENV, "0").strip().lower() in ("1", "true", "yes", "on")


def _version(name: str) -> Optional[str]:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _cuda() -> Optional[Dict[str, Any]]:
    if not torch.cuda.is_available():
        return None
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"version": torch.version.cuda, "devices": names,
            "cudnn": torch.backends.cudnn.version()}


def describe() -> Dict[str, Any]:
    """The machine and libraries of this process, as recorded in every result file."""
    ctx = distributed.current()
    versions = {name: v for name in LIBRARIES if (v := _version(name)) is not None}
    versions["torch"] = torch.__version__  # the build tag (+cpu, +cu130) included
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libraries": versions,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "cuda": _cuda(),
        "channels_last": channels_last_requested(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "distributed": {"world_size": ctx.world_size, "rank": ctx.rank,
                        "backend": ctx.backend},
    }
