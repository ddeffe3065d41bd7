"""model-audit: which layer groups of a trained PyTorch classifier are responsible for its errors.

Public API::

    from model_audit import scan, ScanConfig, AuditOptions, load_checkpoint, open_probe
    result = scan("model.safetensors", "probe/", ScanConfig(AuditOptions(arch="resnet18-cifar")))
    result.flagged, result.to_dict()
"""
__version__ = "0.1.0"

from .checkpoint import LoadedCheckpoint, available_architectures, build_model, load_checkpoint  # noqa: E402
from .errors import (  # noqa: E402
    ArchitectureError, AuditError, CheckpointError, ConfigError, OutputError, ProbeError,
    ReplayError)
from .layers import LayerGroup, layer_groups  # noqa: E402
from .options import AuditOptions  # noqa: E402
from .probe import ProbeSet, open_probe  # noqa: E402
from .replay import ReplayConfig  # noqa: E402
from .scan import LayerScore, ScanConfig, ScanResult, scan, write_scan  # noqa: E402
from .schedules import (  # noqa: E402
    MomentumScheduler, beta_momentum, damping_ratio, damping_regime, hybrid_momentum)

__all__ = [
    "__version__", "ArchitectureError", "AuditError", "AuditOptions", "CheckpointError",
    "ConfigError", "LayerGroup", "LayerScore", "LoadedCheckpoint", "MomentumScheduler",
    "OutputError", "ProbeError", "ProbeSet", "ReplayConfig", "ReplayError", "ScanConfig",
    "ScanResult", "available_architectures", "beta_momentum", "build_model", "damping_ratio",
    "damping_regime", "hybrid_momentum", "layer_groups", "load_checkpoint", "open_probe", "scan",
    "write_scan",
]
