"""``fix``: surgical retraining of the flagged layer groups that never hands back a worse model.

Localise, then repair, then check the repair against the original and the obvious
alternatives:

1. **Selection.** ``layers="auto"`` takes the groups that ``scan`` flags on the part of the
   repair data trained on (on the targeted confusion's instances with ``target``); a given
   ``audit.json`` of the same checkpoint is reused; or name the groups. The probe is never
   scanned: it stays held-out evidence.
2. **Do no harm** (:mod:`.validate`). A stratified ``validation`` share of the repair data
   (default 0.2, never the probe) is held out. Along the repair its validation accuracy is
   scored at :data:`~.validate.CHECKPOINTS` states; the best is kept only when it beats the
   original (step 0, always a candidate) by more than noise (a one-sided max-statistic
   sign-flip test over the states tried, at 0.05: it accounts for picking the best).
   Otherwise the original is kept: "no repair found", no checkpoint is written
   (``write_anyway`` forces the best trained state) and the CLI exits with
   :data:`NO_REPAIR_EXIT`.
3. **Repair data and its batches.** By default (``wrong_fraction=None``, "natural") the
   batches sample the training part uniformly, epoch by epoch: the errors appear at their
   own rate among images the model gets right. With a ``target`` (:mod:`.target`) a
   ``target_fraction`` of every batch is drawn from the confusion's instances, and a repair
   of the classifier head changes only its rows of the predicted class (``head_rows``): no
   other class's logit moves: on the planted confusion, less than half the break rate of a
   repair of every row for 0.04 less repair rate (bench/RESULTS.md, section 3).
4. **Preservation.** ``preserve`` weighs a learning-without-forgetting term (Li and Hoiem
   2017): the divergence, at temperature 2, of the repaired model's outputs from the
   original's (computed once) on the images the original classified correctly.
5. **Training.** Only the selected groups' parameters get gradients; every other parameter is
   frozen, and every module outside the selection stays in eval mode (dropout off, BatchNorm
   statistics fixed). With ``batchnorm="train"`` (default) the BatchNorm layers *inside* the
   selection normalise with batch statistics and update their running statistics, as in
   training: a BatchNorm network's convolutions are only stable under gradient steps when
   their normalisation follows them (in eval mode a step is not scale-invariant, and the full
   fine-tune diverged at lr 0.01 on CIFAR-10). ``batchnorm="frozen"`` keeps every statistic
   as it was. SGD with a cosine learning rate and the momentum from the chosen schedule (beta
   by default), applied by :class:`~model_audit.core.schedules.MomentumScheduler`.
6. **Evaluation** before and after on the held-out probe: fixed (wrong -> right), broken
   (right -> wrong), net = fixed - broken = change in the number correct, per class, and an
   exact McNemar test of fixed vs broken (is the net more than churn?); with a target, its
   repair rate and the break rate.
7. **Controls**, each with the same data, batches, budget and validation: ``all`` (full
   fine-tune), ``random`` (random parameter-owning modules outside the selection with about
   the same parameter share; see :func:`~model_audit.commands.fix.select.random_control`) and
   ``rgn`` (the Auto-RGN selection of Lee et al. 2023: the same number of groups, those with
   the largest ||grad|| / ||weight|| on the repair data's errors). Each control is also
   compared with the flagged repair image by image (exact McNemar test on the probe images
   where exactly one of the two is right), so "beat" comes with a p-value.
8. **Output.** When a repair was found, a new safetensors checkpoint, written atomically
   (temp file in the same directory, fsync, rename), re-opened and verified: every tensor
   outside the retrained groups is byte-identical to the input (same key, dtype and bytes;
   the selected groups' BatchNorm statistics count as retrained), retrained tensors are cast
   back to their input dtype. Provenance goes in the metadata. The input is never modified.

Compute is reported as optimizer steps x trainable parameters (the parameter-count proxy the
paper's "82% savings" may use) and as wall time; backpropagation still passes through frozen
layers after the first selected group, so wall time saves less than the proxy suggests.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ... import distributed
from ...core.evaluate import EvaluationResult, evaluate, fast_layout
from ...core.layers import LayerGroup, layer_groups
from ...errors import ConfigError, ProbeError
from ...io.probe import BatchCache, ProbeSet
from ...models.checkpoint import LoadedCheckpoint
from ...models.registry import head_name
from ...options import resolve_data, resolve_device, resolve_inputs, seed_everything
from .select import check_overlap, control_groups, resolve_selection
from .target import parse_target, resolve_target
from .train import HeadRows, RepairDiverged, Teacher, batch_plan, retrain, retrained_names
from .validate import CHECKPOINTS, Trajectory, holdout
from .write import check_output_path, repair_metadata, write_repaired
from ...results.fix import SIGNIFICANCE_LEVEL, FixConfig, FixResult, RepairRun
from ...results.repair import Target

__all__ = ["NO_REPAIR_EXIT", "OverlapError", "RepairDiverged", "batch_plan", "check_overlap", "fix",
           "retrain"]

#: Warn when the repair data's error rate is below the probe's divided by this (the model was
#: probably trained on the repair data).
FIT_RATIO = 3.0
#: The CLI's exit code when no repair beat the original on validation (nothing written).
NO_REPAIR_EXIT = 3


class OverlapError(ProbeError):
    """The probe and the repair data share images."""


def fix(checkpoint: Union[str, os.PathLike, LoadedCheckpoint, nn.Module], train: Any,
        probe: Any, output: Optional[Union[str, os.PathLike]] = None,
        config: FixConfig = FixConfig(), *, audit: Optional[Union[str, os.PathLike]] = None,
        progress: bool = False) -> FixResult:
    """Retrain only the selected layer groups on ``train``; keep the result only when it beats
    the original on a validation part of ``train``; evaluate on ``probe``; controls.

    Args:
        checkpoint: the model to repair (never modified): a path, a loaded checkpoint or an
            ``nn.Module`` (``result.repaired`` is then the repaired copy).
        train: repair data the model was not trained on (an ImageFolder directory or tensor
            file, or in memory: a Dataset, a DataLoader or (inputs, labels)); a
            ``config.validation`` share of it is held out.
        probe: held-out evaluation data (must not share images with ``train``), in the same
            forms.
        output: where to write the repaired checkpoint (``.safetensors``), or None. It is
            written only when a repair was found (``result.written``), or with
            ``config.write_anyway``; ``result.repaired`` holds the repaired model then
            either way.
        config: options.
        audit: an ``audit.json`` of this checkpoint to take the flagged groups from.

    Raises:
        AuditError: bad inputs, an output that is an input, overlapping data, nothing flagged,
            a bad target or validation share, repair data too small to hold out a part.
    """
    config.validate()
    ranks = distributed.current().world_size
    if config.batch_size < ranks:
        raise ConfigError(f"batch size {config.batch_size} is smaller than the {ranks} ranks "
                          "it is split over; give --fix-batch-size of at least the number of ranks")
    start = time.perf_counter()
    opts = config.options
    inputs = [Path(p) for p in (checkpoint, train, probe, audit)
              if isinstance(p, (str, os.PathLike))]
    if output is not None:
        check_output_path(Path(output), inputs)  # before any work
    device = resolve_device(opts.device)
    seed_everything(opts.seed)
    with distributed.agree():  # a file one node cannot read stops every rank
        ckpt, probe_set, warnings = resolve_inputs(checkpoint, probe, opts)
        train_set, _ = resolve_data(ckpt, train, opts, limit=config.train_limit)
    parse_target(config.target, train_set.classes)  # a bad --target before any evaluation
    timing: Dict[str, float] = {}
    t0 = time.perf_counter()
    warnings += _overlap_warnings(probe_set, train_set, config.allow_overlap)
    timing["overlap_check_s"] = time.perf_counter() - t0
    model = ckpt.model
    groups = layer_groups(model, opts.granularity)
    t0 = time.perf_counter()
    before, train_eval = _evaluate(model, (probe_set, train_set), device, opts.batch_size,
                                   progress)
    timing["evaluate_s"] = time.perf_counter() - t0
    warnings += _data_warnings(train_eval, before)
    data = _RepairData.split(train_set, train_eval, config)
    if data.target is not None and data.target.auto:
        warnings.append(f"--target auto picked {data.target.names(train_set.classes)[0]}, the "
                        "largest confusion in the repair data")
    t0 = time.perf_counter()
    selected, source, scores = resolve_selection(config, groups, ckpt, data.scan_set(),
                                                 audit, progress)
    timing["selection_s"] = time.perf_counter() - t0
    repair = _Repair(model, groups, data, probe_set, before, config, device, progress)
    selection, repaired = repair.run("flagged", selected, groups)
    controls = [repair.control(name, selected, warnings) for name in config.controls]
    written = output is not None and (selection.validation.accepted or config.write_anyway)
    sha, identical = (_write(ckpt, repaired, groups, selected, Path(output), config, probe_set,
                             len(repair.plan), selection) if written else (None, 0))
    model.cpu()
    timing["total_s"] = time.perf_counter() - start
    kept = repaired.cpu() if selection.validation.accepted or config.write_anyway else None
    return FixResult(ckpt, probe_set, train_set.source, len(train_set), len(train_eval.misclassified),
                     selection, tuple(controls), config, str(output) if output else None, sha,
                     identical, device, {k: round(v, 3) for k, v in timing.items()},
                     tuple(warnings), source, written, data.summary(), data.target, scores,
                     kept)


def _write(ckpt: LoadedCheckpoint, repaired: nn.Module, groups: Sequence[LayerGroup],
           selected: Sequence[str], output: Path, config: FixConfig, probe: ProbeSet,
           steps: int, run: RepairRun) -> Tuple[str, int]:
    """Write the repaired checkpoint (rank 0) with its provenance; (sha256, identical tensors)."""
    opts = config.options
    v = run.validation
    meta = repair_metadata(ckpt, config, selected, opts.normalize or ckpt.normalize or "none",
                           probe.classes, steps, (v.chosen, v.accepted) if v else None)
    return distributed.on_main(write_repaired, ckpt, repaired.cpu(), groups, selected, output,
                               meta)


def _evaluate(model: nn.Module, sets: Sequence[ProbeSet], device: str, batch_size: int,
              progress: bool) -> List[EvaluationResult]:
    """The model (moved to ``device``, eval mode) evaluated on each set; the logits are kept
    for the last one (the repair data: the preservation term compares with them)."""
    model.to(device).eval()
    with fast_layout(model, device):
        return [evaluate(model, data, device=device, batch_size=batch_size, progress=progress,
                         keep_logits=i == len(sets) - 1) for i, data in enumerate(sets)]


def _overlap_warnings(probe: ProbeSet, train: ProbeSet, allow: bool) -> List[str]:
    """OverlapError when the probe and the repair data share images (by content), unless
    ``allow``; then a warning."""
    overlap = check_overlap(probe, train)
    if overlap and not allow:
        p, t = overlap[0]
        raise OverlapError(
            f"{len(overlap)} probe {probe.unit[:-1]}(s) also appear in the repair data (by "
            f"content hash; e.g. probe #{p} = train #{t}); the probe must be held out to count "
            "fixes honestly. Use a separate split, or pass --allow-overlap")
    return [f"{len(overlap)} probe {probe.unit} also appear in the repair data "
            "(--allow-overlap): fixes on them are not held-out evidence"] if overlap else []


def _data_warnings(train_eval: EvaluationResult, before: EvaluationResult) -> List[str]:
    """Warnings about a repair set with no errors, or one the model was trained on."""
    train_error, probe_error = 1.0 - train_eval.accuracy, 1.0 - before.accuracy
    if not train_eval.misclassified:
        return ["the model makes no errors on the repair data: batches hold only "
                "images it already gets right; a held-out validation split (not the "
                "probe) as --train gives the repair errors to learn from"]
    if train_error < probe_error / FIT_RATIO:
        return [f"the model fits the repair data far better than the probe "
                f"({100 * train_error:.1f}% vs {100 * probe_error:.1f}% errors): it was "
                "probably trained on it, so there are few errors to learn from; a held-out "
                "validation split (not the probe) as --train is a better repair set"]
    return []


@dataclass
class _RepairData:
    """The repair data split into the part trained on (``fit``) and the validation part, the
    original's outputs on them, and the target."""

    fit: ProbeSet
    val: ProbeSet
    fit_eval: EvaluationResult
    val_eval: EvaluationResult
    target: Optional[Target]
    share: float

    @classmethod
    def split(cls, train: ProbeSet, ev: EvaluationResult, config: FixConfig) -> "_RepairData":
        target = resolve_target(config.target, train.classes, ev)
        strata = target.mask(ev.labels, ev.predictions) if target is not None else None
        fit_pos, val_pos = holdout(train.labels, config.validation, config.options.seed,
                                   strata)
        return cls(train.subset(fit_pos), train.subset(val_pos), _rows(ev, fit_pos),
                   _rows(ev, val_pos), target, config.validation)

    @property
    def target_positions(self) -> List[int]:
        """Positions in ``fit`` of the targeted confusion's instances."""
        mask = self.target.mask(self.fit_eval.labels, self.fit_eval.predictions)
        return torch.nonzero(mask).flatten().tolist()

    @property
    def guard_positions(self) -> List[int]:
        """Positions in ``fit`` of the targeted repair's positive set: images of a confusion's
        predicted class that the model classifies correctly."""
        ev = self.fit_eval
        pred = torch.zeros(len(ev.labels), dtype=torch.bool)
        for _, p in self.target.pairs:
            pred |= ev.labels == p
        return torch.nonzero(pred & (ev.predictions == ev.labels)).flatten().tolist()

    def scan_set(self) -> ProbeSet:
        """What ``layers="auto"`` scans: the targeted confusion's instances, else the part
        trained on (never the probe, never the validation part)."""
        return self.fit.subset(self.target_positions) if self.target is not None else self.fit

    def teacher(self, weight: float) -> Optional[Teacher]:
        if weight <= 0:
            return None
        return Teacher(self.fit_eval.logits, self.fit_eval.predictions == self.fit_eval.labels,
                       weight)

    def head_rows(self, model: nn.Module, config: FixConfig) -> Optional[HeadRows]:
        """With a target and ``head_rows="target"``: the head's rows of the confusions'
        predicted classes, the only ones a repair of the head changes; else None."""
        if self.target is None or config.head_rows != "target":
            return None
        return HeadRows(head_name(model), tuple(sorted({p for _, p in self.target.pairs})))

    def plan(self, config: FixConfig) -> List[List[int]]:
        """The batches of every step (positions in ``fit``), shared by every run."""
        steps = config.steps or 1
        if config.epochs is not None:
            steps = max(1, math.ceil(config.epochs * len(self.fit) / config.batch_size))
        if self.target is not None:
            chosen = set(self.target_positions)
            others = [i for i in range(len(self.fit)) if i not in chosen]
            return batch_plan(sorted(chosen), others, steps, config.batch_size,
                              config.options.seed, config.target_fraction,
                              guard=self.guard_positions if config.guard else ())
        wrong = self.fit_eval.misclassified
        wrong_set = set(wrong)
        right = [i for i in range(len(self.fit)) if i not in wrong_set]
        return batch_plan(wrong, right, steps, config.batch_size, config.options.seed,
                          config.wrong_fraction)

    def summary(self) -> Dict[str, Any]:
        return {"share": self.share, "n": len(self.val), "fit_n": len(self.fit),
                "fit_wrong": len(self.fit_eval.misclassified),
                "accuracy_before": self.val_eval.accuracy}


def _rows(ev: EvaluationResult, positions: Sequence[int]) -> EvaluationResult:
    """The rows ``positions`` of an evaluation (logits included)."""
    idx = torch.as_tensor(list(positions), dtype=torch.long)
    return EvaluationResult(ev.labels[idx], ev.predictions[idx], ev.confidences[idx],
                            ev.losses[idx], ev.classes,
                            None if ev.logits is None else ev.logits[idx])


class _Repair:
    """Runs the selection and the controls with the same data, batches, budget and
    validation."""

    def __init__(self, model: nn.Module, groups: List[LayerGroup], data: _RepairData,
                 probe: ProbeSet, before: EvaluationResult, config: FixConfig, device: str,
                 progress: bool) -> None:
        self.model, self.groups, self.data, self.probe = model, groups, data, probe
        self.before, self.config, self.device, self.progress = before, config, device, progress
        self.plan = data.plan(config)
        self.teacher = data.teacher(config.preserve)
        self.head_rows = data.head_rows(model, config)
        self.val = BatchCache(data.val, list(range(len(data.val))),
                              config.options.batch_size, shard=True)
        self.total = sum(g.params for g in groups)

    def _trajectory(self, units: Sequence[LayerGroup], chosen: Sequence[str]) -> Trajectory:
        names = retrained_names(self.model, units, chosen)
        return Trajectory(self.val, self.data.val_eval.predictions, self.data.val_eval.losses,
                          names, max(1, len(self.plan) // CHECKPOINTS), SIGNIFICANCE_LEVEL,
                          self.device, keep_best=self.config.write_anyway,
                          max_break=self.config.max_break, seed=self.config.options.seed)

    def _probe(self, model: nn.Module) -> EvaluationResult:
        with fast_layout(model, self.device):
            return evaluate(model, self.probe, device=self.device,
                            batch_size=self.config.options.batch_size)

    def run(self, name: str, chosen: Sequence[str], units: Sequence[LayerGroup],
            disjoint: Optional[bool] = None) -> Tuple[RepairRun, nn.Module]:
        trajectory = self._trajectory(units, chosen)
        original = {k: v.detach().clone() for k, v in self.model.state_dict().items()
                    if k in set(trajectory.names)}
        rows = self.head_rows if self.head_rows and self.head_rows.retrained(units, chosen) \
            else None
        repaired, seconds = retrain(self.model, units, chosen, self.data.fit, self.plan,
                                    self.config, self.device, self.progress, f"retrain {name}",
                                    teacher=self.teacher, trajectory=trajectory,
                                    head_rows=rows)
        last = self._probe(repaired) if self.config.evaluate_last else None
        validation = trajectory.restore(repaired, original)
        # the original kept: its predictions are the ones measured before
        after = self._probe(repaired) if validation.chosen else self.before
        trainable = sum(g.params for g in units if g.name in chosen)
        if rows is not None:
            trainable -= rows.frozen_params(self.model)
        classes = self.data.fit.classes
        return RepairRun(name, tuple(chosen), trainable, trainable / self.total, len(self.plan),
                         seconds, after, self.before, disjoint=disjoint, validation=validation,
                         last=last, head_rows=tuple(classes[r] for r in rows.rows)
                         if rows is not None else ()), repaired

    def control(self, name: str, selected: Sequence[str], warnings: List[str]) -> RepairRun:
        """One control; a control that diverges is a result (and a warning), not an error."""
        wrong = self.data.fit_eval.misclassified
        chosen, units, disjoint = control_groups(
            name, self.model, self.groups, selected, self.data.fit, wrong,
            self.config.options.seed, self.config.options.batch_size, self.device)
        try:
            return self.run(name, chosen, units, disjoint)[0]
        except RepairDiverged as exc:
            trainable = sum(g.params for g in units if g.name in chosen)
            warnings.append(f"control {name!r} diverged: {exc}")
            return RepairRun(name, tuple(chosen), trainable, trainable / self.total,
                             len(self.plan), 0.0, self.before, self.before, str(exc), disjoint)


