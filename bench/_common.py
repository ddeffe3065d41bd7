"""What the benchmarks share: the reference checkpoints, the command-line options every CIFAR
bench takes, the machine and commit of a result, appending to the day's log (bench/log/DATE.md), and the one
training loop (:func:`train_steps`) with its optimizers and batches.

The CIFAR-10 subsets come from :mod:`bench.cifar`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from model_audit.core.schedules import MomentumScheduler
from model_audit.errors import ConfigError

from . import cifar

ROOT = Path(__file__).resolve().parent.parent
#: Where a run's raw section goes: the day's log (UTC). bench/RESULTS.md holds one current table
#: per question, kept by hand from these logs.
DEFAULT_RESULTS = ROOT / "bench" / "log" / f"{datetime.now(timezone.utc):%Y-%m-%d}.md"
ARCH = "resnet18-cifar"
NUM_CLASSES = 10
#: The constant heavy-ball momentum of the "sgd" baseline method.
CONSTANT_MOMENTUM = 0.9

RESULTS_HEADER = """# Benchmark log

The raw sections of `python -m bench` runs, as each run appended them (command, commit,
machine, output). `bench/RESULTS.md` holds the current table for each question.
"""


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


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device``, ``--out``, ``--cache-dir`` and ``--data``: the same in every CIFAR bench."""
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where to run (auto: cuda when available) [default: auto]")
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS,
                        help="Markdown file the result section is appended to "
                             "[default: bench/log/DATE.md, today in UTC]")
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


def write_section(path: Path, lines: Sequence[str]) -> bool:
    """Append the section ``lines`` to ``path`` and say so; False (and why, on stderr) when
    it cannot be written."""
    problem = append_results(path, "\n".join(lines) + "\n")
    if problem:
        print(problem, file=sys.stderr)
        return False
    print(f"appended to {path}")
    return True


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
# Training: one loop for every benchmark that trains

#: Training defaults. A few hundred steps at batch 128 take far too long on a small CPU
#: (about 2-3 s a step on 2 cores); 60 steps (about 1.5 epochs of the 5,000-image subset)
#: bring ResNet-18 well above chance in a few minutes there. Use --train-steps for more.
DEFAULT_TRAIN_STEPS = 60
DEFAULT_TRAIN_BATCH = 128
DEFAULT_TRAIN_PER_CLASS = 500
DEFAULT_PEAK_LR = 0.05




def make_optimizer(method: str, params: Iterable[torch.nn.Parameter], lr: float,
                   adam_lr: float, weight_decay: float
                   ) -> Tuple[torch.optim.Optimizer, Optional[MomentumScheduler]]:
    """The optimizer of ``method`` and its momentum scheduler (None for constant momentum):
    ``adam``; ``sgd`` / ``nesterov`` (momentum 0.9); ``beta`` / ``hybrid`` (SGD whose momentum
    :class:`MomentumScheduler` sets from the learning rate)."""
    if method == "adam":
        return torch.optim.Adam(params, lr=adam_lr, weight_decay=weight_decay), None
    if method in ("sgd", "nesterov"):
        return torch.optim.SGD(params, lr=lr, momentum=CONSTANT_MOMENTUM,
                               nesterov=method == "nesterov", weight_decay=weight_decay), None
    if method in ("beta", "hybrid"):
        opt = torch.optim.SGD(params, lr=lr, momentum=0.0, weight_decay=weight_decay)
        return opt, MomentumScheduler(opt, method)
    raise ValueError(f"unknown method {method!r}; valid: adam, sgd, nesterov, beta, hybrid")


def flipped_batches(x: torch.Tensor, y: torch.Tensor, steps: int, batch: int,
                    gen: torch.Generator, device: str
                    ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` batches drawn with replacement (seeded by ``gen``), each image flipped
    left-right with probability 1/2."""
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        xb = x[idx]
        flip = torch.rand(batch, generator=gen) < 0.5
        xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(3), xb).to(device)
        yield xb, y[idx].to(device)


#: ``after(step, loss, logits, labels)``: called after every optimizer step.
AfterStep = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


def train_steps(model: torch.nn.Module, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]],
                opt: torch.optim.Optimizer, cosine: Any,
                momentum: Optional[MomentumScheduler] = None, *, amp: bool = False,
                before: Optional[Callable[[Dict[str, Any]], None]] = None,
                after: Optional[AfterStep] = None) -> None:
    """The training loop of every benchmark: cross-entropy, one optimizer step per batch, then
    the cosine learning rate and the momentum schedule.

    Args:
        batches: ``(images, labels)`` on the model's device.
        cosine: the learning-rate scheduler, stepped after each step.
        momentum: the momentum scheduler (beta/hybrid), stepped after the learning rate.
        amp: bfloat16 autocast for the forward pass.
        before: sees the first param group (lr, momentum) before each step.
        after: sees the step index, the detached loss, logits and labels after each step.
    """
    model.train()
    for step, (xb, yb) in enumerate(batches):
        if before is not None:
            before(opt.param_groups[0])
        with torch.autocast(xb.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(xb)
        loss = F.cross_entropy(logits.float(), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        cosine.step()
        if momentum is not None:
            momentum.step()
        if after is not None:
            after(step, loss.detach(), logits.detach(), yb)


def train_model(train_dir: Path, steps: int, batch: int, device: str, classes,
                lr: float = DEFAULT_PEAK_LR, seed: int = 0):
    """Heavy-ball SGD with the beta momentum over a cosine learning rate; random flips."""
    import torch

    from model_audit.models.registry import build_model
    x, y, _ = cifar.load_images(train_dir, normalize="cifar10", classes=classes)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build_model(ARCH, NUM_CLASSES).to(device)
    opt, momentum = make_optimizer("beta", model.parameters(), lr, lr, 5e-4)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    start = time.perf_counter()
    late = {"correct": 0, "seen": 0, "loss": float("nan")}

    def after(step: int, loss, logits, yb) -> None:
        late["loss"] = float(loss)
        if step >= steps - max(steps // 5, 1):
            late["correct"] += int((logits.argmax(1) == yb).sum())
            late["seen"] += batch
        if step % 10 == 0 or step == steps - 1:
            print(f"  train step {step + 1}/{steps}: loss {late['loss']:.3f}, "
                  f"lr {opt.param_groups[0]['lr']:.4f}, "
                  f"momentum {opt.param_groups[0]['momentum']:.3f}, "
                  f"{time.perf_counter() - start:.0f} s", flush=True)

    train_steps(model, flipped_batches(x, y, steps, batch, gen, device), opt, cosine, momentum,
                after=after)
    _sync(device)
    seconds = time.perf_counter() - start
    stats = {"steps": steps, "batch": batch, "train_images": len(x),
             "epochs": steps * batch / max(len(x), 1), "seconds": seconds,
             "final_loss": late["loss"], "peak_lr": lr,
             "late_train_accuracy": late["correct"] / late["seen"] if late["seen"] else None}
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
