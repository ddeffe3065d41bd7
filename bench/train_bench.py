"""``python -m bench train``: epochs to 90% / 95% test accuracy for five momentum methods.

The paper claims that on ResNet-18 / CIFAR-10 the beta schedule reaches 90% test accuracy
1.9x faster than constant momentum 0.9, and that a hybrid schedule reaches 95% fastest of five
methods. This benchmark trains, with the same data, augmentation, cosine learning rate and
epoch budget:

* ``sgd``: heavy-ball SGD, constant momentum 0.9;
* ``nesterov``: Nesterov SGD, constant momentum 0.9;
* ``beta``: heavy-ball SGD whose momentum follows the beta schedule ``1 - 2*sqrt(lr)``;
* ``hybrid``: the beta schedule until it reaches 0.9, then constant 0.9;
* ``adam``: Adam (its own peak learning rate, ``--adam-lr``);

for ``--seeds`` seeds each, evaluates the whole test split after every epoch and records the
first epoch (and the training wall time up to it) at which each ``--targets`` accuracy is
reached, the best and the final accuracy. The momentum of ``beta`` and ``hybrid`` is set by the
product's own :class:`model_audit.core.schedules.MomentumScheduler`, so the benchmark tests the
product's code; every step's damping regime is counted with
:func:`model_audit.core.schedules.damping_regime`.

The data pipeline lives on the training device: the decoded images are one uint8 tensor there
(decoded once and cached as ``.pt`` next to the JPEG subsets), and random crops (4-pixel
zero padding), flips and normalisation are batched tensor operations, so a GPU epoch takes
seconds. On a GPU the forward/backward runs in bfloat16 autocast (``--no-amp`` to turn off).

Checkpoints (``train/<run>.safetensors``, with the tool's metadata) and per-epoch curves
(``train/<run>.json``) stay in the cache directory, outside the repository. The defaults are
the full claim (``resnet18-cifar``, all 50,000 training images, 30 epochs) on a GPU and a
reduced scale on a CPU (``tiny-resnet``, 1,000 images per class, 15 epochs, lower targets),
and the section the run appends to its log says which.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import _common as common
from . import cifar

METHODS = ("sgd", "nesterov", "beta", "hybrid", "adam")
METHOD_TEXT = {"sgd": "momentum 0.9", "nesterov": "Nesterov 0.9",
               "beta": "1 - 2 sqrt(lr) (`MomentumScheduler('beta')`)",
               "hybrid": "beta until 0.9, then 0.9", "adam": "Adam"}
PAD = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default=None,
                        help="architecture [default: resnet18-cifar on cuda, tiny-resnet on cpu]")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {', '.join(METHODS)} [default: all]")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per method [default: 2]")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epoch budget, the same for every method [default: 30 on cuda, "
                             "15 on cpu]")
    parser.add_argument("--train-per-class", type=int, default=None,
                        help="training images per class [default: 5000 (all) on cuda, 1000 "
                             "on cpu]")
    parser.add_argument("--test-per-class", type=int, default=1000,
                        help="test images per class evaluated every epoch [default: 1000, all]")
    parser.add_argument("--targets", default=None,
                        help="test accuracies to time, comma-separated [default: 0.90,0.95 on "
                             "cuda, 0.60,0.65 on cpu]")
    parser.add_argument("--batch", type=int, default=128, help="batch size [default: 128]")
    parser.add_argument("--lr", type=float, default=0.1,
                        help="peak learning rate of the SGD methods (cosine to 0) [default: 0.1]")
    parser.add_argument("--adam-lr", type=float, default=0.001,
                        help="peak learning rate of Adam [default: 0.001]")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="bfloat16 autocast [default: on for cuda, off for cpu]")
    common.add_common_arguments(parser)
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds: do not start a run that would likely end after this "
                             "(estimated from the runs so far); the finished runs stay cached, "
                             "so calling again goes on where this call stopped (for machines "
                             "with a per-command time limit)")
    parser.add_argument("--retrain", action="store_true",
                        help="train again even when a run's checkpoint is cached")


# ------------------------------------------------------------------------------------------
# Data on the device


def load_uint8(directory: Path, classes: Sequence[str]):
    """The images of an ImageFolder subset as one uint8 NCHW tensor plus labels (cached .pt)."""
    import torch

    from model_audit.io.probe import open_probe
    cache = directory.with_name(directory.name + ".uint8.pt")
    if cache.is_file():
        data = torch.load(cache, weights_only=True)
        return data["x"], data["y"]
    probe = open_probe(directory, channels=3, normalize="none", model_classes=list(classes))
    chunks = [probe.load(list(range(i, min(i + 1024, len(probe)))))
              for i in range(0, len(probe), 1024)]
    x = (torch.cat(chunks) * 255).round().to(torch.uint8)
    y = probe.labels.clone()
    tmp = cache.with_name(cache.name + ".tmp")
    torch.save({"x": x, "y": y}, tmp)
    tmp.replace(cache)
    return x, y


class DeviceData:
    """uint8 images and labels on ``device``; batched crop, flip and normalisation there."""

    def __init__(self, x, y, device: str, mean: Sequence[float], std: Sequence[float]) -> None:
        import torch

        self.x = x.to(device)
        self.y = y.to(device)
        self.device = device
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return len(self.y)

    def normalize(self, xb):
        return (xb.float() / 255.0 - self.mean) / self.std

    def augment(self, xb, gen):
        """Random crop after 4-pixel zero padding, and a random horizontal flip (per image)."""
        import torch
        import torch.nn.functional as F

        n, _, h, w = xb.shape
        padded = F.pad(xb, (PAD, PAD, PAD, PAD))
        oy = torch.randint(0, 2 * PAD + 1, (n,), generator=gen, device="cpu").to(self.device)
        ox = torch.randint(0, 2 * PAD + 1, (n,), generator=gen, device="cpu").to(self.device)
        flip = (torch.rand(n, generator=gen, device="cpu") < 0.5).to(self.device)
        rows = (oy.view(n, 1) + torch.arange(h, device=self.device)).view(n, 1, h, 1)
        cols = torch.arange(w, device=self.device).view(1, w)
        cols = torch.where(flip.view(n, 1), (w - 1) - cols, cols) + ox.view(n, 1)
        batch = torch.arange(n, device=self.device).view(n, 1, 1, 1)
        chan = torch.arange(xb.shape[1], device=self.device).view(1, -1, 1, 1)
        return padded[batch, chan, rows, cols.view(n, 1, 1, w)]

    def epoch(self, batch: int, gen):
        """Shuffled, augmented, normalised batches of one epoch (the last partial one dropped)."""
        import torch

        order = torch.randperm(len(self), generator=gen, device="cpu").to(self.device)
        for i in range(0, len(self) - batch + 1, batch):
            idx = order[i:i + batch]
            yield self.normalize(self.augment(self.x[idx], gen)), self.y[idx]

    def evaluate(self, model, batch: int = 1000, amp: bool = False) -> float:
        import torch

        model.eval()
        correct = 0
        with torch.no_grad(), torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16,
                                             enabled=amp):
            for i in range(0, len(self), batch):
                logits = model(self.normalize(self.x[i:i + batch]))
                correct += int((logits.argmax(1) == self.y[i:i + batch]).sum())
        return correct / max(len(self), 1)


# ------------------------------------------------------------------------------------------
# Methods


def first_reaching(curve: Sequence[Dict[str, Any]], target: float) -> Optional[Dict[str, Any]]:
    """The first epoch record whose test accuracy is >= ``target``, or None."""
    for record in curve:
        if record["test_accuracy"] >= target:
            return record
    return None


def train_run(arch: str, method: str, seed: int, train: DeviceData, test: DeviceData,
              epochs: int, args, amp: bool, log=print) -> Tuple[Any, Dict[str, Any]]:
    """Train one (method, seed) for ``epochs``, evaluating the test split after every epoch."""
    import torch

    from model_audit.models.registry import build_model
    from model_audit.core.schedules import damping_regime
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    device = train.device
    model = build_model(arch, 10).to(device)
    if device.startswith("cuda"):
        model = model.to(memory_format=torch.channels_last)
    opt, momentum = common.make_optimizer(method, model.parameters(), args.lr, args.adam_lr,
                                          args.weight_decay)
    steps_per_epoch = len(train) // args.batch
    total = steps_per_epoch * epochs
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    regimes = {"underdamped": 0, "critical": 0, "overdamped": 0}
    curve: List[Dict[str, Any]] = []
    train_seconds = 0.0
    diverged = None

    def count_regime(group: Dict[str, Any]) -> None:
        if method != "adam":
            regimes[damping_regime(group["momentum"], group["lr"])] += 1

    for epoch in range(1, epochs + 1):
        common._sync(device)
        start = time.perf_counter()
        loss_sum = torch.zeros((), device=device)

        def add_loss(step: int, loss, *_: Any) -> None:
            loss_sum.add_(loss)

        common.train_steps(model, train.epoch(args.batch, gen), opt, cosine, momentum, amp=amp,
                           before=count_regime, after=add_loss)
        common._sync(device)
        train_seconds += time.perf_counter() - start
        mean_loss = float(loss_sum) / max(steps_per_epoch, 1)
        accuracy = test.evaluate(model, amp=amp)
        group = opt.param_groups[0]
        curve.append({"epoch": epoch, "train_seconds": round(train_seconds, 3),
                      "train_loss": round(mean_loss, 5), "test_accuracy": accuracy,
                      "lr": group["lr"],
                      "momentum": group["betas"][0] if "betas" in group else group["momentum"]})
        log(f"  {method} seed {seed} epoch {epoch}/{epochs}: loss {mean_loss:.3f}, test "
            f"{100 * accuracy:.2f}%, {train_seconds:.0f} s")
        if not math.isfinite(mean_loss):
            diverged = epoch
            break
    stats = {"arch": arch, "method": method, "seed": seed, "epochs": epochs,
             "steps": total, "batch": args.batch, "train_images": len(train),
             "test_images": len(test), "lr": args.adam_lr if method == "adam" else args.lr,
             "weight_decay": args.weight_decay, "amp": amp, "device": device,
             "curve": curve, "train_seconds": round(train_seconds, 3),
             "final_accuracy": curve[-1]["test_accuracy"],
             "best_accuracy": max(r["test_accuracy"] for r in curve),
             "regime_steps": regimes if method != "adam" else None, "diverged_epoch": diverged}
    return model.float().cpu().eval().to(memory_format=torch.contiguous_format), stats


# ------------------------------------------------------------------------------------------
# Summary


def _fmt_mean(values: Sequence[Optional[float]], fmt: str = "{:.1f}") -> str:
    """``mean (min-max)`` over seeds; ``not reached (k/n)`` when some seed did not reach it."""
    got = [v for v in values if v is not None]
    if not got:
        return "not reached"
    text = fmt.format(statistics.mean(got))
    if len(got) > 1:
        text += f" ({fmt.format(min(got))}-{fmt.format(max(got))})"
    if len(got) < len(values):
        text += f", reached by {len(got)}/{len(values)}"
    return text


def summarize(runs: Sequence[Dict[str, Any]], targets: Sequence[float]) -> Dict[str, Any]:
    """Per method: epochs and seconds to every target, final/best accuracy, over seeds; and
    the paper's two comparisons (beta vs sgd to the first target, ranking to the second)."""
    methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
    per_method: Dict[str, Any] = {}
    for m in methods:
        mine = sorted((r for r in runs if r["method"] == m), key=lambda r: r["seed"])
        entry: Dict[str, Any] = {"seeds": [r["seed"] for r in mine],
                                 "final_accuracy": [r["final_accuracy"] for r in mine],
                                 "best_accuracy": [r["best_accuracy"] for r in mine],
                                 "train_seconds": [r["train_seconds"] for r in mine],
                                 "targets": {}}
        for t in targets:
            hits = [first_reaching(r["curve"], t) for r in mine]
            entry["targets"][f"{t:g}"] = {
                "epochs": [h["epoch"] if h else None for h in hits],
                "seconds": [h["train_seconds"] if h else None for h in hits]}
        per_method[m] = entry
    claims: Dict[str, Any] = {}
    if targets and "sgd" in per_method and "beta" in per_method:
        t = f"{targets[0]:g}"
        sgd, beta = per_method["sgd"]["targets"][t], per_method["beta"]["targets"][t]
        ratios = [s / b for s, b in zip(sgd["epochs"], beta["epochs"]) if s and b]
        claims["beta_vs_sgd_speedup"] = {
            "target": targets[0], "per_seed_epoch_ratio": ratios,
            "mean": statistics.mean(ratios) if ratios else None,
            "complete": len(ratios) == len(sgd["epochs"])}
    if targets:
        t = f"{targets[-1]:g}"

        def key(m: str) -> Tuple[int, float, float]:
            epochs = per_method[m]["targets"][t]["epochs"]
            missing = sum(e is None for e in epochs)
            got = [e for e in epochs if e is not None]
            return (missing, statistics.mean(got) if got else math.inf,
                    -statistics.mean(per_method[m]["final_accuracy"]))

        # only methods with at least one seed at the target are ranked
        ranking = sorted((m for m in per_method if key(m)[0] < len(per_method[m]["seeds"])),
                         key=key)
        claims["fastest_to_last_target"] = {
            "target": targets[-1], "ranking": ranking,
            "hybrid_fastest": bool(ranking) and ranking[0] == "hybrid" and key("hybrid")[0] == 0
            and all(key(m)[:2] > key("hybrid")[:2] for m in ranking[1:])}
    return {"methods": per_method, "claims": claims}


def markdown(summary: Dict[str, Any], runs: Sequence[Dict[str, Any]], targets: Sequence[float],
             setup: Dict[str, Any], command: str, commit: str, device: str) -> str:
    ran = list(summary["methods"])
    which = "five momentum methods" if len(ran) == len(METHODS) else ", ".join(ran)
    lines = common.section_header(f"train: epochs to {', '.join(f'{100 * t:g}%' for t in targets)}"
                              f", {which}, {setup['arch']}, {device}",
                              command, commit, device)
    lines += [f"- scale: **{setup['scale']}**",
              f"- data: {setup['train_images']} CIFAR-10 training images, random crop (pad 4) + "
              f"flip on the {device}; test accuracy on {setup['test_images']} test images after "
              f"every epoch",
              f"- budget: {setup['epochs']} epochs for every method, batch {setup['batch']}, "
              f"cosine lr from {setup['lr']:g} (Adam {setup['adam_lr']:g}) to 0, weight decay "
              f"{setup['weight_decay']:g}, bfloat16 autocast {'on' if setup['amp'] else 'off'}; "
              f"seeds {', '.join(str(s) for s in setup['seeds'])}",
              "- methods: " + "; ".join(f"{m} = {METHOD_TEXT[m]}" for m in ran)
              + ("" if len(ran) == len(METHODS) else
                 f" (not run: {', '.join(m for m in METHODS if m not in ran)})"), "",
              "Mean over seeds (min-max); epochs are the first epoch whose test accuracy reached "
              "the target, seconds the training time up to it (evaluation excluded).", ""]
    head = "| method | " + " | ".join(f"epochs to {100 * t:g}% | s to {100 * t:g}%"
                                      for t in targets) + " | best acc. % | final acc. % |"
    lines += [head, "|---|" + "---:|" * (2 * len(targets) + 2)]
    for m, e in summary["methods"].items():
        cells = []
        for t in targets:
            hit = e["targets"][f"{t:g}"]
            cells += [_fmt_mean(hit["epochs"], "{:.1f}"), _fmt_mean(hit["seconds"], "{:.0f}")]
        lines.append(f"| {m} | " + " | ".join(cells) + " | "
                     f"{_fmt_mean([100 * a for a in e['best_accuracy']], '{:.2f}')} | "
                     f"{_fmt_mean([100 * a for a in e['final_accuracy']], '{:.2f}')} |")
    lines += ["", "| run | " + " | ".join(f"epoch to {100 * t:g}%" for t in targets) +
              " | final acc. % | train s | damping regimes (under / critical / over, % of steps) |",
              "|---|" + "---:|" * (len(targets) + 2) + "---|"]
    for r in runs:
        hits = [first_reaching(r["curve"], t) for t in targets]
        reg = r.get("regime_steps")
        regime = "-" if not reg else " / ".join(
            f"{100 * reg[k] / max(sum(reg.values()), 1):.0f}"
            for k in ("underdamped", "critical", "overdamped"))
        lines.append(f"| {r['method']} s{r['seed']} | " +
                     " | ".join(str(h["epoch"]) if h else "-" for h in hits) +
                     f" | {100 * r['final_accuracy']:.2f} | {r['train_seconds']:.0f} | {regime} |")
    claims = summary["claims"]
    lines.append("")
    if "beta_vs_sgd_speedup" in claims:
        c = claims["beta_vs_sgd_speedup"]
        ratios = ", ".join(f"{x:.2f}" for x in c["per_seed_epoch_ratio"]) or "none"
        mean = "n/a" if c["mean"] is None else f"{c['mean']:.2f}x"
        lines.append(f"- beta vs constant momentum 0.9, epochs to {100 * c['target']:g}% "
                     f"(paper: 1.9x faster): **{mean}** (per seed: {ratios}"
                     f"{'' if c['complete'] else '; some seeds did not reach the target'})")
    if "fastest_to_last_target" in claims:
        c = claims["fastest_to_last_target"]
        order = (" < ".join(c["ranking"]) + " (by the number of seeds that missed it, then mean "
                 "epochs; methods that never reached it left out)") if c["ranking"] else \
            "no method reached it within the budget"
        verdict = ("not run" if "hybrid" not in ran else
                   "yes" if c["hybrid_fastest"] else "no")
        lines.append(f"- fastest to {100 * c['target']:g}% (paper: hybrid, of five): {order}; "
                     f"hybrid strictly fastest: **{verdict}**")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from model_audit.models.checkpoint import audit_metadata, save_checkpoint
    from model_audit.io.probe import parse_normalize
    device = common.pick_device(args.device)
    gpu = device.startswith("cuda")
    arch, per_class = common.scale_defaults(device, args.arch, args.train_per_class)
    epochs = args.epochs or (30 if gpu else 15)
    targets = [float(t) for t in (args.targets or ("0.90,0.95" if gpu else "0.60,0.65"))
               .split(",")]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods or not targets or args.seeds < 1:
        print(f"bad arguments: methods from {', '.join(METHODS)}, at least one target and one "
              "seed", file=sys.stderr)
        return 2
    amp = gpu if args.amp is None else args.amp
    command = "python -m bench train " + " ".join(sys.argv[2:] if len(sys.argv) > 2 else [])
    commit = common.git_commit()
    root = args.cache_dir or common.default_cache_dir()
    cache = root / "train"
    cache.mkdir(parents=True, exist_ok=True)
    kwargs = {"tarball": args.data} if args.data else {}
    classes = list(cifar.CIFAR10_CLASSES)
    norm = parse_normalize("cifar10")
    print(f"loading CIFAR-10 ({per_class}/class train, {args.test_per_class}/class test) ...",
          flush=True)
    train = DeviceData(*load_uint8(cifar.cifar_subset(root, "train", per_class, **kwargs),
                                   classes), device, norm.mean, norm.std)
    test = DeviceData(*load_uint8(cifar.cifar_subset(root, "test", args.test_per_class,
                                                     **kwargs), classes),
                      device, norm.mean, norm.std)
    runs: List[Dict[str, Any]] = []
    started = time.perf_counter()
    longest = 0.0  # the longest run trained in this call, as the estimate of the next one
    pending = 0
    for method in methods:
        for seed in range(args.seeds):
            name = (f"{arch}-{method}-s{seed}-e{epochs}-n{per_class}-lr{args.lr:g}"
                    f"-alr{args.adam_lr:g}-b{args.batch}{'-amp' if amp else ''}")
            path, info = cache / f"{name}.safetensors", cache / f"{name}.json"
            if path.is_file() and info.is_file() and not args.retrain:
                stats = json.loads(info.read_text())
                print(f"re-using {name} (cached; --retrain to train again)", flush=True)
            else:
                elapsed = time.perf_counter() - started
                if args.time_budget is not None and longest and \
                        elapsed + 1.1 * longest > args.time_budget:
                    pending += 1
                    continue
                print(f"training {name} on {device} ...", flush=True)
                t0 = time.perf_counter()
                model, stats = train_run(arch, method, seed, train, test, epochs, args, amp)
                longest = max(longest, time.perf_counter() - t0)
                save_checkpoint(model.state_dict(), path,
                                metadata=audit_metadata(arch, 10, normalize="cifar10",
                                                        classes=classes))
                tmp = info.with_name(info.name + ".tmp")
                tmp.write_text(json.dumps(stats, indent=2) + "\n")
                tmp.replace(info)
            stats["name"] = name
            runs.append(stats)
    if pending:
        print(f"time budget reached: {pending} run(s) not started; the {len(runs)} finished "
              "ones are cached; run the same command again to go on (no section written yet)")
        return 3
    summary = summarize(runs, targets)
    setup = {"arch": arch, "train_images": len(train), "test_images": len(test),
             "epochs": epochs, "batch": args.batch, "lr": args.lr, "adam_lr": args.adam_lr,
             "weight_decay": args.weight_decay, "amp": amp, "seeds": list(range(args.seeds)),
             "scale": ("full: the paper's setting (ResNet-18, all of CIFAR-10)"
                       if arch == "resnet18-cifar" and per_class == 5000 else
                       f"reduced ({arch}, {per_class} images per class): the ranking of the "
                       "methods at this scale, not the paper's 90%/95% claim")}
    section = markdown(summary, runs, targets, setup, command, commit, device)
    print(section)
    common.append_results(args.out, section)
    (cache / "last-train.json").write_text(json.dumps({"setup": setup, "summary": summary,
                                                       "runs": runs}, indent=2) + "\n")
    return 0
