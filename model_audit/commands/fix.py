"""``fix``: surgical retraining of the flagged layer groups, with controls.

Localise, then repair, then check the repair against the obvious alternatives:

1. **Selection.** ``layers="auto"`` takes the groups that ``scan`` flags (a scan runs first on
   the probe, or a given ``audit.json`` of the same checkpoint is reused); or name the groups.
2. **Repair data.** The training split (``--train``), never the probe. The model is evaluated
   on it once. By default (``wrong_fraction=None``, "natural") the batches sample it uniformly,
   epoch by epoch, so the errors appear at their own rate among images the model gets right
   and it learns from its errors without forgetting what it knew; ``wrong_fraction=f`` makes
   every batch a fraction ``f`` of errors instead (seeded, with replacement). Over-weighting
   the errors (f = 0.5) measured worse on CIFAR-10 (``bench/RESULTS.md``).
3. **Training.** Only the selected groups' parameters get gradients; every other parameter is
   frozen, and every module outside the selection stays in eval mode (dropout off, BatchNorm
   statistics fixed). With ``batchnorm="train"`` (default) the BatchNorm layers *inside* the
   selection normalise with batch statistics and update their running statistics, as in
   training: a BatchNorm network's convolutions are only stable under gradient steps when
   their normalisation follows them (in eval mode a step is not scale-invariant, and the full
   fine-tune diverged at lr 0.01 on CIFAR-10). ``batchnorm="frozen"`` keeps every statistic
   as it was. BatchNorm affine weights of selected groups are trained like any parameter. SGD
   with a cosine learning rate and the momentum from the chosen schedule (beta by default),
   applied by :class:`~model_audit.core.schedules.MomentumScheduler`.
4. **Evaluation** before and after on the held-out probe: fixed (wrong -> right), broken
   (right -> wrong), net = fixed - broken = change in the number correct, per class, and an
   exact McNemar test of fixed vs broken (is the net more than churn?).
5. **Controls**, each with the same data, batches and step budget: ``all`` (full fine-tune),
   ``random`` (random parameter-owning modules outside the selection with about the same
   parameter share; see :func:`_random_control`) and ``rgn`` (the Auto-RGN
   selection of Lee et al. 2023: the same number of groups, those with the largest
   ||grad|| / ||weight|| on the repair data's errors). Each control is also compared with
   the flagged repair image by image (exact McNemar test on the probe images where exactly
   one of the two is right), so "beat" comes with a p-value.
6. **Output.** A new safetensors checkpoint, written atomically (temp file in the same
   directory, fsync, rename), re-opened and verified: every tensor outside the retrained groups
   is byte-identical to the input (same key, dtype and bytes; the selected groups' BatchNorm
   statistics count as retrained), retrained tensors are cast back
   to their input dtype. Provenance goes in the metadata. The input is never modified.

Compute is reported as optimizer steps x trainable parameters (the parameter-count proxy the
paper's "82% savings" may use) and as wall time; backpropagation still passes through frozen
layers after the first selected group, so wall time saves less than the proxy suggests.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import __version__
from .._progress import progress_bar
from ..io.tensors import META_PREFIX, read_tensors
from ..models.checkpoint import LoadedCheckpoint, audit_metadata
from ..io.files import atomic_write_bytes, atomic_write_files, header, json_bytes, refuse_inputs
from ..errors import ConfigError, OutputError, ProbeError
from ..core.evaluate import EvaluationResult, evaluate, fast_layout
from ..core.layers import LayerGroup, layer_groups
from ..options import AuditOptions, load_inputs, resolve_device, seed_everything
from ..io.probe import BatchCache, ProbeSet, open_probe
from ..core.schedules import SCHEDULES, MomentumScheduler
from ..core.stats import mcnemar_exact
CONTROLS = ("all", "random", "rgn")
BATCHNORM_MODES = ("frozen", "train")
#: Warn when the repair data's error rate is below the probe's divided by this (the model was
#: probably trained on the repair data).
FIT_RATIO = 3.0

#: Level of the exact McNemar tests in the verdict ("significantly" better/worse, net != 0).
SIGNIFICANCE_LEVEL = 0.05


class OverlapError(ProbeError):
    """The probe and the repair data share images."""


class RepairDiverged(ConfigError):
    """The repair's loss became NaN/Inf."""


@dataclass(frozen=True)
class FixConfig:
    """Options of a repair (the model/probe options live in ``options``)."""

    options: AuditOptions = field(default_factory=AuditOptions)
    layers: Union[str, Tuple[str, ...]] = "auto"   # "auto" or group names
    steps: Optional[int] = 200          # optimizer steps (or give epochs)
    epochs: Optional[float] = None      # passes over the repair data (overrides steps)
    batch_size: int = 64                # images per step
    wrong_fraction: Optional[float] = None  # share of each batch drawn from the errors;
                                        # None ("natural"): sample the repair data uniformly
    lr: float = 0.01                    # peak learning rate (cosine to 0)
    schedule: str = "beta"              # momentum: beta | hybrid | constant
    batchnorm: str = "train"            # frozen: all BN in eval mode; train: BN layers of the
                                        # retrained groups normalise with batch statistics and
                                        # update their running statistics
    controls: Tuple[str, ...] = CONTROLS
    allow_overlap: bool = False
    train_limit: Optional[int] = None   # class-stratified subset of the repair data

    def validate(self) -> None:
        self.options.validate()
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        unknown = [c for c in self.controls if c not in CONTROLS]
        if unknown:
            raise ConfigError(f"unknown control(s) {', '.join(unknown)}; valid: "
                              f"{', '.join(CONTROLS)}, or none")
        if self.epochs is None and (self.steps is None or self.steps < 1):
            raise ConfigError("give steps >= 1 or epochs > 0")
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"epochs must be > 0, got {self.epochs}")
        if self.batch_size < 2:
            raise ConfigError(f"batch size must be >= 2, got {self.batch_size}")
        if self.batchnorm not in BATCHNORM_MODES:
            raise ConfigError(f"unknown batchnorm mode {self.batchnorm!r}; valid: "
                              f"{', '.join(BATCHNORM_MODES)}")
        if self.wrong_fraction is not None and not 0.0 <= self.wrong_fraction <= 1.0:
            raise ConfigError(f"wrong fraction must be between 0 and 1 (or natural), got "
                              f"{self.wrong_fraction}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"learning rate must be > 0, got {self.lr}")

    def to_dict(self) -> Dict[str, Any]:
        return {"layers": self.layers if isinstance(self.layers, str) else list(self.layers),
                "steps": self.steps, "epochs": self.epochs, "batch_size": self.batch_size,
                "wrong_fraction": self.wrong_fraction, "batchnorm": self.batchnorm,
                "lr": self.lr, "schedule": self.schedule, "controls": list(self.controls),
                "allow_overlap": self.allow_overlap, "train_limit": self.train_limit,
                "options": self.options.to_dict()}


@dataclass(frozen=True)
class RepairRun:
    """One retraining run (the selection or a control) and its effect on the probe."""

    name: str
    groups: Tuple[str, ...]
    trainable: int
    share: float
    steps: int
    seconds: float
    after: EvaluationResult
    before: EvaluationResult
    diverged: Optional[str] = None   # the message when this run's loss became NaN/Inf
    disjoint: Optional[bool] = None  # random control: trains no parameter of the selection

    @cached_property
    def fixed(self) -> List[int]:
        return torch.nonzero((self.before.predictions != self.before.labels)
                             & (self.after.predictions == self.after.labels)).flatten().tolist()

    @cached_property
    def broken(self) -> List[int]:
        return torch.nonzero((self.before.predictions == self.before.labels)
                             & (self.after.predictions != self.after.labels)).flatten().tolist()

    @property
    def net(self) -> int:
        return len(self.fixed) - len(self.broken)

    def summary(self) -> Dict[str, Any]:
        return {"name": self.name, "groups": list(self.groups), "trainable_params": self.trainable,
                "params_percent": 100.0 * self.share, "steps": self.steps,
                "compute_param_steps": self.steps * self.trainable,
                "seconds": round(self.seconds, 3), "accuracy_before": self.before.accuracy,
                "accuracy_after": self.after.accuracy, "fixed": len(self.fixed),
                "broken": len(self.broken), "net": self.net,
                # exact McNemar (sign) test of fixed vs broken: how likely a net at least this
                # far from 0 is if each changed image were as likely to break as to be fixed
                "net_p_value": mcnemar_exact(len(self.fixed), len(self.broken)),
                "diverged": self.diverged, "disjoint_from_selection": self.disjoint}


@dataclass(frozen=True)
class FixResult:
    """The repair, its controls and the written checkpoint."""

    checkpoint: LoadedCheckpoint
    probe: ProbeSet
    train_source: str
    train_n: int
    train_wrong: int
    selection: RepairRun
    controls: Tuple[RepairRun, ...]
    config: FixConfig
    output: Optional[str]
    output_sha256: Optional[str]
    verified_identical: int
    device: str
    timing: Dict[str, float]
    warnings: Tuple[str, ...] = ()
    selection_source: str = "names"

    def to_dict(self) -> Dict[str, Any]:
        sel = self.selection
        before, after = sel.before, sel.after
        classes = self.probe.classes

        def item(i: int) -> Dict[str, Any]:
            return {"index": i, "label": int(before.labels[i]),
                    "before": int(before.predictions[i]), "after": int(after.predictions[i]),
                    "confidence_before": float(before.confidences[i]),
                    "confidence_after": float(after.confidences[i])}

        still = torch.nonzero((before.predictions != before.labels)
                              & (after.predictions != after.labels)).flatten().tolist()
        per_class = []
        for c, name in enumerate(classes):
            mask = before.labels == c
            n = int(mask.sum())
            if n == 0:
                continue
            per_class.append({
                "class": name, "n": n,
                "accuracy_before": float((before.predictions[mask] == c).float().mean()),
                "accuracy_after": float((after.predictions[mask] == c).float().mean()),
                "fixed": sum(1 for i in sel.fixed if int(before.labels[i]) == c),
                "broken": sum(1 for i in sel.broken if int(before.labels[i]) == c)})
        total = self.checkpoint.parameters
        controls = []
        sel_right = after.predictions == after.labels
        for run in self.controls:
            s = run.summary()
            # a control that diverged produced no model to compare with
            s["flagged_beat_it"] = None if run.diverged else sel.net > run.net
            s["vs_flagged"] = None
            if not run.diverged:
                # paired on the same probe images: sel.net - run.net = only_flagged - only_control
                ctl_right = run.after.predictions == run.after.labels
                b = int((sel_right & ~ctl_right).sum())
                c = int((~sel_right & ctl_right).sum())
                s["vs_flagged"] = {"only_flagged_right": b, "only_control_right": c,
                                   "p_value": mcnemar_exact(b, c)}
            controls.append(s)
        alpha = SIGNIFICANCE_LEVEL
        sel_summary = sel.summary()
        full = next((r for r in self.controls if r.name == "all"), None)
        saving = (1.0 - sel.trainable / full.trainable) if full and full.trainable else None
        return {
            **header(),
            "model": self.checkpoint.to_dict(),
            "probe": {**self.probe.describe(), "n": len(self.probe)},
            "train": {"source": self.train_source, "n": self.train_n, "wrong": self.train_wrong},
            "config": self.config.to_dict(),
            "selection": {**sel_summary, "source": self.selection_source,
                          "total_params": total},
            "accuracy": {"before": before.accuracy, "after": after.accuracy},
            "fixed": len(sel.fixed), "broken": len(sel.broken), "net": sel.net,
            "compute": {"steps": sel.steps, "trainable_params": sel.trainable,
                        "param_steps": sel.steps * sel.trainable, "seconds": round(sel.seconds, 3),
                        "param_steps_saving_vs_full": saving},
            "per_class": per_class,
            "controls": controls,
            "verdict": {"beat_all_controls": all(c["flagged_beat_it"] for c in controls
                                                 if c["flagged_beat_it"] is not None)
                        if any(c["flagged_beat_it"] is not None for c in controls) else None,
                        "beat": [c["name"] for c in controls if c["flagged_beat_it"]],
                        "did_not_beat": [c["name"] for c in controls
                                         if c["flagged_beat_it"] is False],
                        "diverged": [c["name"] for c in controls if c["diverged"]],
                        "significance_level": alpha,
                        "beat_significantly": [
                            c["name"] for c in controls if c["flagged_beat_it"]
                            and c["vs_flagged"]["p_value"] < alpha],
                        "worse_significantly": [
                            c["name"] for c in controls if c["flagged_beat_it"] is False
                            and c["vs_flagged"]["p_value"] < alpha],
                        "net_significant": sel_summary["net_p_value"] < alpha},
            "images": {"fixed": [item(i) for i in sel.fixed],
                       "broken": [item(i) for i in sel.broken],
                       "still_wrong": [item(i) for i in still]},
            "output": {"path": self.output, "sha256": self.output_sha256,
                       "verified_identical_tensors": self.verified_identical},
            "device": self.device, "timing": self.timing, "seed": self.config.options.seed,
            "warnings": list(self.warnings),
        }


# ------------------------------------------------------------------------------------------


def content_hashes(probe: ProbeSet, batch_size: int = 256) -> List[str]:
    """SHA-1 of every image's decoded 8-bit pixels (shape included), in probe order."""
    out: List[str] = []
    for start in range(0, len(probe), batch_size):
        positions = list(range(start, min(start + batch_size, len(probe))))
        x = probe.load(positions, normalized=False)
        pixels = (x.clamp(0, 1) * 255).round().to(torch.uint8)
        for img in pixels:
            digest = hashlib.sha1(str(tuple(img.shape)).encode())
            digest.update(img.contiguous().numpy().tobytes())
            out.append(digest.hexdigest())
    return out


def check_overlap(probe: ProbeSet, train: ProbeSet) -> List[Tuple[int, int]]:
    """(probe position, train position) pairs of identical images."""
    train_index: Dict[str, int] = {}
    for i, h in enumerate(content_hashes(train)):
        train_index.setdefault(h, i)
    return [(i, train_index[h]) for i, h in enumerate(content_hashes(probe)) if h in train_index]


#: A disjoint random control is used when its parameter share is within this relative
#: distance of the selection's; otherwise the control falls back to whole groups.
RANDOM_SHARE_TOLERANCE = 0.25
#: The first random draw within this relative distance is taken as it is (so that the control
#: varies with the seed instead of converging on the one best-fitting subset).
RANDOM_SHARE_ACCEPT = 0.1


def _random_groups(groups: Sequence[LayerGroup], selected: Sequence[str], seed: int
                   ) -> Tuple[str, ...]:
    """Random whole groups with the share closest to the selection's (not the selection)."""
    target = sum(g.share for g in groups if g.name in selected)
    rng = np.random.default_rng(seed + 7919)
    best: Optional[Tuple[float, Tuple[str, ...]]] = None
    for _ in range(64):
        order = rng.permutation(len(groups))
        chosen: List[str] = []
        share = 0.0
        for i in order:
            if share >= target:
                break
            chosen.append(groups[i].name)
            share += groups[i].share
        names = tuple(g.name for g in groups if g.name in chosen)
        if set(names) == set(selected) and len(groups) > len(selected):
            continue
        gap = abs(share - target)
        if best is None or gap < best[0]:
            best = (gap, names)
    return best[1] if best else tuple(g.name for g in groups)


def _random_control(model: nn.Module, groups: Sequence[LayerGroup], selected: Sequence[str],
                    seed: int) -> Tuple[Tuple[str, ...], List[LayerGroup], bool]:
    """The ``random`` control: (names, the units they name, disjoint from the selection?).

    Whole groups are too coarse for a fair random control: in a ResNet the only sets of groups
    with the share of the flagged group usually *contain* it (layer2 + bn1 for layer2), and
    then the control is the selection again. So the control draws parameter-owning *modules*
    outside the selected groups, at random (seeded draws; each adds modules in random order,
    skipping those that would move its share away from the selection's), and takes the first
    draw within :data:`RANDOM_SHARE_ACCEPT` of the selection's share (else the closest of 256
    draws). When no draw comes within
    :data:`RANDOM_SHARE_TOLERANCE` of it (relative), it falls back to random whole groups
    with the closest share, which may overlap the selection (reported as not disjoint).
    """
    target = sum(g.share for g in groups if g.name in selected)
    taken = {p for g in groups if g.name in selected for p in g.parameter_names}
    modules = [u for u in layer_groups(model, "module") if not taken & set(u.parameter_names)]
    rng = np.random.default_rng(seed + 7919)
    best: Optional[Tuple[float, List[LayerGroup]]] = None
    for _ in range(256 if modules else 0):
        order = rng.permutation(len(modules))
        chosen: List[LayerGroup] = []
        share = 0.0
        for i in order:
            unit = modules[int(i)]
            if abs(share + unit.share - target) > abs(share - target) and chosen:
                continue  # adding it moves away from the target: try the next one
            chosen.append(unit)
            share += unit.share
        gap = abs(share - target)
        if best is None or gap < best[0]:
            best = (gap, chosen)
        if gap <= RANDOM_SHARE_ACCEPT * target:
            break  # the first draw close enough: random, not the one best-fitting subset
    if best is not None and target > 0 and best[0] <= RANDOM_SHARE_TOLERANCE * target:
        keep = {u.name for u in best[1]}
        units = [u for u in modules if u.name in keep]  # forward order
        return tuple(u.name for u in units), units, True
    names = _random_groups(groups, selected, seed)
    return names, list(groups), not (set(names) & set(selected))


def _batch_plan(wrong: List[int], right: List[int], steps: int, batch: int, seed: int,
                wrong_fraction: Optional[float] = None) -> List[List[int]]:
    """Train positions of every step.

    With a ``wrong_fraction``, each batch holds ``round(batch * wrong_fraction)`` images drawn
    from the errors and the rest from the images the model gets right (with replacement,
    seeded); when one pool is empty the other fills the batch. With ``None`` the repair data
    is sampled uniformly, epoch by epoch without replacement (plain fine-tuning: errors appear
    at their natural rate).
    """
    rng = np.random.default_rng(seed)
    plan: List[List[int]] = []
    if wrong_fraction is None:
        pool = np.asarray(sorted(wrong + right))
        order = np.empty(0, dtype=np.int64)
        for _ in range(steps):
            while len(order) < batch:
                order = np.concatenate([order, rng.permutation(pool)])
            plan.append(order[:batch].tolist())
            order = order[batch:]
        return plan
    n_wrong = int(round(batch * wrong_fraction))
    if not right:
        n_wrong = batch
    elif not wrong:
        n_wrong = 0
    for _ in range(steps):
        idx: List[int] = []
        if n_wrong:
            idx += rng.choice(wrong, size=n_wrong, replace=True).tolist()
        if batch - n_wrong:
            idx += rng.choice(right, size=batch - n_wrong, replace=True).tolist()
        plan.append(idx)
    return plan


def _retrain(base: nn.Module, groups: Sequence[LayerGroup], selected: Sequence[str],
             train: ProbeSet, plan: List[List[int]], config: FixConfig, device: str,
             progress: bool, desc: str) -> Tuple[nn.Module, float]:
    model = copy.deepcopy(base).to(device).eval()
    chosen = {p for g in groups if g.name in selected for p in g.parameter_names}
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(name in chosen)
        if name in chosen:
            trainable.append(p)
    if config.batchnorm == "train":
        buffers = {b for g in groups if g.name in selected for b in g.buffer_names}
        for name, module in model.named_modules():
            if (isinstance(module, nn.modules.batchnorm._BatchNorm)
                    and f"{name}.running_mean" in buffers):
                module.train()
    opt = torch.optim.SGD(trainable, lr=config.lr, momentum=0.0)
    lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=len(plan))
    momentum = MomentumScheduler(opt, config.schedule)
    start = time.perf_counter()
    torch.manual_seed(config.options.seed)
    with fast_layout(model, device):
        for step, idx in enumerate(progress_bar(plan, total=len(plan), desc=desc,
                                                enabled=progress)):
            x = train.load(idx).to(device)
            y = train.labels[idx].to(device)
            loss = F.cross_entropy(model(x).float(), y)
            if not math.isfinite(float(loss.detach())):
                raise RepairDiverged(
                    f"the repair of {', '.join(selected)} diverged at step {step} (loss "
                    f"{float(loss.detach())}) with lr {config.lr}; lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            lr_sched.step()
            momentum.step()
    for p in model.parameters():
        p.requires_grad_(True)
    return model, time.perf_counter() - start


def _check_output_path(output: Path, inputs: Sequence[Path]) -> None:
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


def _raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes (any dtype, any shape, 0-d included) as a flat uint8 tensor."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def write_repaired(ckpt: LoadedCheckpoint, model: nn.Module, groups: Sequence[LayerGroup],
                   selected: Sequence[str], output: Path, metadata: Dict[str, str]
                   ) -> Tuple[str, int]:
    """Write the repaired checkpoint; verify it. Returns (sha256, identical tensor count).

    Tensors outside the retrained groups are the input file's own tensors (key, dtype and
    bytes unchanged); retrained ones are cast back to their input dtype.
    """
    from safetensors.torch import save

    from ..io.tensors import sha256_file, strip_wrapper_prefixes
    raw, _ = read_tensors(ckpt.path)
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
    atomic_write_bytes(output, save(out, metadata=metadata))
    back, meta_back = read_tensors(output)
    identical = 0
    for key, value in raw.items():
        written = back.get(key)
        if written is None or written.dtype != value.dtype or written.shape != value.shape:
            raise OutputError(f"verification of {output} failed: tensor {key} differs in name, "
                              "dtype or shape")
        same = torch.equal(_raw_bytes(written), _raw_bytes(value))
        is_retrained = any(key == key_of[n] for n in retrained)
        if not is_retrained:
            if not same:
                raise OutputError(f"verification of {output} failed: frozen tensor {key} changed")
            identical += 1
        elif not torch.equal(written, out[key]):
            raise OutputError(f"verification of {output} failed: tensor {key} was not written "
                              "as computed")
    if meta_back != metadata:
        raise OutputError(f"verification of {output} failed: metadata differs")
    return sha256_file(output), identical


def _resolve_selection(config: FixConfig, groups: Sequence[LayerGroup], ckpt: LoadedCheckpoint,
                       probe: ProbeSet, audit: Optional[Union[str, os.PathLike]],
                       progress: bool) -> Tuple[Tuple[str, ...], str]:
    names = [g.name for g in groups]
    if config.layers != "auto":
        wanted = list(config.layers)
        unknown = [n for n in wanted if n not in names]
        if unknown or not wanted:
            raise ConfigError(f"unknown layer group(s) {', '.join(unknown) or '(none)'}; the "
                              f"groups at granularity {config.options.granularity!r} are: "
                              f"{', '.join(names)}")
        return tuple(n for n in names if n in wanted), "names"
    if audit is not None:
        from ..commands.compare import load_audit
        data = load_audit(audit)
        if data["model"].get("sha256") != ckpt.sha256:
            raise ConfigError(f"{audit} is the audit of another checkpoint (sha256 "
                              f"{str(data['model'].get('sha256'))[:12]}..., this one "
                              f"{ckpt.sha256[:12]}...); scan this checkpoint or drop --audit")
        if data.get("granularity", "group") != config.options.granularity:
            raise ConfigError(f"{audit} was made at granularity {data.get('granularity')!r}, "
                              f"not {config.options.granularity!r}")
        flagged = tuple(data["flagged"])
        source = f"audit {audit}"
    else:
        from ..commands.scan import ScanConfig, scan
        result = scan(ckpt, probe, ScanConfig(options=config.options, baselines=()),
                      progress=progress)
        flagged = result.flagged
        source = "scan"
    if not flagged:
        raise ConfigError("the scan flags no layer group, so --layers auto has nothing to "
                          "retrain; name the groups with --layers")
    unknown = [n for n in flagged if n not in names]
    if unknown:
        raise ConfigError(f"the audit flags groups this model does not have: {', '.join(unknown)}")
    return tuple(n for n in names if n in flagged), source


def fix(checkpoint: Union[str, os.PathLike], train: Union[str, os.PathLike],
        probe: Union[str, os.PathLike], output: Optional[Union[str, os.PathLike]],
        config: FixConfig = FixConfig(), *, audit: Optional[Union[str, os.PathLike]] = None,
        progress: bool = False) -> FixResult:
    """Retrain only the selected layer groups on ``train``; evaluate on ``probe``; controls.

    Args:
        checkpoint: the model to repair (never modified).
        train: repair data (ImageFolder directory or tensor file), a training split.
        probe: held-out evaluation data (must not share images with ``train``).
        output: where to write the repaired checkpoint (``.safetensors``), or None.
        config: options.
        audit: an ``audit.json`` of this checkpoint to take the flagged groups from.

    Raises:
        AuditError: bad inputs, an output that is an input, overlapping data, nothing flagged.
    """
    config.validate()
    start = time.perf_counter()
    opts = config.options
    inputs = [Path(checkpoint), Path(train), Path(probe)] + ([Path(audit)] if audit else [])
    if output is not None:
        _check_output_path(Path(output), inputs)  # before any work
    device = resolve_device(opts.device)
    seed_everything(opts.seed)
    ckpt, probe_set, warnings = load_inputs(checkpoint, probe, opts)
    normalize = opts.normalize or ckpt.normalize or "none"
    train_set = open_probe(train, channels=ckpt.in_channels, normalize=normalize,
                           resize=opts.resize, limit=config.train_limit, seed=opts.seed,
                           model_classes=ckpt.classes, num_classes=ckpt.num_classes)
    timing: Dict[str, float] = {}
    t0 = time.perf_counter()
    overlap = check_overlap(probe_set, train_set)
    timing["overlap_check_s"] = time.perf_counter() - t0
    if overlap and not config.allow_overlap:
        p, t = overlap[0]
        raise OverlapError(
            f"{len(overlap)} probe image(s) also appear in the repair data (by content hash; "
            f"e.g. probe #{p} = train #{t}); the probe must be held out to count fixes "
            "honestly. Use a separate split, or pass --allow-overlap")
    if overlap:
        warnings.append(f"{len(overlap)} probe images also appear in the repair data "
                        "(--allow-overlap): fixes on them are not held-out evidence")
    model = ckpt.model
    groups = layer_groups(model, opts.granularity)
    t0 = time.perf_counter()
    selected, source = _resolve_selection(config, groups, ckpt, probe_set, audit, progress)
    timing["selection_s"] = time.perf_counter() - t0
    model.to(device).eval()
    t0 = time.perf_counter()
    with fast_layout(model, device):
        before = evaluate(model, probe_set, device=device, batch_size=opts.batch_size,
                          progress=progress)
        train_eval = evaluate(model, train_set, device=device, batch_size=opts.batch_size,
                              progress=progress)
    timing["evaluate_s"] = time.perf_counter() - t0
    wrong = train_eval.misclassified
    wrong_set = set(wrong)
    right = [i for i in range(train_eval.n) if i not in wrong_set]
    train_error, probe_error = 1.0 - train_eval.accuracy, 1.0 - before.accuracy
    if not wrong:
        warnings.append("the model makes no errors on the repair data: batches hold only "
                        "images it already gets right; a held-out validation split (not the "
                        "probe) as --train gives the repair errors to learn from")
    elif train_error < probe_error / FIT_RATIO:
        warnings.append(
            f"the model fits the repair data far better than the probe ({100 * train_error:.1f}%"
            f" vs {100 * probe_error:.1f}% errors): it was probably trained on it, so there "
            "are few errors to learn from; a held-out validation split (not the probe) as "
            "--train is a better repair set")
    steps = config.steps or 1
    if config.epochs is not None:
        steps = max(1, math.ceil(config.epochs * len(train_set) / config.batch_size))
    plan = _batch_plan(wrong, right, steps, config.batch_size, opts.seed,
                        config.wrong_fraction)
    total = sum(g.params for g in groups)

    def run(name: str, chosen: Sequence[str], units: Sequence[LayerGroup],
            disjoint: Optional[bool] = None) -> Tuple[RepairRun, nn.Module]:
        repaired, seconds = _retrain(model, units, chosen, train_set, plan, config, device,
                                     progress, f"retrain {name}")
        with fast_layout(repaired, device):
            after = evaluate(repaired, probe_set, device=device, batch_size=opts.batch_size)
        trainable = sum(g.params for g in units if g.name in chosen)
        return RepairRun(name, tuple(chosen), trainable, trainable / total, len(plan),
                         seconds, after, before, disjoint=disjoint), repaired

    selection, repaired = run("flagged", selected, groups)
    controls: List[RepairRun] = []
    for control in config.controls:
        units: List[LayerGroup] = list(groups)
        disjoint: Optional[bool] = None
        if control == "all":
            chosen: Tuple[str, ...] = tuple(g.name for g in groups)
        elif control == "random":
            chosen, units, disjoint = _random_control(model, groups, selected, opts.seed)
        else:
            from ..baselines import compute_baselines
            errors = wrong[:512] if wrong else list(range(min(256, train_eval.n)))
            rgn = compute_baselines(model, BatchCache(train_set, errors, opts.batch_size),
                                    groups, ["auto_rgn"], device=device)["auto_rgn"].scores
            order = sorted(range(len(groups)), key=lambda i: (-np.nan_to_num(rgn[i], nan=-1), i))
            top = {groups[i].name for i in order[:len(selected)]}
            chosen = tuple(g.name for g in groups if g.name in top)
        try:
            controls.append(run(control, chosen, units, disjoint)[0])
        except RepairDiverged as exc:  # a failed control is a result, not a failed command
            trainable = sum(g.params for g in units if g.name in chosen)
            controls.append(RepairRun(control, tuple(chosen), trainable, trainable / total,
                                      len(plan), 0.0, before, before, str(exc), disjoint))
            warnings.append(f"control {control!r} diverged: {exc}")
    sha = None
    identical = 0
    if output is not None:
        meta = dict(ckpt.metadata)
        meta.update(audit_metadata(ckpt.arch, ckpt.num_classes, normalize=normalize,
                                   classes=ckpt.classes or probe_set.classes)
                    if not ckpt.arch.count(":") else {})
        meta.update({
            META_PREFIX + "version": __version__,
            META_PREFIX + "fix.source_sha256": ckpt.sha256,
            META_PREFIX + "fix.groups": json.dumps(list(selected)),
            META_PREFIX + "fix.schedule": config.schedule,
            META_PREFIX + "fix.seed": str(opts.seed),
            META_PREFIX + "fix.steps": str(len(plan)),
            META_PREFIX + "fix.lr": repr(config.lr),
        })
        repaired.cpu()
        sha, identical = write_repaired(ckpt, repaired, groups, selected, Path(output), meta)
    model.cpu()
    timing["total_s"] = time.perf_counter() - start
    return FixResult(ckpt, probe_set, str(train), len(train_set), len(wrong), selection,
                     tuple(controls), config, str(output) if output else None, sha, identical,
                     device, {k: round(v, 3) for k, v in timing.items()}, tuple(warnings),
                     source)


def write_fix(result: FixResult, out_dir: Union[str, os.PathLike]) -> Dict[str, Path]:
    """Write ``fix.json`` and ``report.html`` into ``out_dir`` (atomically, both or neither)."""
    from ..render.html import render_fix_report
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} exists and is not a directory")
    data = result.to_dict()
    html = render_fix_report(data, result.probe)
    paths = {"fix": out / "fix.json", "report": out / "report.html"}
    inputs = tuple(Path(p) for p in (result.checkpoint.path, result.train_source,
                                     result.probe.source))
    refuse_inputs(paths.values(), inputs)
    atomic_write_files([(paths["fix"], json_bytes(data)),
                        (paths["report"], html.encode("utf-8"))])
    return paths


def format_p(value: Optional[float]) -> str:
    """A p-value for tables: two significant digits, ``<0.001`` below that, ``-`` for None."""
    if value is None:
        return "-"
    return f"{value:.2g}" if value >= 0.001 else "<0.001"


def format_fix(data: Dict[str, Any]) -> str:
    """The readable summary the CLI prints."""
    sel = data["selection"]
    lines = [
        f"retrained {', '.join(sel['groups'])}: {sel['trainable_params']:,} parameters "
        f"({sel['params_percent']:.1f}% of {sel['total_params']:,}), {sel['steps']} steps, "
        f"{data['config']['schedule']} momentum",
        f"probe accuracy {100 * data['accuracy']['before']:.2f}% -> "
        f"{100 * data['accuracy']['after']:.2f}%: fixed {data['fixed']}, broken "
        f"{data['broken']}, net {data['net']:+d}",
    ]
    rows = [("selection", "groups", "params %", "fixed", "broken", "net", "p(net)",
             "param-steps", "seconds")]
    for run in [sel] + data["controls"]:
        unit = "modules" if run.get("disjoint_from_selection") else "groups"
        rows.append((run["name"], ",".join(run["groups"]) if len(run["groups"]) <= 4 else
                     f"{len(run['groups'])} {unit}", f"{run['params_percent']:.1f}",
                     str(run["fixed"]), str(run["broken"]), f"{run['net']:+d}",
                     format_p(run["net_p_value"]), f"{run['compute_param_steps']:.3g}",
                     f"{run['seconds']:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    table = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(r, widths))).rstrip() for r in rows]
    table.insert(1, "-" * len(table[0]))
    lines += table
    verdict = data["verdict"]
    alpha = verdict.get("significance_level", SIGNIFICANCE_LEVEL)
    lines.append(f"p(net): exact McNemar test of fixed vs broken; the net is "
                 f"{'' if verdict.get('net_significant') else 'NOT '}distinguishable from churn "
                 f"(p {format_p(sel['net_p_value'])}, level {alpha:g})")
    if data["controls"]:
        lines.append("the flagged selection beat: " + (", ".join(verdict["beat"]) or "none") +
                     ("; did not beat: " + ", ".join(verdict["did_not_beat"])
                      if verdict["did_not_beat"] else "") +
                     ("; diverged: " + ", ".join(verdict["diverged"])
                      if verdict["diverged"] else ""))
        paired = [f"{c['name']} p {format_p(c['vs_flagged']['p_value'])}" for c in data["controls"]
                  if c.get("vs_flagged")]
        if paired:
            lines.append("paired McNemar test against each control on the same probe images: " +
                         ", ".join(paired) + "; significantly better than: " +
                         (", ".join(verdict["beat_significantly"]) or "none") +
                         "; significantly worse than: " +
                         (", ".join(verdict["worse_significantly"]) or "none"))
    return "\n".join(lines)
