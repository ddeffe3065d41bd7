"""``scan``: evaluate, replay, attribute, flag. The library call behind ``model-audit scan``.

Example:
    >>> from model_audit import scan, ScanConfig, AuditOptions
    >>> result = scan("model.safetensors", "probe/",  # doctest: +SKIP
    ...               ScanConfig(options=AuditOptions(arch="resnet18-cifar", normalize="cifar10")))
    >>> result.flagged  # doctest: +SKIP
    ('layer3', 'fc')
"""
from __future__ import annotations

import os
import platform
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from ..core.attribution import (METRIC_NAME, NET_METRIC_NAME, Attribution, GroupReductions, attribute,
                          group_net_reductions, group_reductions, net_positions)
from ..baselines import DEFAULT_BASELINES, Agreement, BaselineResult, resolve_baselines
from ..models.checkpoint import LoadedCheckpoint
from ..io.files import atomic_write_files, header, json_bytes, refuse_inputs
from ..errors import ConfigError, OutputError, ReplayError
from ..core.evaluate import EvaluationResult, evaluate, fast_layout
from ..core.layers import LayerGroup, layer_groups
from ..options import AuditOptions, resolve_device, resolve_inputs, seed_everything
from ..io.probe import BatchCache, ProbeSet
from ..core.replay import ReplayConfig, ReplayResult, replay

METRIC_DOC = ("score = share of the misclassified images' cross-entropy removed when the group "
              "alone takes its beta-scheduled replay displacement")
NET_METRIC_DOC = ("score = share of the loss of the misclassified images and twice as many "
                  "correctly classified ones removed when the group alone takes its "
                  "beta-scheduled replay displacement, scaled by the best of 1, 4, 16, 64")
#: The own metric's formulations (``--metric``); see the README's method section.
METRICS = {METRIC_NAME: METRIC_DOC, NET_METRIC_NAME: NET_METRIC_DOC}
FLAG_RULE_DOC = ("flagged when score > max(parameter share, 1 / number of groups), or when "
                 "the group has the highest score (above 0)")


@dataclass(frozen=True)
class ScanConfig:
    """Everything a scan needs besides its two inputs."""

    options: AuditOptions = field(default_factory=AuditOptions)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    bootstrap: int = 200        # bootstrap resamples for the flag frequency (0: off)
    baselines: Tuple[str, ...] = DEFAULT_BASELINES   # Captum/Auto-RGN baselines beside the metric
    baseline_steps: int = 50    # n_steps of the path methods (conductance, IG, influence)
    metric: str = METRIC_NAME   # the own metric's formulation: replay_reduction | net_reduction

    def validate(self) -> None:
        self.options.validate()
        self.replay.validate()
        if self.metric not in METRICS:
            raise ConfigError(f"unknown metric {self.metric!r}; valid: {', '.join(METRICS)}")
        if self.bootstrap < 0:
            raise ConfigError(f"bootstrap resamples must be >= 0, got {self.bootstrap}")
        resolve_baselines(list(self.baselines))
        if self.baseline_steps < 2:
            raise ConfigError(f"baseline steps must be >= 2, got {self.baseline_steps}")


@dataclass(frozen=True)
class LayerScore:
    """One layer group's result."""

    name: str
    params: int
    share: float
    reduction: float
    score: float
    score_interval: Tuple[float, float]
    flag_frequency: float
    flagged: bool
    baselines: Dict[str, Optional[float]] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "params": self.params, "share": self.share,
                "score": self.score, "score_interval": list(self.score_interval),
                "reduction": self.reduction, "flag_frequency": self.flag_frequency,
                "flagged": self.flagged, "baselines": dict(self.baselines)}


@dataclass(frozen=True)
class ScanResult:
    """The result of a scan; ``to_dict()`` is the content of ``audit.json``."""

    checkpoint: LoadedCheckpoint
    probe: ProbeSet
    evaluation: EvaluationResult
    layers: Tuple[LayerScore, ...]
    replay: Optional[ReplayResult]
    config: ScanConfig
    device: str
    timing: Dict[str, float]
    passes: Dict[str, int]
    warnings: Tuple[str, ...] = ()
    reductions: Optional[GroupReductions] = None
    baselines: Dict[str, BaselineResult] = field(default_factory=dict)
    agreement: Dict[str, Agreement] = field(default_factory=dict)
    metric_positions: Optional[Tuple[int, ...]] = None   # rows of ``reductions`` (net metric)

    @property
    def flagged(self) -> Tuple[str, ...]:
        return tuple(layer.name for layer in self.layers if layer.flagged)

    def cost(self) -> Dict[str, Dict[str, Any]]:
        """Wall time and passes of the own metric (replay + attribution) and each baseline."""
        own_s = self.timing.get("replay_s", 0.0) + self.timing.get("attribution_s", 0.0)
        own_fwd = self.passes["forward_images"] - self.evaluation.n
        costs = {METRIC_NAME: {"seconds": round(own_s, 4), "forward_images": own_fwd,
                               "backward_images": self.passes["backward_images"],
                               "relative_to_own": 1.0}}
        for name, b in self.baselines.items():
            costs[name] = {"seconds": round(b.seconds, 4), "forward_images": b.forward_images,
                           "backward_images": b.backward_images,
                           "relative_to_own": round(b.seconds / own_s, 4) if own_s > 0 else None}
        return costs

    def to_dict(self) -> Dict[str, Any]:
        ev = self.evaluation
        misclassified = [
            {"index": p, "source_index": int(self.probe.indices[p]), "label": int(ev.labels[p]),
             "prediction": int(ev.predictions[p]), "confidence": float(ev.confidences[p])}
            for p in ev.misclassified]
        model = self.checkpoint.to_dict()
        return {
            **header(),
            "model": model,
            "probe": {**self.probe.describe(), **ev.to_dict()},
            "metric": {"name": self.config.metric, "definition": METRICS[self.config.metric],
                       "flag_rule": FLAG_RULE_DOC},
            "granularity": self.config.options.granularity,
            "layers": [layer.to_dict() for layer in self.layers],
            "flagged": list(self.flagged),
            "replay": {**self.config.replay.to_dict(),
                       **(self.replay.to_dict() if self.replay else {"n": 0, "steps": []})},
            "damping": [s.to_dict() for s in self.replay.steps] if self.replay else [],
            "bootstrap": {"resamples": self.config.bootstrap, "seed": self.config.options.seed},
            "baselines": {name: {k: v for k, v in b.to_dict().items() if k not in ("scores", "raw")}
                          for name, b in self.baselines.items()},
            "agreement": {name: a.to_dict() for name, a in self.agreement.items()},
            "cost": self.cost(),
            "misclassified": misclassified,
            # r[i, g] per image (rows follow "index": the misclassified images, and for the
            # net reduction also the sampled correct ones): lets `compare` bootstrap over probe
            # samples from two audit.json files.
            "per_image": {
                "index": list(self.metric_positions) if self.metric_positions is not None
                else [m["index"] for m in misclassified],
                "reduction": ([[float(f"{v:.6g}") for v in row]
                               for row in self.reductions.matrix.tolist()]
                              if self.reductions is not None else []),
            },
            "timing": self.timing,
            "passes": self.passes,
            "seed": self.config.options.seed,
            "device": self.device,
            "environment": {"torch": torch.__version__, "python": platform.python_version()},
            "options": self.config.options.to_dict(),
            "warnings": list(self.warnings),
        }


def scan(checkpoint: Union[str, os.PathLike, LoadedCheckpoint],
         probe: Union[str, os.PathLike, ProbeSet], config: ScanConfig = ScanConfig(), *,
         progress: bool = False) -> ScanResult:
    """Scan a checkpoint: which layer groups are responsible for its errors on the probe.

    Args:
        checkpoint: a path, or a :class:`LoadedCheckpoint` (then ``probe`` must be a ProbeSet
            or a path opened with ``config.options``).
        probe: an ImageFolder directory, a ``.safetensors`` tensor file or a :class:`ProbeSet`.
        config: options, replay and bootstrap settings.
        progress: show progress bars (on a terminal).

    Returns:
        A :class:`ScanResult`. The model's parameters and buffers are not changed and no hooks
        are left on it, also when an error is raised.

    Raises:
        AuditError: bad checkpoint, probe or options.
    """
    config.validate()
    start = time.perf_counter()
    opts = config.options
    device = resolve_device(opts.device)
    seed_everything(opts.seed)
    ckpt, probe, warnings = resolve_inputs(checkpoint, probe, opts)
    model = ckpt.model
    groups: List[LayerGroup] = layer_groups(model, opts.granularity)
    timing: Dict[str, float] = {"load_s": time.perf_counter() - start}
    original_device = next(model.parameters()).device
    was_training = model.training
    deterministic = torch.backends.cudnn.deterministic
    stack = ExitStack()
    try:
        model.to(device).eval()
        torch.backends.cudnn.deterministic = True
        stack.enter_context(fast_layout(model, device))
        t0 = time.perf_counter()
        ev = evaluate(model, probe, device=device, batch_size=opts.batch_size, progress=progress)
        timing["evaluate_s"] = time.perf_counter() - t0
        errors = ev.misclassified
        passes = {"forward_images": ev.n, "backward_images": 0}
        result_replay: Optional[ReplayResult] = None
        reductions: Optional[GroupReductions] = None
        metric_positions: Optional[Tuple[int, ...]] = None
        baseline_results: Dict[str, BaselineResult] = {}
        agreements: Dict[str, Agreement] = {}
        shares = [g.share for g in groups]
        if errors:
            cache = BatchCache(probe, errors, opts.batch_size)
            t0 = time.perf_counter()
            try:
                result_replay = replay(model, cache, config=config.replay, device=device,
                                       progress=progress)
            except ReplayError as exc:
                if ckpt.nonfinite:
                    raise ReplayError(
                        f"{exc}. The checkpoint holds NaN/Inf values in "
                        f"{', '.join(ckpt.nonfinite[:10])}") from exc
                raise
            timing["replay_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            rows: List[int] = list(errors)
            if config.metric == NET_METRIC_NAME:
                rows = net_positions(ev.n, errors, opts.seed)
                reductions, _ = group_net_reductions(
                    model, BatchCache(probe, rows, opts.batch_size), result_replay.displacement,
                    groups, device=device, progress=progress)
                metric_positions = tuple(rows)
            else:
                reductions = group_reductions(model, cache, result_replay.displacement, groups,
                                              device=device, progress=progress,
                                              base_losses=result_replay.initial_losses)
            if not result_replay.lr_check_passed:
                warnings.append(
                    f"no replay learning rate from {config.replay.lr:g} down to "
                    f"{result_replay.peak_lr:.3g} passed the step-size check; the replay used "
                    f"{result_replay.peak_lr:.3g}: give a smaller --replay-lr")
            if result_replay.final_loss >= result_replay.initial_loss:
                warnings.append(
                    f"the replay did not lower the error loss ({result_replay.initial_loss:.4g} "
                    f"-> {result_replay.final_loss:.4g}): its displacement is a poor direction "
                    "and the scores are unreliable; try a smaller --replay-lr")
            timing["attribution_s"] = time.perf_counter() - t0
            passes["forward_images"] += result_replay.forward_images + reductions.forward_images
            passes["backward_images"] += result_replay.backward_images
            t0 = time.perf_counter()
            attr = attribute(reductions, shares, probe_size=ev.n, misclassified_positions=rows,
                             resamples=config.bootstrap, seed=opts.seed)
            timing["bootstrap_s"] = time.perf_counter() - t0
            names = resolve_baselines(list(config.baselines))
            if names:
                from ..baselines import agreement, compute_baselines
                t0 = time.perf_counter()
                baseline_results = compute_baselines(
                    model, cache, groups, names, device=device, progress=progress,
                    n_steps=config.baseline_steps, grad_sq=result_replay.initial_grad_sq)
                timing["baselines_s"] = time.perf_counter() - t0
                agreements = {n: agreement(attr.scores, b.scores, attr.flagged)
                              for n, b in baseline_results.items()}
            if not attr.scores.any():
                warnings.append("no layer group reduces the error loss in the replay; nothing "
                                "is flagged (try a smaller replay learning rate)")
        else:
            warnings.append("the model classifies every probe image correctly: there are no "
                            "errors to attribute, and nothing is flagged")
            zeros = np.zeros(len(groups))
            attr = Attribution(zeros, zeros, zeros.astype(bool), zeros, zeros, zeros, 0)
    finally:
        stack.close()
        model.to(original_device).train(was_training)
        torch.backends.cudnn.deterministic = deterministic
    layers = tuple(
        LayerScore(g.name, g.params, g.share, float(attr.reduction[i]), float(attr.scores[i]),
                   (float(attr.score_low[i]), float(attr.score_high[i])),
                   float(attr.flag_frequency[i]), bool(attr.flagged[i]),
                   {n: (float(b.scores[i]) if np.isfinite(b.scores[i]) else None)
                    for n, b in baseline_results.items()})
        for i, g in enumerate(groups))
    timing["total_s"] = time.perf_counter() - start
    return ScanResult(ckpt, probe, ev, layers, result_replay, config, device,
                      {k: round(v, 4) for k, v in timing.items()}, passes, tuple(warnings),
                      reductions, baseline_results, agreements, metric_positions)


def write_scan(result: ScanResult, out_dir: Union[str, os.PathLike]) -> Dict[str, Path]:
    """Write ``audit.json`` and ``report.html`` into ``out_dir`` (atomically, both or neither)."""
    from ..render.html import render_scan_report
    out = Path(out_dir)
    inputs = (Path(result.checkpoint.path), Path(result.probe.source))
    refuse_inputs([out], inputs, "; choose another directory")
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} exists and is not a directory")
    paths = {"audit": out / "audit.json", "report": out / "report.html"}
    refuse_inputs(paths.values(), inputs)
    data = result.to_dict()
    html = render_scan_report(data, result.probe)
    # Both files are written in full before either replaces an old one: a full disk or an
    # unwritable directory leaves the previous audit.json and report.html as they were.
    atomic_write_files([(paths["audit"], json_bytes(data)),
                        (paths["report"], html.encode("utf-8"))])
    return paths
