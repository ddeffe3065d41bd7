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
   it to ``bench/RESULTS.md`` (or ``--out FILE``).

The data is ``../shared/data/cifar10-jpeg.tar.gz`` next to the repository (``--data``).
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
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
TARGET_RATIO = 1.3

#: Training defaults. A few hundred steps at batch 128 take far too long on a small CPU
#: (about 2-3 s a step on 2 cores); 60 steps (about 1.5 epochs of the 5,000-image subset)
#: bring ResNet-18 well above chance in a few minutes there. Use --train-steps for more.
DEFAULT_TRAIN_STEPS = 60
DEFAULT_TRAIN_BATCH = 128
DEFAULT_TRAIN_PER_CLASS = 500
DEFAULT_PEAK_LR = 0.05

RESULTS_HEADER = """# Benchmark results

Appended by `python -m bench scan` (see `bench/scan_bench.py`): the wall time of the full
`model_audit.commands.scan.scan(...)` library call on a 1000-image CIFAR-10 test probe and a briefly
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


#: The fully trained CIFAR-10 ResNet-18s of ``../shared/models`` (its README has the recipe):
#: ``--checkpoint reference-sgd`` / ``reference-adam`` in every bench that takes a checkpoint.
REFERENCE = {"reference-sgd": "resnet18-cifar-sgd.safetensors",
             "reference-adam": "resnet18-cifar-adam.safetensors"}
#: Where they are: ``../shared/models``, or ``$MODEL_AUDIT_REFERENCE_DIR`` (e.g. on a machine
#: that got them as a carried folder).
REFERENCE_DIR = Path(os.environ.get("MODEL_AUDIT_REFERENCE_DIR")
                     or ROOT.parent / "shared" / "models")


def resolve_checkpoint(name: Any, arch: Optional[str] = None, normalize: Optional[str] = None
                       ) -> Tuple[Path, Optional[str], Optional[str]]:
    """``reference-sgd``, ``reference-adam`` or a path -> (path, arch, normalize).

    The reference files carry no metadata: their architecture (``resnet18-cifar``) and
    normalisation (``cifar10``) are filled in unless given.
    """
    from model_audit.errors import ConfigError

    if str(name) in REFERENCE:
        path = REFERENCE_DIR / REFERENCE[str(name)]
        arch, normalize = arch or ARCH, normalize or "cifar10"
    else:
        path = Path(name)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist; give "
                          f"{', '.join(REFERENCE)} or a checkpoint path")
    return path, arch, normalize


def add_checkpoint_argument(parser: argparse.ArgumentParser, default: str = "reference-sgd",
                            extra: str = "") -> None:
    parser.add_argument("--checkpoint", default=default,
                        help=f"{', '.join(REFERENCE)} (the fully trained ResNet-18s of "
                             f"../shared/models){extra} or a checkpoint path "
                             f"[default: {default}]")


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

    from model_audit.models.registry import build_model
    from model_audit.core.schedules import MomentumScheduler
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
    from model_audit.models.checkpoint import audit_metadata, save_checkpoint
    given = getattr(args, "checkpoint", None)
    if given is not None and str(given) != "brief":
        path, arch, normalize = resolve_checkpoint(given)
        info = path.with_suffix(".json")  # the train bench's curve, when it is beside
        stats = json.loads(info.read_text()) if info.is_file() else {}
        return path, {"checkpoint": path.name, "reference": str(given) in REFERENCE,
                      "arch": arch, "normalize": normalize,
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
    own = s["cost"].get("replay_reduction", {})
    n_err = s["misclassified"]
    if not own or not n_err:
        return []
    own_per = own["seconds"] / n_err
    lines = [f"Cost per method. The own metric (replay + attribution) took {own['seconds']:.2f} "
             f"s for {n_err} errors ({1000 * own_per:.1f} ms per error). In the scan, with the "
             "default baselines: " + "; ".join(
                 f"{name} {c['seconds']:.2f} s ({c['relative_to_own']:.2f}x own)"
                 for name, c in s["cost"].items() if name != "replay_reduction") + ".", ""]
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
    cifar = _cifar_module()
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
    from model_audit.commands.scan import ScanConfig, scan
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
