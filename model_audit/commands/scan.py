"""``scan``: evaluate, replay, attribute, flag. The library call behind ``model-audit scan``.

Examples:
    >>> from model_audit import scan, ScanConfig, AuditOptions
    >>> result = scan("model.safetensors", "probe/",  # doctest: +SKIP
    ...               ScanConfig(options=AuditOptions(arch="resnet18-cifar", normalize="cifar10")))
    >>> result.flagged  # doctest: +SKIP
    ('layer3', 'fc')
"""
from __future__ import annotations

import os
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from typing import Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from .. import distributed
from ..core.attribution import (METRIC_NAME, Attribution, GroupReductions, attribute,
                                error_rows, flag_rule, group_net_reductions,
                                group_reductions, metric_shares, net_positions)
from ..baselines import BASELINES, Agreement, BaselineResult, resolve_baselines
from ..models.checkpoint import LoadedCheckpoint
from ..io.records import LayerScore
from ..errors import ReplayError
from ..core.evaluate import EvaluationResult, evaluate, fast_layout
from ..core.layers import LayerGroup, layer_groups
from ..options import resolve_device, resolve_inputs, seed_everything
from ..io.probe import BatchCache, ProbeSet
from ..core.replay import ReplayConfig, ReplayResult, replay
from .ranking import choose_method, ranked
from ..results.scan import Ranking
from ..baselines import agreement, compute_baselines

from ..results.scan import ScanConfig, ScanResult
from ..core.alone import ALONE_METRIC_NAME, group_alone_reductions
from ..core.scoring import COMBINED

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
    with distributed.agree():  # a file one node cannot read stops every rank
        ckpt, probe, warnings = resolve_inputs(checkpoint, probe, opts)
    method, chosen_by, choice = choose_method(config.method, config.evidence, ckpt, probe,
                                              config.metric)
    needs = "auto_rgn" if method == COMBINED else method  # the baseline it ranks by
    if needs in BASELINES and needs not in resolve_baselines(list(config.baselines)):
        config = replace(config, baselines=tuple(config.baselines) + (needs,))
    groups: List[LayerGroup] = layer_groups(ckpt.model, opts.granularity)
    timing: Dict[str, float] = {"load_s": time.perf_counter() - start}
    with _on_device(ckpt.model, device):
        t0 = time.perf_counter()
        ev = evaluate(ckpt.model, probe, device=device, batch_size=opts.batch_size,
                      progress=progress)
        timing["evaluate_s"] = time.perf_counter() - t0
        if ev.misclassified:
            found = _attribute_errors(ckpt, probe, ev, groups, config, device, progress,
                                      timing, warnings, combine=method == COMBINED)
        else:
            warnings.append("the model classifies every probe image correctly: there are no "
                            "errors to attribute, and nothing is flagged")
            found = _Found.nothing(len(groups))
    passes = {"forward_images": ev.n + found.forward_images,
              "backward_images": found.backward_images}
    timing["total_s"] = time.perf_counter() - start
    if method != config.metric and needs not in found.baselines and ev.misclassified:
        warnings.append(f"{method} could not run on this probe: ranked by {config.metric}")
        method, chosen_by = config.metric, "default"
    if method == COMBINED and found.prior is None:  # no errors: nothing was combined
        method = config.metric
    order = ranked([g.name for g in groups],
                   _method_scores(found, method, config.metric, len(groups)))
    by_baseline = method in found.baselines
    layers = _layer_scores(groups, found, order if by_baseline else None)
    ranking = Ranking(method, chosen_by, config.evidence, order, choice)
    return ScanResult(ckpt, probe, ev, layers, found.replay, config,
                      device, {k: round(v, 4) for k, v in timing.items()}, passes,
                      tuple(warnings), found.reductions, found.baselines, found.agreements,
                      found.positions, ranking, found.prior)


@contextmanager
def _on_device(model: nn.Module, device: str) -> Iterator[None]:
    """The model in eval mode on ``device`` (fast layout, deterministic cuDNN) for the scan;
    its device, mode and layout as they were afterwards, also after an error."""
    original_device = next(model.parameters()).device
    was_training = model.training
    deterministic = torch.backends.cudnn.deterministic
    stack = ExitStack()
    try:
        model.to(device).eval()
        torch.backends.cudnn.deterministic = True
        stack.enter_context(fast_layout(model, device))
        yield
    finally:
        stack.close()
        model.to(original_device).train(was_training)
        torch.backends.cudnn.deterministic = deterministic


@dataclass(frozen=True)
class _Found:
    """What the stages after the evaluation found (nothing when there are no errors)."""

    attr: Attribution
    replay: Optional[ReplayResult] = None
    reductions: Optional[GroupReductions] = None
    positions: Optional[Tuple[int, ...]] = None   # rows of ``reductions`` (net metric)
    baselines: Dict[str, BaselineResult] = field(default_factory=dict)
    agreements: Dict[str, Agreement] = field(default_factory=dict)
    forward_images: int = 0
    backward_images: int = 0
    prior: Optional[Tuple[float, ...]] = None   # Auto-RGN's shares the scores combine with

    @classmethod
    def nothing(cls, n_groups: int) -> "_Found":
        zeros = np.zeros(n_groups)
        return cls(Attribution(zeros, zeros, zeros.astype(bool), zeros, zeros, zeros, 0))


def _attribute_errors(ckpt: LoadedCheckpoint, probe: ProbeSet, ev: EvaluationResult,
                      groups: List[LayerGroup], config: ScanConfig, device: str,
                      progress: bool, timing: Dict[str, float], warnings: List[str], *,
                      combine: bool = False) -> _Found:
    """Replay over the errors, the per-group reductions, the baselines, scores and flags
    (``combine``: the scores combined with Auto-RGN's shares)."""
    opts, errors = config.options, ev.misclassified
    cache = BatchCache(probe, errors, opts.batch_size, shard=True)
    t0 = time.perf_counter()
    result_replay = _replay(ckpt, cache, config, device, progress)
    timing["replay_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    reductions, rows = _reductions(ckpt.model, probe, ev, cache, result_replay, groups, config,
                                   device, progress)
    _check_reductions(reductions, groups, config.replay)
    warnings.extend(_replay_warnings(result_replay, config.replay))
    timing["attribution_s"] = time.perf_counter() - t0
    baseline_results = _baselines(ckpt.model, probe, cache, groups, config, device, progress,
                                  result_replay, timing, warnings)
    prior = None
    if combine and "auto_rgn" in baseline_results:
        prior = tuple(float(v) for v in np.nan_to_num(baseline_results["auto_rgn"].scores))
    t0 = time.perf_counter()
    net = config.metric != METRIC_NAME   # rows: the errors and a sample of correct images
    mask = error_rows(rows, errors)
    attr = attribute(reductions, [g.share for g in groups], probe_size=ev.n,
                     misclassified_positions=rows, resamples=config.bootstrap, seed=opts.seed,
                     prior=prior, error_rows=mask)
    if net and not (attr.reduction > 0).any():
        warnings.append(
            f"no layer group's correction ({config.metric}) removes more loss from the errors "
            "than it adds to the correctly classified images (as on an under-trained model): "
            "the scores are the shares of the errors' loss removed, without the net")
    timing["bootstrap_s"] = time.perf_counter() - t0
    own = metric_shares(reductions.matrix.numpy(), mask)  # not combined
    own_flags = flag_rule(own, np.array([g.share for g in groups]))
    agreements = {n: agreement(own, b.scores, own_flags) for n, b in baseline_results.items()}
    if not attr.scores.any():
        warnings.append("no layer group reduces the error loss; nothing is flagged"
                        + (" (try a smaller replay learning rate)"
                           if config.metric != ALONE_METRIC_NAME else ""))
    return _Found(attr, result_replay, reductions,
                  tuple(rows) if config.metric != METRIC_NAME else None, baseline_results,
                  agreements, result_replay.forward_images + reductions.forward_images,
                  result_replay.backward_images + reductions.backward_images, prior)


def _reductions(model: nn.Module, probe: ProbeSet, ev: EvaluationResult, cache: BatchCache,
                result_replay: ReplayResult, groups: List[LayerGroup], config: ScanConfig,
                device: str, progress: bool) -> Tuple[GroupReductions, List[int]]:
    """The own metric's per-image reductions and the probe positions of their rows."""
    opts, errors = config.options, ev.misclassified
    if config.metric == METRIC_NAME:
        return (group_reductions(model, cache, result_replay.displacement, groups,
                                 device=device, progress=progress,
                                 base_losses=result_replay.initial_losses), list(errors))
    rows = net_positions(ev.n, errors, opts.seed)
    net = BatchCache(probe, rows, opts.batch_size, shard=True)
    if config.metric == ALONE_METRIC_NAME:
        return group_alone_reductions(model, cache, net, groups, device=device,
                                      progress=progress), rows
    reductions, _ = group_net_reductions(model, net, result_replay.displacement, groups,
                                         device=device, progress=progress)
    return reductions, rows


def _baselines(model: nn.Module, probe: ProbeSet, cache: BatchCache, groups: List[LayerGroup],
               config: ScanConfig, device: str, progress: bool, result_replay: ReplayResult,
               timing: Dict[str, float], warnings: List[str]) -> Dict[str, BaselineResult]:
    """The baselines asked for that apply to this probe, on the errors."""
    names = resolve_baselines(list(config.baselines))
    if probe.integer_inputs:
        # a path from zeros to x in input space has no points between integers (token ids);
        # layer integrated gradients interpolates at each group's output and still applies
        scaling = [n for n in names if BASELINES[n].scales_input]
        if scaling:
            names = [n for n in names if n not in scaling]
            warnings.append(
                f"{', '.join(scaling)} left out: they evaluate the model at scaled inputs "
                "(a path from zeros), which integer inputs such as token ids do not have"
                + ("; integrated_gradients interpolates at each layer instead and runs"
                   if "integrated_gradients" in names else ""))
    if not names:
        return {}
    t0 = time.perf_counter()
    out = compute_baselines(model, cache, groups, names, device=device, progress=progress,
                            n_steps=config.baseline_steps, grad_sq=result_replay.initial_grad_sq)
    timing["baselines_s"] = time.perf_counter() - t0
    return out


def _replay(ckpt: LoadedCheckpoint, cache: BatchCache, config: ScanConfig, device: str,
            progress: bool) -> ReplayResult:
    """The replay; a failure on a checkpoint with NaN/Inf values says where they are."""
    try:
        return replay(ckpt.model, cache, config=config.replay, device=device, progress=progress)
    except ReplayError as exc:
        if ckpt.nonfinite:
            raise ReplayError(
                f"{exc}. The checkpoint holds NaN/Inf values in "
                f"{', '.join(ckpt.nonfinite[:10])}") from exc
        raise


def _check_reductions(reductions: GroupReductions, groups: List[LayerGroup],
                      config: ReplayConfig) -> None:
    """ReplayError when a group's replay step alone makes the error loss NaN/Inf."""
    finite = torch.isfinite(reductions.matrix).all(0)
    if not bool(finite.all()):
        bad = [g.name for g, ok in zip(groups, finite.tolist()) if not ok]
        raise ReplayError(
            f"the replay's step of {', '.join(bad[:10])} alone makes the error loss NaN/Inf "
            f"(peak learning rate {config.lr:g}); lower the replay learning rate (--replay-lr)")


def _replay_warnings(result: ReplayResult, config: ReplayConfig) -> List[str]:
    out = []
    if not result.lr_check_passed:
        out.append(
            f"no replay learning rate from {config.lr:g} down to "
            f"{result.peak_lr:.3g} passed the step-size check ({result.lr_trials} tried"
            + (f", {result.lr_skipped} halvings skipped: above the loss-scale bound"
               if result.lr_skipped else "")
            + f"); the replay used {result.peak_lr:.3g}: give a smaller --replay-lr")
    if result.final_loss >= result.initial_loss:
        out.append(
            f"the replay did not lower the error loss ({result.initial_loss:.4g} "
            f"-> {result.final_loss:.4g}): its displacement is a poor direction "
            "and the scores are unreliable; try a smaller --replay-lr")
    return out


def _method_scores(found: _Found, method: str, own: str, n_groups: int) -> np.ndarray:
    """The per-group scores ``method`` ranks by (``own``: the scan's own metric; none: a
    baseline that did not run)."""
    if method == own or (method == COMBINED and found.prior is not None):
        return np.asarray(found.attr.scores)
    if method in found.baselines:
        return np.asarray(found.baselines[method].scores)
    return np.full(n_groups, -np.inf)


def _layer_scores(groups: List[LayerGroup], found: _Found,
                  baseline_order: Optional[Tuple[str, ...]] = None) -> Tuple[LayerScore, ...]:
    """Per group: the own metric's score and flag, the baselines' scores. Ranked by a
    baseline (its ``baseline_order``), the flagged groups are its top k, k the number the own
    rule flags (a baseline has no flag rule of its own)."""
    attr = found.attr
    flagged = np.asarray(attr.flagged, dtype=bool)
    if baseline_order is not None:
        top = set(baseline_order[:int(flagged.sum())])
        flagged = np.array([g.name in top for g in groups], dtype=bool)
    return tuple(
        LayerScore(g.name, g.params, g.share, float(attr.reduction[i]), float(attr.scores[i]),
                   (float(attr.score_low[i]), float(attr.score_high[i])),
                   float(attr.flag_frequency[i]), bool(flagged[i]),
                   {n: (float(b.scores[i]) if np.isfinite(b.scores[i]) else None)
                    for n, b in found.baselines.items()})
        for i, g in enumerate(groups))


