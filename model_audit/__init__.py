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
from ._version import __version__
from .commands.compare import compare
from .commands.fix import fix
from .commands.gate import check_gate
from .commands.sanity import evidence_of, read_evidence, sanity, scan_with_best_method
from .commands.scan import scan
from .core.calibrate import PlantResult, calibrate
from .core.layers import LayerGroup, layer_groups
from .core.replay import ReplayConfig
from .core.schedules import (MomentumScheduler, beta_momentum, damping_ratio, damping_regime,
                             hybrid_momentum)
from .core.scoring import MethodEvidence
from .errors import (ArchitectureError, AuditError, CheckpointError, ConfigError,
                     DistributedError, OutputError, ProbeError, ReplayError)
from .io.probe import ProbeSet, open_probe
from .io.records import LayerScore
from .models.checkpoint import LoadedCheckpoint, load_checkpoint
from .models.registry import available_architectures, build_model
from .options import AuditOptions
from .outputs import write_compare, write_fix, write_gate, write_sanity, write_scan
from .policy import Policy, load_policy
from .render.html import render_directory
from .results.compare import CompareConfig, CompareResult
from .results.fix import FixConfig, FixResult
from .results.gate import GateResult
from .results.sanity import SanityConfig, SanityResult
from .results.scan import ScanConfig, ScanResult

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
