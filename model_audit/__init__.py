"""model-audit: which layer groups of a trained PyTorch classifier are responsible for its errors.

Public API (one call per pipeline stage, each returning a frozen result with ``to_dict()``)::

    from model_audit import scan, compare, fix, check_gate, load_policy, ScanConfig, AuditOptions
    result = scan("model.safetensors", "probe/", ScanConfig(AuditOptions(arch="resnet18-cifar")))
    result.flagged, result.to_dict()
    compare(result_a, result_b).jaccard
    fix("model.safetensors", "train/", "probe/", "fixed.safetensors").to_dict()["net"]
    check_gate("model.safetensors", "probe/", load_policy("policy.toml")).exit_code
    sanity("model.safetensors", "probe/", SanityConfig(defects=("noise",))).summary
    scan("model.safetensors", "probe/", ScanConfig(method="auto",
         evidence=read_evidence("sanity.json"))).ranking.trust()
"""
__version__ = "0.1.0"

from .models.checkpoint import LoadedCheckpoint, load_checkpoint

from .models.registry import available_architectures, build_model
from .errors import (  # noqa: E402
    ArchitectureError, AuditError, CheckpointError, ConfigError, DistributedError, OutputError,
    ProbeError, ReplayError)
from .core.layers import LayerGroup, layer_groups  # noqa: E402
from .options import AuditOptions  # noqa: E402
from .io.probe import ProbeSet, open_probe  # noqa: E402
from .core.replay import ReplayConfig  # noqa: E402
from .commands.scan import LayerScore, ScanConfig, ScanResult, scan, write_scan  # noqa: E402
from .commands.compare import CompareConfig, CompareResult, compare, write_compare  # noqa: E402
from .commands.fix import FixConfig, FixResult, fix, write_fix  # noqa: E402
from .commands.gate import GateResult, check_gate, write_gate  # noqa: E402
from .commands.policy import Policy, load_policy  # noqa: E402
from .render.html import render_directory  # noqa: E402
from .core.calibrate import PlantResult, calibrate  # noqa: E402
from .commands.sanity import (  # noqa: E402
    SanityConfig, SanityResult, evidence_of, read_evidence, sanity, scan_with_best_method,
    write_sanity)
from .core.scoring import MethodEvidence  # noqa: E402
from .core.schedules import (  # noqa: E402
    MomentumScheduler, beta_momentum, damping_ratio, damping_regime, hybrid_momentum)

__all__ = [
    "__version__", "ArchitectureError", "AuditError", "AuditOptions", "CheckpointError",
    "CompareConfig", "CompareResult", "FixConfig", "FixResult", "GateResult", "Policy",
    "check_gate", "compare", "fix", "load_policy", "render_directory", "write_compare",
    "write_fix", "write_gate", "PlantResult", "calibrate", "SanityConfig", "SanityResult",
    "sanity", "write_sanity", "MethodEvidence", "evidence_of", "read_evidence",
    "scan_with_best_method",
    "ConfigError", "DistributedError", "LayerGroup", "LayerScore", "LoadedCheckpoint",
    "MomentumScheduler",
    "OutputError", "ProbeError", "ProbeSet", "ReplayConfig", "ReplayError", "ScanConfig",
    "ScanResult", "available_architectures", "beta_momentum", "build_model", "damping_ratio",
    "damping_regime", "hybrid_momentum", "layer_groups", "load_checkpoint", "open_probe", "scan",
    "write_scan",
]
