"""Time ``model_audit.scan.scan`` on a CIFAR-10 ResNet-18 against the cost of one gradient pass.

``python -m bench scan [--probe-size 1000] [--device cpu|cuda|auto] [--train-steps N]
[--out FILE]``:

1. builds ``resnet18-cifar`` (10 classes) and trains it briefly on a CIFAR-10 train subset
   (heavy-ball SGD with the beta momentum schedule over a cosine learning rate), so that it is
   not at chance; the checkpoint is cached OUTSIDE the repository
   (``~/.cache/model-audit-bench`` or ``--cache-dir``) and re-used by later runs with the
   same training settings;
2. cuts a stratified CIFAR-10 test probe (``probe-size / 10`` images per class) into the same
   cache directory;
3. times, in one process and one run, side by side:

   * the floor: one plain forward+backward pass over the whole probe (model in eval mode,
     cross-entropy, ``loss.backward()``) at the scan's batch size, images already in memory;
   * one plain forward pass over the probe (no gradient);
   * decoding the probe's JPEGs once (the scan reads the images itself);
   * the full library call ``scan(checkpoint, probe, ScanConfig(options=AuditOptions(
     normalize="cifar10", device=...)))`` with every other setting at its default;

4. prints a Markdown section with the numbers (scan time, floor, ratio scan/floor, the scan's
   own timing breakdown, misclassified count, machine, commit, date, exact command) and
   appends it to ``bench/RESULTS.md`` (or ``--out FILE``) when that file can be written.

The data is ``../shared/data/cifar10-jpeg.tar.gz`` next to the repository (``--data``).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = ROOT / "bench" / "RESULTS.md"
ARCH = "resnet18-cifar"
NUM_CLASSES = 10
TARGET_SCAN_S = 60.0

#: Training defaults. A few hundred steps at batch 128 take far too long on a small CPU
#: (about 2-3 s a step on 2 cores); 60 steps (about 1.5 epochs of the 5,000-image subset)
#: bring ResNet-18 well above chance in a few minutes there. Use --train-steps for more.
DEFAULT_TRAIN_STEPS = 60
DEFAULT_TRAIN_BATCH = 128
DEFAULT_TRAIN_PER_CLASS = 500
DEFAULT_PEAK_LR = 0.05

RESULTS_HEADER = """# Benchmark results

Appended by `python -m bench scan` (see `bench/scan_bench.py`): the wall time of the full
`model_audit.scan.scan(...)` library call on a 1000-image CIFAR-10 test probe and a briefly
trained `resnet18-cifar`, next to the floor, one plain forward+backward pass over the same
probe at the same batch size. Numbers are from one run each; the load average shows whether
the machine was busy.
"""


def _cifar_module():
    """``tests/cifar.py`` (the one place that knows the archive's layout), loaded by path."""
    spec = importlib.util.spec_from_file_location("_model_audit_tests_cifar",
                                                  ROOT / "tests" / "cifar.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "model-audit-bench"


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
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="scan this CIFAR-10 checkpoint (with the tool's metadata, e.g. "
                             "one of `python -m bench train`) instead of the briefly trained one")
    add_common_arguments(parser)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device``, ``--out``, ``--cache-dir`` and ``--data``: the same in every CIFAR bench."""
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where to run (auto: cuda when available) [default: auto]")
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS,
                        help="Markdown file the result section is appended to "
                             "[default: bench/RESULTS.md]")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where the checkpoints and CIFAR subsets are kept (outside the "
                             "repository) [default: ~/.cache/model-audit-bench]")
    parser.add_argument("--data", type=Path, default=None,
                        help="the CIFAR-10 JPEG archive [default: "
                             "../shared/data/cifar10-jpeg.tar.gz]")


# ------------------------------------------------------------------------------------------
# Environment


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", "--no-optional-locks", *args], cwd=ROOT,
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> str:
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    changes = _git("status", "--porcelain", "--untracked-files=no")
    if changes:
        commit += " (with uncommitted changes to tracked files)"
    return commit


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def load_average() -> Optional[Tuple[float, float, float]]:
    try:
        return os.getloadavg()
    except OSError:
        return None


class BusyMeter:
    """CPU time used by OTHER processes over an interval, from ``/proc/stat`` and our own
    ``os.times()``: the average number of cores something else kept busy (Linux only)."""

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> Optional[Tuple[float, float, float]]:
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
            ticks = os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None
        values = [int(v) for v in fields]
        # user nice system idle iowait irq softirq steal (guest time is inside user)
        busy = sum(values[i] for i in (0, 1, 2, 5, 6, 7) if i < len(values)) / ticks
        own = os.times()
        return time.perf_counter(), busy, own.user + own.system

    def other_cores(self) -> Optional[float]:
        end = self._sample()
        if self.start is None or end is None or end[0] <= self.start[0]:
            return None
        wall = end[0] - self.start[0]
        other = (end[1] - self.start[1]) - (end[2] - self.start[2])
        return max(other, 0.0) / wall


def machine_info(device: str) -> Dict[str, Any]:
    import torch

    info: Dict[str, Any] = {
        "cpu": cpu_model(), "logical_cpus": os.cpu_count(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "python": platform.python_version(),
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def section_header(title: str, command: str, commit: str, device: str) -> List[str]:
    """The first lines of a RESULTS.md section: title with the date, command, commit, machine."""
    machine = machine_info(device)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [f"## {when} — {title}", "", f"- command: `{command.strip()}`", f"- commit: `{commit}`",
            f"- machine: {machine.get('cpu')}, {machine.get('threads')} threads, torch "
            f"{machine.get('torch')}" + (f", GPU {machine['gpu']}" if machine.get("gpu") else "")]


def _inside_repo(path: Path) -> bool:
    path = path.resolve()
    return path == ROOT or ROOT in path.parents


# ------------------------------------------------------------------------------------------
# Model and data


def scale_defaults(device: str, arch: Optional[str], per_class: Optional[int]
                   ) -> Tuple[str, int]:
    """The architecture and training images per class when not given: the paper's scale
    (``resnet18-cifar``, all 5,000 per class) on a GPU, a reduced one (``tiny-resnet``, 1,000)
    on a CPU."""
    gpu = device.startswith("cuda")
    return (arch or ("resnet18-cifar" if gpu else "tiny-resnet"),
            per_class or (5000 if gpu else 1000))


def pick_device(name: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else as given."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def train_model(train_dir: Path, steps: int, batch: int, device: str, classes,
                lr: float = DEFAULT_PEAK_LR, seed: int = 0):
    """Heavy-ball SGD with the beta momentum over a cosine learning rate; random flips."""
    import torch
    import torch.nn.functional as F

    from model_audit.checkpoint import build_model
    from model_audit.schedules import MomentumScheduler

    cifar = _cifar_module()
    x, y, _ = cifar.load_images(train_dir, normalize="cifar10", classes=classes)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build_model(ARCH, NUM_CLASSES).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0, weight_decay=5e-4)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    momentum = MomentumScheduler(opt, "beta")
    model.train()
    start = time.perf_counter()
    correct = seen = 0
    last_loss = float("nan")
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        xb, yb = x[idx], y[idx]
        flip = torch.rand(batch, generator=gen) < 0.5
        xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(3), xb).to(device)
        yb = yb.to(device)
        logits = model(xb)
        loss = F.cross_entropy(logits, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        cosine.step()
        momentum.step()
        last_loss = float(loss.detach())
        if step >= steps - max(steps // 5, 1):
            correct += int((logits.argmax(1) == yb).sum())
            seen += batch
        if step % 10 == 0 or step == steps - 1:
            print(f"  train step {step + 1}/{steps}: loss {last_loss:.3f}, "
                  f"lr {opt.param_groups[0]['lr']:.4f}, "
                  f"momentum {opt.param_groups[0]['momentum']:.3f}, "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
    _sync(device)
    seconds = time.perf_counter() - start
    stats = {"steps": steps, "batch": batch, "train_images": len(x),
             "epochs": steps * batch / max(len(x), 1), "seconds": seconds,
             "final_loss": last_loss, "peak_lr": lr,
             "late_train_accuracy": correct / seen if seen else None}
    return model.cpu().eval(), stats


def prepare_checkpoint(cache: Path, train_dir: Path, args, device: str, classes
                       ) -> Tuple[Path, Dict[str, Any]]:
    """The checkpoint to benchmark: ``--checkpoint`` when given, else the briefly trained one
    (cached)."""
    from model_audit.checkpoint import audit_metadata, save_checkpoint

    given = getattr(args, "checkpoint", None)
    if given is not None:
        info = Path(given).with_suffix(".json")  # the train bench's curve, when it is beside
        stats = json.loads(info.read_text()) if info.is_file() else {}
        return Path(given), {"checkpoint": Path(given).name,
                             "epochs": stats.get("epochs"),
                             "final_accuracy": stats.get("final_accuracy")}

    name = (f"{ARCH}-steps{args.train_steps}-batch{args.train_batch}-"
            f"pc{args.train_per_class}-lr{DEFAULT_PEAK_LR:g}-seed0")
    ckpt = cache / f"{name}.safetensors"
    info = cache / f"{name}.json"
    if ckpt.is_file() and info.is_file() and not args.retrain:
        stats = json.loads(info.read_text())
        stats["reused"] = True
        print(f"re-using the cached checkpoint {ckpt} (trained {stats['steps']} steps at "
              f"batch {stats['batch']} in {stats['seconds']:.0f} s; --retrain to train again)")
        return ckpt, stats
    print(f"training {ARCH} for {args.train_steps} steps at batch {args.train_batch} on "
          f"{train_dir} ({device}) ...", flush=True)
    model, stats = train_model(train_dir, args.train_steps, args.train_batch, device, classes)
    save_checkpoint(model.state_dict(), ckpt,
                    metadata=audit_metadata(ARCH, NUM_CLASSES, normalize="cifar10",
                                            classes=list(classes)))
    stats["device"] = device
    info.write_text(json.dumps(stats, indent=2) + "\n")
    stats["reused"] = False
    print(f"trained {stats['steps']} steps x batch {stats['batch']} = "
          f"{stats['steps'] * stats['batch']} images ({stats['epochs']:.1f} epochs of "
          f"{stats['train_images']}) in {stats['seconds']:.0f} s; saved {ckpt}")
    return ckpt, stats


# ------------------------------------------------------------------------------------------
# Timings


def time_floor(model, batches: List[Tuple[Any, Any]], device: str) -> float:
    """One forward+backward pass over every batch (eval mode, cross-entropy, backward)."""
    import torch.nn.functional as F

    model.eval()
    model.zero_grad(set_to_none=True)
    _sync(device)
    start = time.perf_counter()
    for x, y in batches:
        loss = F.cross_entropy(model(x.to(device)), y.to(device))
        loss.backward()
    _sync(device)
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds


def time_forward(model, batches: List[Tuple[Any, Any]], device: str) -> float:
    import torch

    model.eval()
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        for x, _ in batches:
            model(x.to(device))
    _sync(device)
    return time.perf_counter() - start


def time_decode(probe_dir: Path, batch_size: int) -> Tuple[float, List[Tuple[Any, Any]]]:
    """Decode the probe's JPEGs once with the tool's reader; also returns the batches."""
    from model_audit.probe import open_probe

    start = time.perf_counter()
    probe = open_probe(probe_dir, channels=3, normalize="cifar10")
    batches = [(x, y) for _, x, y in probe.batches(batch_size)]
    return time.perf_counter() - start, batches


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


def markdown_section(r: Dict[str, Any]) -> str:
    m, t, s = r["machine"], r["training"], r["scan"]
    load = r.get("load_average")
    load_text = ", ".join(f"{v:.2f}" for v in load) if load else "unknown"
    device = m["device"] + (f" ({m['gpu']})" if m.get("gpu") else "")
    if t.get("checkpoint"):
        trained = f"as given: `{t['checkpoint']}`" + (
            f" ({t['epochs']} epochs, test accuracy {100 * t['final_accuracy']:.2f}%, from "
            "`python -m bench train`)" if t.get("epochs") else "")
    else:
        trained = (f"{t['steps']} steps x batch {t['batch']} = {t['steps'] * t['batch']:,} "
                   f"images ({t['epochs']:.1f} epochs of a {t['train_images']:,}-image train "
                   f"subset) in {t['seconds']:.0f} s")
    if t.get("reused"):
        trained += " (checkpoint re-used from the cache; that time is from the run that trained it)"
    met = "met" if s["wall_s"] < TARGET_SCAN_S else "NOT met"
    lines = [
        f"## {r['date']} — scan of {r.get('arch', ARCH)} on a {r['probe_size']}-image CIFAR-10 probe, "
        f"{m['device']}",
        "",
        f"- command: `{r['command']}`",
        f"- commit: `{r['commit']}`",
        f"- machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']}, "
        f"{m['threads']} threads, Python {m['python']}, device {device}",
        f"- load average before / after: {load_text} / "
        + (", ".join(f"{v:.2f}" for v in r["load_average_after"])
           if r.get("load_average_after") else "unknown"),
        f"- other processes during the timings: {_busy_text(r.get('other_cores'), m)}",
        f"- model: {r.get('arch', ARCH)}, {r['parameters']:,} parameters; trained {trained}",
        f"- probe: {r['probe_size']} images ({r['probe_size'] // 10} per class), accuracy "
        f"{100 * s['accuracy']:.1f}%, **{s['misclassified']} misclassified**; batch size "
        f"{r['batch_size']}",
        "",
        "| measurement | seconds |",
        "|---|---:|",
        f"| floor: forward+backward over the probe (images in memory) | {_fmt_s(r['floor_s'])} |",
        f"| forward over the probe (no grad, images in memory) | {_fmt_s(r['forward_s'])} |",
        f"| decoding the probe's JPEGs once | {_fmt_s(r['decode_s'])} |",
        f"| **scan (library call, wall)** | **{_fmt_s(s['wall_s'])}** |",
        "",
        f"**ratio scan / floor: {s['wall_s'] / r['floor_s']:.2f}** "
        f"(scan / forward: {s['wall_s'] / r['forward_s']:.2f}); target scan < "
        f"{TARGET_SCAN_S:.0f} s: {met}",
        "",
        "Scan's own timing (`result.timing`): "
        + ", ".join(f"{k} {v:.2f}" for k, v in s["timing"].items()),
        "",
        "Passes (`result.passes`): "
        + ", ".join(f"{k} {v:,}" for k, v in s["passes"].items())
        + f" (= {s['passes'].get('forward_images', 0) / r['probe_size']:.2f} forward and "
        f"{s['passes'].get('backward_images', 0) / r['probe_size']:.2f} backward probe-passes)",
        "",
        f"Flagged: {', '.join(s['flagged']) if s['flagged'] else 'none'}; scores: "
        + ", ".join(f"{k} {v:.3f}" for k, v in s.get("scores", {}).items()),
        "",
    ]
    cost = s.get("cost")
    if cost:
        lines += [
            "Cost per method (`result.cost()`): "
            + "; ".join(f"{name} {c['seconds']:.2f} s, {c['forward_images']:,} fwd / "
                        f"{c['backward_images']:,} bwd images" for name, c in cost.items()),
            "",
        ]
    rp = s.get("replay")
    if rp:
        lines += [
            f"Replay over the {rp['n']} errors: mean error loss {rp['initial_loss']:.3f} -> "
            f"{rp['final_loss']:.3f}, {rp['fixed_by_replay']} fixed; per-step loss "
            + ", ".join(f"{step['loss']:.3f}" for step in rp["steps"]),
            "",
        ]
    return "\n".join(lines) + "\n"


def append_results(path: Path, section: str) -> Optional[str]:
    """Append ``section`` to ``path`` (with a header when new); the reason when it cannot."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.exists():
        if not path.is_file() or not os.access(path, os.W_OK):
            return f"{path} is not a writable file"
    elif not parent.is_dir() or not os.access(parent, os.W_OK):
        return f"{parent} is not a writable directory"
    try:
        new = not path.exists() or path.stat().st_size == 0
        with open(path, "a", encoding="utf-8") as fh:
            if new:
                fh.write(RESULTS_HEADER + "\n")
            fh.write(section + "\n")
    except OSError as exc:
        return f"cannot write {path}: {exc.strerror or exc}"
    return None


# ------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    command = shlex.join(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    commit = git_commit()  # at the start: the code this process imports
    load_before = load_average()
    if args.probe_size < 10 or args.probe_size % 10:
        print(f"error: --probe-size must be a positive multiple of 10, got {args.probe_size}",
              file=sys.stderr)
        return 2
    if args.train_steps < 0 or args.train_batch < 1 or args.train_per_class < 1:
        print("error: --train-steps must be >= 0, --train-batch and --train-per-class >= 1",
              file=sys.stderr)
        return 2
    cifar = _cifar_module()
    data = args.data or cifar.CIFAR_TARBALL
    if not Path(data).is_file():
        print(f"error: {cifar.missing_data_message(Path(data))}", file=sys.stderr)
        return 2
    cache = (args.cache_dir or default_cache_dir()).expanduser()
    if _inside_repo(cache):
        print(f"error: --cache-dir {cache} is inside the repository; the checkpoint and the "
              "CIFAR images must stay outside it", file=sys.stderr)
        return 2
    cache.mkdir(parents=True, exist_ok=True)

    import torch

    from model_audit.checkpoint import load_checkpoint
    from model_audit.options import AuditOptions, resolve_device
    from model_audit.scan import ScanConfig, scan

    device = resolve_device(args.device)
    classes = sorted(cifar.CIFAR10_CLASSES)
    t0 = time.perf_counter()
    train_dir = cifar.cifar_subset(cache / "cifar10", "train", args.train_per_class,
                                   tarball=data)
    probe_dir = cifar.cifar_subset(cache / "cifar10", "test", args.probe_size // 10,
                                   tarball=data)
    print(f"CIFAR-10 subsets ready in {time.perf_counter() - t0:.1f} s: {train_dir}, {probe_dir}")
    ckpt_path, training = prepare_checkpoint(cache, train_dir, args, device, classes)
    arch = getattr(args, "checkpoint", None) and load_checkpoint(ckpt_path).arch or ARCH

    options = AuditOptions(normalize="cifar10", device=device)
    config = ScanConfig(options=options)
    batch_size = options.batch_size

    # The floor and the forward pass use the same weights, loaded the way the scan loads them.
    model = load_checkpoint(ckpt_path).model.to(device).eval()
    parameters = sum(p.numel() for p in model.parameters())
    print(f"timing on {device} with {torch.get_num_threads()} threads "
          f"(probe {args.probe_size} images, batch {batch_size}) ...", flush=True)
    meter = BusyMeter()
    decode_s, batches = time_decode(probe_dir, batch_size)
    # Warm-up (kernel selection, allocator) outside every timing.
    time_floor(model, batches[:1], device)
    floor_s = time_floor(model, batches, device)
    print(f"  floor (forward+backward over the probe): {floor_s:.2f} s", flush=True)
    forward_s = time_forward(model, batches, device)
    print(f"  forward over the probe: {forward_s:.2f} s", flush=True)
    del model, batches

    start = time.perf_counter()
    result = scan(ckpt_path, probe_dir, config)
    _sync(device)
    wall_s = time.perf_counter() - start
    other_cores = meter.other_cores()
    ev = result.evaluation
    scan_info = {"wall_s": wall_s, "timing": dict(result.timing), "passes": dict(result.passes),
                 "misclassified": len(ev.misclassified), "accuracy": ev.accuracy,
                 "flagged": list(result.flagged),
                 "scores": {layer.name: layer.score for layer in result.layers},
                 "replay": result.replay.to_dict() if result.replay is not None else None,
                 # Per method (own metric and each baseline the scan ran), when the library
                 # reports it: baselines' passes are not in ``result.passes``.
                 "cost": result.cost() if hasattr(result, "cost") else None}
    print(f"  scan: {wall_s:.2f} s ({len(ev.misclassified)} misclassified, accuracy "
          f"{100 * ev.accuracy:.1f}%)", flush=True)

    record = {"date": date, "command": command, "commit": commit,
              "machine": machine_info(device), "load_average": load_before,
              "load_average_after": load_average(), "training": training, "arch": arch,
              "probe_size": args.probe_size, "batch_size": batch_size,
              "parameters": parameters, "floor_s": floor_s, "forward_s": forward_s,
              "decode_s": decode_s, "scan": scan_info, "other_cores": other_cores}
    section = markdown_section(record)
    print()
    print(section)
    problem = append_results(args.out, section)
    if problem:
        print(f"note: not recorded: {problem}", file=sys.stderr)
    else:
        print(f"appended to {args.out}")
    if not math.isfinite(wall_s):
        return 1
    return 0
