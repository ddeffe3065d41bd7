"""Time ``model_audit.commands.scan.scan`` against its floor, and every baseline against the own metric.

``python -m bench scan [--checkpoint reference-sgd|reference-adam|brief|PATH] [--probe-size
1000] [--baselines all] [--baseline-errors 32] [--device cpu|cuda|auto] [--out FILE]``:

1. the checkpoint: by default the fully trained SGD ResNet-18 of ``../shared/models``
   (``reference-sgd``); ``brief`` trains ``resnet18-cifar`` briefly here (heavy-ball SGD with
   the beta momentum over a cosine learning rate; cached OUTSIDE the repository in
   ``~/.cache/model-audit-bench`` or ``--cache-dir``);
2. cuts a stratified CIFAR-10 test probe (``probe-size / 10`` images per class) into the
   cache directory;
3. times, in one process, after a warm-up scan (imports, kernel selection):

   * a plain ``torch.no_grad()`` forward over the probe at the scan's batch size, images in
     memory, in the default and in the channels-last memory format;
   * the full library call ``scan(checkpoint, probe, ScanConfig(...))`` at its defaults (the
     default baselines included);
   * the replay's passes: as many plain forward+backward passes over the scan's errors as the
     replay takes steps. The **floor** is the forward over the probe plus these;
   * each baseline of ``--baselines`` standalone on the first ``--baseline-errors`` errors,
     as a cost per error against the own metric's (replay + attribution) per error;

4. prints a Markdown section (ratio scan/floor against the goal of 1.3, the scan's time
   against 60 s, its own timing breakdown, machine, commit, date, exact command) and appends
   it to the day's log, ``bench/log/DATE.md`` (or ``--out FILE``).

The data is ``../shared/data/cifar10-jpeg.tar.gz`` next to the repository (``--data``).
"""
from __future__ import annotations

import argparse
import itertools
import math
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from . import cifar
from ._common import (DEFAULT_TRAIN_BATCH, DEFAULT_TRAIN_PER_CLASS, DEFAULT_TRAIN_STEPS,
                      BusyMeter, _inside_repo, _sync, add_checkpoint_argument,
                      add_common_arguments, append_results, default_cache_dir, git_commit,
                      machine_info, prepare_checkpoint)

TARGET_SCAN_S = 60.0
TARGET_RATIO = 1.3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--probe-size", type=int, default=1000,
                        help="probe images, a multiple of 10 (stratified: size/10 per class) "
                             "[default: 1000]")
    parser.add_argument("--train-steps", type=int, default=DEFAULT_TRAIN_STEPS,
                        help=f"SGD steps of the brief training [default: {DEFAULT_TRAIN_STEPS}]")
    parser.add_argument("--train-batch", type=int, default=DEFAULT_TRAIN_BATCH,
                        help=f"training batch size [default: {DEFAULT_TRAIN_BATCH}]")
    parser.add_argument("--train-per-class", type=int, default=DEFAULT_TRAIN_PER_CLASS,
                        help="training images per class [default: "
                             f"{DEFAULT_TRAIN_PER_CLASS}]")
    parser.add_argument("--retrain", action="store_true",
                        help="train again even when a cached checkpoint exists")
    add_checkpoint_argument(parser, extra=", brief (a ResNet-18 trained here for "
                            "--train-steps)")
    parser.add_argument("--baselines", default="all",
                        help="baselines whose cost is measured against the own metric's, "
                             "standalone on --baseline-errors of the scan's errors [default: "
                             "all]")
    parser.add_argument("--baseline-errors", type=int, default=32,
                        help="misclassified images the baselines are timed on (the path "
                             "methods cost tens of passes per image) [default: 32]")
    parser.add_argument("--baseline-steps", type=int, default=50,
                        help="n_steps of the path baselines [default: 50]")
    add_common_arguments(parser)


# ------------------------------------------------------------------------------------------
# Model and data


# ------------------------------------------------------------------------------------------
# Timings


def time_floor(model, batches: List[Tuple[Any, Any]], device: str, repeats: int = 1) -> float:
    """``repeats`` forward+backward passes over every batch (eval mode, cross-entropy)."""
    import torch.nn.functional as F

    model.eval()
    model.zero_grad(set_to_none=True)
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        for x, y in batches:
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            loss.backward()
    _sync(device)
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds


def time_forward(model, batches: List[Tuple[Any, Any]], device: str,
                 channels_last: bool = False) -> float:
    """One plain ``torch.no_grad()`` forward over every batch (in channels-last memory format
    for the model and the inputs when asked; the model is contiguous again afterwards)."""
    import torch

    model.eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        for x, _ in batches:
            x = x.to(device)
            model(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
    _sync(device)
    seconds = time.perf_counter() - start
    model.to(memory_format=torch.contiguous_format)
    return seconds


def time_decode(probe_dir: Path, batch_size: int) -> Tuple[float, List[Tuple[Any, Any]]]:
    """Decode the probe's JPEGs once with the tool's reader; also returns the batches."""
    from model_audit.io.probe import open_probe
    start = time.perf_counter()
    probe = open_probe(probe_dir, channels=3, normalize="cifar10")
    batches = [(x, y) for _, x, y in probe.batches(batch_size)]
    return time.perf_counter() - start, batches


def error_batches(batches: List[Tuple[Any, Any]], positions: List[int], batch_size: int
                  ) -> List[Tuple[Any, Any]]:
    """The images at ``positions`` of the probe (in ``batches``), re-batched."""
    import torch

    x = torch.cat([b[0] for b in batches])[positions]
    y = torch.cat([b[1] for b in batches])[positions]
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]


def time_baselines(model, batches, groups, names, n_steps: int, device: str
                   ) -> Dict[str, Dict[str, Any]]:
    """Every baseline standalone (no gradient shared with a replay) on ``batches``."""
    from model_audit.baselines import compute_baselines
    rows = [(list(range(i, i + len(y))), x, y) for i, (x, y) in
            zip(itertools.accumulate([0] + [len(b[1]) for b in batches]), batches)]
    out = {}
    for name in names:
        print(f"  baseline {name} on {sum(len(b[1]) for b in batches)} errors ...", flush=True)
        r = compute_baselines(model, rows, groups, [name], device=device, n_steps=n_steps)[name]
        out[name] = {"seconds": r.seconds, "forward_images": r.forward_images,
                     "backward_images": r.backward_images}
    return out


# ------------------------------------------------------------------------------------------
# Report


def _fmt_s(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def _busy_text(other: Optional[float], machine: Dict[str, Any]) -> str:
    if other is None:
        return "unknown"
    text = f"{other:.2f} cores busy on average"
    cpus = machine.get("logical_cpus") or 0
    if cpus and other > 0.1 * cpus:
        text += (f" (**contended**: of {cpus}; absolute times are inflated, compare ratios "
                 "only)")
    else:
        text += " (quiet)"
    return text


def _model_text(r: Dict[str, Any]) -> str:
    t = r["training"]
    if t.get("checkpoint"):
        text = f"as given: `{t['checkpoint']}`"
        if t.get("reference"):
            text += " (fully trained, ../shared/models)"
        elif t.get("epochs"):
            text += (f" ({t['epochs']} epochs, test accuracy {100 * t['final_accuracy']:.2f}%, "
                     "from `python -m bench train`)")
        return text
    text = (f"{t['steps']} steps x batch {t['batch']} = {t['steps'] * t['batch']:,} images "
            f"({t['epochs']:.1f} epochs of a {t['train_images']:,}-image train subset) in "
            f"{t['seconds']:.0f} s")
    if t.get("reused"):
        text += " (checkpoint re-used from the cache; that time is from the run that trained it)"
    return text


def markdown_section(r: Dict[str, Any]) -> str:
    m, s = r["machine"], r["scan"]
    device = m["device"] + (f" ({m['gpu']})" if m.get("gpu") else "")
    floor = r["forward_s"] + r["replay_floor_s"]
    ratio = s["wall_s"] / floor
    met = ("met" if s["wall_s"] <= TARGET_SCAN_S else "NOT met",
           "met" if ratio <= TARGET_RATIO else "NOT met")
    k = s["replay_steps"]
    lines = [
        f"## {r['date']} — scan of {r['arch']} on a {r['probe_size']}-image CIFAR-10 probe, "
        f"{m['device']}", "",
        f"- command: `{r['command']}`",
        f"- commit: `{r['commit']}`",
        f"- machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']}, "
        f"{m['threads']} threads, Python {m['python']}, device {device}",
        f"- other processes during the timings: {_busy_text(r.get('other_cores'), m)}",
        f"- model: {r['arch']}, {r['parameters']:,} parameters; {_model_text(r)}",
        f"- probe: {r['probe_size']} images ({r['probe_size'] // 10} per class), accuracy "
        f"{100 * s['accuracy']:.2f}%, **{s['misclassified']} misclassified**; batch size "
        f"{r['batch_size']}; every timing after a warm-up scan in the same process", "",
        "| measurement | seconds |", "|---|---:|",
        f"| forward over the probe (plain `no_grad`, images in memory) | {r['forward_s']:.2f} |",
        f"| the same in channels-last memory format | {r['forward_cl_s']:.2f} |",
        f"| the replay's passes: {k} x forward+backward over the {s['misclassified']} errors "
        f"(plain) | {r['replay_floor_s']:.2f} |",
        f"| **floor** = forward over the probe + the replay's passes | **{floor:.2f}** |",
        f"| decoding the probe's JPEGs once (not in the floor) | {r['decode_s']:.2f} |",
        f"| **scan (library call, default settings and baselines, wall)** | "
        f"**{s['wall_s']:.2f}** |", "",
        f"**scan / floor: {ratio:.2f}** (goal <= {TARGET_RATIO}: {met[1]}); scan "
        f"{s['wall_s']:.1f} s (goal <= {TARGET_SCAN_S:.0f} s: {met[0]})", "",
        "Scan's own timing (`result.timing`, s): "
        + ", ".join(f"{key} {v:.2f}" for key, v in s["timing"].items()), "",
        "Passes (`result.passes`): " + ", ".join(f"{key} {v:,}" for key, v in s["passes"].items()),
        "", f"Flagged: {', '.join(s['flagged']) or 'none'}", ""]
    lines += _baseline_lines(r)
    return "\n".join(lines) + "\n"


def _baseline_lines(r: Dict[str, Any]) -> List[str]:
    s = r["scan"]
    own_name = next((n for n in ("alone_net", "replay_reduction", "net_reduction")
                     if n in s["cost"]), "replay_reduction")
    own = s["cost"].get(own_name, {})
    n_err = s["misclassified"]
    if not own or not n_err:
        return []
    own_per = own["seconds"] / n_err
    lines = [f"Cost per method. The own metric (replay + attribution) took {own['seconds']:.2f} "
             f"s for {n_err} errors ({1000 * own_per:.1f} ms per error). In the scan, with the "
             "default baselines: " + "; ".join(
                 f"{name} {c['seconds']:.2f} s ({c['relative_to_own']:.2f}x own)"
                 for name, c in s["cost"].items() if name != own_name) + ".", ""]
    if r.get("baselines"):
        n_b = r["baseline_errors"]
        lines += [f"Each baseline standalone (its own passes, none shared) on the first {n_b} of "
                  f"the errors, n_steps {r['baseline_steps']} for the path methods; ratio = "
                  "its seconds per error / the own metric's:", "",
                  "| baseline | seconds | fwd images | bwd images | ms per error | x own metric |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, c in r["baselines"].items():
            per = c["seconds"] / n_b
            lines.append(f"| {name} | {c['seconds']:.2f} | {c['forward_images']:,} | "
                         f"{c['backward_images']:,} | {1000 * per:.1f} | {per / own_per:.2f} |")
        lines.append("")
    return lines


# ------------------------------------------------------------------------------------------


def _check_args(args: argparse.Namespace) -> Optional[str]:
    if args.probe_size < 10 or args.probe_size % 10:
        return f"--probe-size must be a positive multiple of 10, got {args.probe_size}"
    if args.train_steps < 0 or args.train_batch < 1 or args.train_per_class < 1:
        return "--train-steps must be >= 0, --train-batch and --train-per-class >= 1"
    if args.baseline_errors < 1 or args.baseline_steps < 1:
        return "--baseline-errors and --baseline-steps must be >= 1"
    return None


def run(args: argparse.Namespace) -> int:
    command = shlex.join(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    commit = git_commit()  # at the start: the code this process imports
    problem = _check_args(args)
    data = args.data or cifar.CIFAR_TARBALL
    if problem is None and not Path(data).is_file():
        problem = cifar.missing_data_message(Path(data))
    cache = (args.cache_dir or default_cache_dir()).expanduser()
    if problem is None and _inside_repo(cache):
        problem = (f"--cache-dir {cache} is inside the repository; the checkpoint and the "
                   "CIFAR images must stay outside it")
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from model_audit.baselines import resolve_baselines
    names = resolve_baselines(args.baselines)  # a bad name fails before any work
    cache.mkdir(parents=True, exist_ok=True)

    import torch

    from model_audit.models.checkpoint import load_checkpoint
    from model_audit.core.layers import layer_groups
    from model_audit.options import AuditOptions, resolve_device
    from model_audit.commands.scan import scan
    from model_audit.results.scan import ScanConfig
    device = resolve_device(args.device)
    classes = sorted(cifar.CIFAR10_CLASSES)
    train_dir = (cifar.cifar_subset(cache / "cifar10", "train", args.train_per_class,
                                    tarball=data) if str(args.checkpoint) == "brief" else None)
    probe_dir = cifar.cifar_subset(cache / "cifar10", "test", args.probe_size // 10,
                                   tarball=data)
    ckpt_path, training = prepare_checkpoint(cache, train_dir, args, device, classes)
    arch = training.get("arch") or load_checkpoint(ckpt_path).arch
    options = AuditOptions(arch=training.get("arch"), normalize="cifar10", device=device)
    config = ScanConfig(options=options)
    batch_size = options.batch_size
    model = load_checkpoint(ckpt_path, arch=training.get("arch")).model.to(device).eval()
    print(f"timing on {device} with {torch.get_num_threads()} threads (probe "
          f"{args.probe_size} images, batch {batch_size}) ...", flush=True)
    meter = BusyMeter()
    decode_s, batches = time_decode(probe_dir, batch_size)
    # Warm-up (imports, kernel selection, allocator) outside every timing.
    # The first scan of a process pays for the kernels of every batch shape once: a warm-up
    # scan of the whole probe, so that the timed one is compared with a warm floor.
    scan(ckpt_path, probe_dir, config)
    time_floor(model, batches[:1], device)
    time_forward(model, batches[:1], device, channels_last=True)
    forward_s = time_forward(model, batches, device)
    forward_cl_s = time_forward(model, batches, device, channels_last=True)
    print(f"  forward over the probe: {forward_s:.2f} s (channels-last {forward_cl_s:.2f} s)",
          flush=True)
    start = time.perf_counter()
    result = scan(ckpt_path, probe_dir, config)
    _sync(device)
    wall_s = time.perf_counter() - start
    errors = result.evaluation.misclassified
    print(f"  scan: {wall_s:.2f} s ({len(errors)} misclassified)", flush=True)
    wrong = error_batches(batches, errors, batch_size)
    replay_floor_s = time_floor(model, wrong, device, repeats=config.replay.steps)
    other_cores = meter.other_cores()
    timed = error_batches(batches, errors[:args.baseline_errors], batch_size)
    costs = time_baselines(model, timed, layer_groups(model, options.granularity), names,
                           args.baseline_steps, device) if names and errors else {}
    ev = result.evaluation
    record = {"date": date, "command": command, "commit": commit,
              "machine": machine_info(device), "training": training, "arch": arch,
              "probe_size": args.probe_size, "batch_size": batch_size,
              "parameters": sum(p.numel() for p in model.parameters()),
              "forward_s": forward_s, "forward_cl_s": forward_cl_s,
              "replay_floor_s": replay_floor_s, "decode_s": decode_s,
              "other_cores": other_cores, "baselines": costs,
              "baseline_errors": min(args.baseline_errors, len(errors)),
              "baseline_steps": args.baseline_steps,
              "scan": {"wall_s": wall_s, "timing": dict(result.timing),
                       "passes": dict(result.passes), "misclassified": len(errors),
                       "accuracy": ev.accuracy, "flagged": list(result.flagged),
                       "cost": result.cost(), "replay_steps": config.replay.steps}}
    section = markdown_section(record)
    print()
    print(section)
    problem = append_results(args.out, section)
    print(f"note: not recorded: {problem}" if problem else f"appended to {args.out}",
          file=sys.stderr if problem else sys.stdout)
    return 0 if math.isfinite(wall_s) else 1
