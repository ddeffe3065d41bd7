"""``python -m bench compare``: is the SGD/Adam overlap larger than seed-to-seed noise?

The paper reports that an SGD-trained and an Adam-trained ResNet-18 flag the same three layer
groups (100% overlap), from one seed. This benchmark trains the same architecture on the same
CIFAR-10 subset with three optimizers, constant-momentum SGD (0.9), SGD with the beta schedule
(``model_audit.core.schedules.MomentumScheduler``) and Adam, for ``--seeds`` seeds each, scans every
checkpoint on the same held-out probe, and compares

* across optimizers with the same seed (SGD vs Adam, beta vs Adam, SGD vs beta), and
* across seeds with the same optimizer (the noise floor the invariance claim must beat),

recording Jaccard and overlap coefficient of the flagged sets (with paired bootstrap
intervals), the chance level (hypergeometric p-value) and the Spearman correlation of the
scores. Checkpoints and data stay outside the repository (``--cache-dir``).

**Default: the reference checkpoints.** ``--checkpoints reference-sgd,reference-adam`` (the
default) compares the two fully trained ResNet-18s of ``../shared/models`` (SGD 90.28%, Adam
89.49%) as the paper does: on the whole CIFAR-10 test split (``--whole``, 10,000 images) and on
``--splits`` disjoint stratified probes of ``--split-size`` images cut from it (the spread),
with the flagged sets, Jaccard and its paired bootstrap interval, the chance level and the
Spearman correlation of every pair; ``--train`` trains and compares as described above.

With ``--train``, the default architecture is ``resnet18-cifar`` on a GPU and ``tiny-resnet`` on a CPU (a
ResNet-18 epoch takes about a quarter of an hour on two CPU cores); the section written to
``bench/RESULTS.md`` names the one used.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

from . import _common as common
from . import cifar

OPTIMIZERS = ("sgd", "beta", "adam")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default=None,
                        help="architecture [default: resnet18-cifar on cuda, tiny-resnet on cpu]")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per optimizer [default: 2]")
    parser.add_argument("--epochs", type=float, default=None,
                        help="epochs over the training subset [default: 30 on cuda, 6 on cpu]")
    parser.add_argument("--train-per-class", type=int, default=None,
                        help="training images per class [default: 5000 on cuda, 1000 on cpu]")
    parser.add_argument("--probe-size", type=int, default=1000,
                        help="probe images (test split, stratified) [default: 1000]")
    parser.add_argument("--batch", type=int, default=128, help="batch size [default: 128]")
    common.add_common_arguments(parser)
    parser.add_argument("--resamples", type=int, default=1000,
                        help="bootstrap resamples of each comparison [default: 1000]")
    parser.add_argument("--checkpoints", default="reference-sgd,reference-adam",
                        help="two checkpoints to compare (reference-sgd, reference-adam or "
                             "paths) [default: reference-sgd,reference-adam]")
    parser.add_argument("--whole", type=int, default=10000,
                        help="images of the whole-split probe, 0: none (reference mode) "
                             "[default: 10000, the whole test split]")
    parser.add_argument("--splits", type=int, default=5,
                        help="disjoint probes cut from the test split (reference mode) "
                             "[default: 5]")
    parser.add_argument("--split-size", type=int, default=1000,
                        help="images per disjoint probe [default: 1000]")
    parser.add_argument("--train", action="store_true",
                        help="train sgd/beta/adam checkpoints here (or take --from-train's) "
                             "and compare across optimizers and seeds, instead of "
                             "--checkpoints")
    parser.add_argument("--from-train", action="store_true",
                        help="compare the checkpoints of the last `python -m bench train` run "
                             "(all its methods and seeds) instead of training here")


def train(arch: str, optimizer: str, seed: int, x, y, epochs: float, batch: int,
          device: str) -> Tuple[Any, Dict[str, Any]]:
    """One training run: cosine learning rate, random flips, weight decay 5e-4; ``sgd``
    (momentum 0.9, lr 0.05), ``beta`` (lr 0.05) or ``adam`` (lr 0.002)."""
    import torch

    from model_audit.models.registry import build_model
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build_model(arch, 10).to(device)
    steps = max(1, int(epochs * len(x) / batch))
    opt, momentum = common.make_optimizer(optimizer, model.parameters(), 0.05, 0.002, 5e-4)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    start = time.perf_counter()
    last: Dict[str, float] = {}
    common.train_steps(model, common.flipped_batches(x, y, steps, batch, gen, device), opt,
                       cosine, momentum, after=lambda step, loss, *_: last.update(loss=float(loss)))
    common._sync(device)
    return model.cpu().eval(), {"steps": steps, "seconds": time.perf_counter() - start,
                                "final_loss": last["loss"]}


def checkpoints(args, arch, epochs, per_class, cache, train_dir, classes, device
                ) -> Dict[Tuple[str, int], Tuple[str, Path, Dict[str, Any]]]:
    """(method, seed) -> (name, checkpoint, training stats): trained here (cached), or the
    runs of the last ``python -m bench train`` with ``--from-train``."""
    from model_audit.models.checkpoint import audit_metadata, save_checkpoint
    out: Dict[Tuple[str, int], Tuple[str, Path, Dict[str, Any]]] = {}
    if args.from_train:
        last = cache.parent / "train" / "last-train.json"
        if not last.is_file():
            raise SystemExit(f"{last} not found: run `python -m bench train` first")
        for r in json.loads(last.read_text())["runs"]:
            out[(r["method"], r["seed"])] = (r["name"], last.parent / f"{r['name']}.safetensors",
                                            {"seconds": r["train_seconds"], "arch": r["arch"]})
        return out
    x, y, _ = cifar.load_images(train_dir, normalize="cifar10", classes=classes)
    for optimizer, seed in itertools.product(OPTIMIZERS, range(args.seeds)):
        name = f"{arch}-{optimizer}-s{seed}-e{epochs:g}-n{per_class}"
        path = cache / f"{name}.safetensors"
        stats: Dict[str, Any] = {"cached": True}
        if not path.exists():
            print(f"training {name} on {device} ...", flush=True)
            model, stats = train(arch, optimizer, seed, x, y, epochs, args.batch, device)
            save_checkpoint(model.state_dict(), path,
                            metadata=audit_metadata(arch, 10, normalize="cifar10", classes=classes))
        out[(optimizer, seed)] = (name, path, stats)
    return out


def run(args: argparse.Namespace) -> int:
    if not (args.train or args.from_train):
        return run_checkpoints(args)
    return run_training(args)


def _probes(args: argparse.Namespace, cache: Path) -> List[Tuple[str, Path]]:
    """(label, directory): the whole-split probe and the disjoint splits, stratified."""
    from model_audit.errors import ConfigError

    if args.whole % 10 or args.split_size % 10 or args.whole < 0 or args.split_size < 10 \
            or args.splits < 0 or args.splits * args.split_size > 10000 or args.whole > 10000:
        raise ConfigError("--whole and --split-size must be multiples of 10 within the 10,000 "
                          "test images, and --splits x --split-size at most 10,000")
    kwargs = {"tarball": args.data} if args.data else {}
    out = []
    if args.whole:
        out.append((f"whole ({args.whole})", cifar.cifar_subset(cache, "test", args.whole // 10,
                                                              **kwargs)))
    per = args.split_size // 10
    for i in range(args.splits):
        out.append((f"split {i + 1} ({args.split_size})",
                    cifar.cifar_subset(cache, "test", per, skip=i * per, **kwargs)))
    return out


def run_checkpoints(args: argparse.Namespace) -> int:
    """Scan two given checkpoints on the same probes and compare them on each."""
    from model_audit import AuditOptions, ScanConfig, scan
    from model_audit.commands.compare import compare
    from model_audit.results.compare import CompareConfig
    from model_audit.errors import ConfigError

    names = [n.strip() for n in args.checkpoints.split(",") if n.strip()]
    if len(names) != 2:
        raise ConfigError(f"--checkpoints takes two checkpoints, got {args.checkpoints!r}")
    resolved = [common.resolve_checkpoint(n, args.arch) for n in names]
    device = common.pick_device(args.device)
    command = "python -m bench compare " + " ".join(sys.argv[2:])
    commit = common.git_commit()
    cache = args.cache_dir or common.default_cache_dir()
    rows: List[Dict[str, Any]] = []
    for label, probe in _probes(args, cache):
        audits = []
        for name, (path, arch, normalize) in zip(names, resolved):
            print(f"scanning {name} on {label} ...", flush=True)
            opts = AuditOptions(device=device, seed=0, arch=arch, normalize=normalize)
            audits.append(scan(path, probe, ScanConfig(options=opts)).to_dict())
        d = compare(audits[0], audits[1], CompareConfig(resamples=args.resamples, seed=0)
                    ).to_dict()
        rows.append({"probe": label, "accuracy": [a["probe"]["accuracy"] for a in audits],
                     "errors": [a["probe"]["misclassified"] for a in audits],
                     "flagged": [a["flagged"] for a in audits],
                     "scores": [{x["name"]: x["score"] for x in a["layers"]} for a in audits],
                     "jaccard": d["jaccard"], "jaccard_ci": d["intervals"].get("jaccard"),
                     "both": d["flagged"]["both"], "p_value": d["chance"]["p_value"],
                     "spearman": d["correlation"]["score"]["spearman"],
                     "spearman_ci": d["intervals"].get("spearman"),
                     "seconds": [a["timing"]["total_s"] for a in audits]})
        print(f"  {label}: {rows[-1]['flagged'][0]} vs {rows[-1]['flagged'][1]}, Jaccard "
              f"{_num(rows[-1]['jaccard'])}", flush=True)
    section = markdown_checkpoints(rows, names, device, command, commit, args)
    print(section)
    common.append_results(args.out, section)
    (Path(cache) / "compare").mkdir(parents=True, exist_ok=True)
    (Path(cache) / "compare" / "last-compare-checkpoints.json").write_text(
        json.dumps({"checkpoints": names, "rows": rows}, indent=2))
    return 0


def markdown_checkpoints(rows, names, device, command, commit, args) -> str:
    import numpy as np

    lines = common.section_header(f"compare: {names[0]} vs {names[1]}, whole test split and "
                              "disjoint probes", command, commit, device) + [
        f"- probes: stratified CIFAR-10 test images (the whole split and {args.splits} "
        f"disjoint {args.split_size}-image probes cut from it); scan defaults; "
        f"{args.resamples} paired bootstrap resamples per comparison; P(chance): "
        "hypergeometric probability of at least this many shared flags for two independent "
        "flagged sets of these sizes", "",
        f"| probe | accuracy A / B | errors A / B | flagged A ({names[0]}) | flagged B "
        f"({names[1]}) | both | Jaccard [95% CI] | P(chance) | Spearman [95% CI] |",
        "|---|---|---|---|---|---|---|---:|---|"]
    for r in rows:
        lines.append(
            f"| {r['probe']} | {100 * r['accuracy'][0]:.2f}% / {100 * r['accuracy'][1]:.2f}% | "
            f"{r['errors'][0]} / {r['errors'][1]} | {', '.join(r['flagged'][0]) or '-'} | "
            f"{', '.join(r['flagged'][1]) or '-'} | {', '.join(r['both']) or '-'} | "
            f"{_num(r['jaccard'])}{_ci(r['jaccard_ci'])} | {r['p_value']:.3f} | "
            f"{_num(r['spearman'])}{_ci(r['spearman_ci'])} |")
    splits = [r for r in rows if r["probe"].startswith("split")]
    if splits:
        jac = [r["jaccard"] for r in splits if r["jaccard"] is not None]
        lines += ["", f"- over the {len(splits)} disjoint probes: Jaccard mean "
                  f"{np.mean(jac):.2f}, sd {np.std(jac, ddof=1) if len(jac) > 1 else 0:.2f}, "
                  f"min {min(jac):.2f}, max {max(jac):.2f}; identical flagged sets in "
                  f"{sum(1 for r in splits if set(r['flagged'][0]) == set(r['flagged'][1]))}/"
                  f"{len(splits)}"]
        for k, name in enumerate(names):
            counts: Dict[str, int] = {}
            for r in splits:
                for g in r["flagged"][k]:
                    counts[g] = counts.get(g, 0) + 1
            lines.append(f"- {name} flagged, per group (of {len(splits)} probes): " + ", ".join(
                f"{g} {c}" for g, c in sorted(counts.items(), key=lambda kv: -kv[1])))
    return "\n".join(lines) + "\n"


def run_training(args: argparse.Namespace) -> int:
    from model_audit import AuditOptions, ScanConfig, scan
    from model_audit.commands.compare import compare
    from model_audit.results.compare import CompareConfig
    device = common.pick_device(args.device)
    gpu = device.startswith("cuda")
    arch, per_class = common.scale_defaults(device, args.arch, args.train_per_class)
    epochs = args.epochs or (30.0 if gpu else 6.0)
    command = "python -m bench compare " + " ".join(sys.argv[2:] if len(sys.argv) > 2 else [])
    commit = common.git_commit()
    cache = (args.cache_dir or common.default_cache_dir()) / "compare"
    cache.mkdir(parents=True, exist_ok=True)
    kwargs = {"tarball": args.data} if args.data else {}
    train_dir = cifar.cifar_subset(cache.parent, "train", per_class, **kwargs)
    probe_dir = cifar.cifar_subset(cache.parent, "test", args.probe_size // 10, **kwargs)
    classes = list(cifar.CIFAR10_CLASSES)
    scans: Dict[Tuple[str, int], Dict[str, Any]] = {}
    runs: List[Dict[str, Any]] = []
    for (optimizer, seed), (name, path, stats) in checkpoints(
            args, arch, epochs, per_class, cache, train_dir, classes, device).items():
        arch = stats.get("arch", arch)
        print(f"scanning {name} ...", flush=True)
        result = scan(path, probe_dir, ScanConfig(options=AuditOptions(device=device, seed=0)))
        scans[(optimizer, seed)] = result.to_dict()
        runs.append({"name": name, "optimizer": optimizer, "seed": seed,
                     "accuracy": result.evaluation.accuracy, "flagged": list(result.flagged),
                     "train_seconds": stats.get("seconds"), "scan_seconds": result.timing["total_s"]})
    methods = [m for m in dict.fromkeys(k[0] for k in scans)]
    seeds = sorted({k[1] for k in scans})
    pairs: List[Tuple[str, Tuple[str, int], Tuple[str, int]]] = []
    for seed in seeds:
        for a, b in itertools.combinations(methods, 2):
            if (a, seed) in scans and (b, seed) in scans:
                pairs.append(("optimizer", (a, seed), (b, seed)))
    for optimizer in methods:
        for s1, s2 in itertools.combinations(seeds, 2):
            if (optimizer, s1) in scans and (optimizer, s2) in scans:
                pairs.append(("seed", (optimizer, s1), (optimizer, s2)))
    rows = []
    for kind, a, b in pairs:
        d = compare(scans[a], scans[b], CompareConfig(resamples=args.resamples, seed=0)).to_dict()
        rows.append({"kind": kind, "a": f"{a[0]} s{a[1]}", "b": f"{b[0]} s{b[1]}",
                     "jaccard": d["jaccard"], "jaccard_ci": d["intervals"].get("jaccard"),
                     "overlap": d["overlap_coefficient"], "both": d["flagged"]["both"],
                     "p_value": d["chance"]["p_value"],
                     "spearman": d["correlation"]["score"]["spearman"],
                     "spearman_ci": d["intervals"].get("spearman")})
    section = markdown(rows, runs, arch, device, epochs, per_class, args, command, commit)
    print(section)
    common.append_results(args.out, section)
    (cache / "last-compare.json").write_text(json.dumps({"runs": runs, "pairs": rows}, indent=2))
    return 0


def _num(v: Any, fmt: str = "{:.2f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def _ci(v: Any) -> str:
    return "" if not v else f" [{v[0]:.2f}, {v[1]:.2f}]"


def markdown(rows, runs, arch, device, epochs, per_class, args, command, commit) -> str:
    training = (
        f"- training: {per_class} CIFAR-10 train images per class, {epochs:g} epochs, batch "
        f"{args.batch}, cosine lr (SGD 0.05, Adam 0.002), weight decay 5e-4, flips; "
        "sgd = constant momentum 0.9, beta = the beta schedule, adam = Adam")
    if getattr(args, "from_train", False):
        training = ("- checkpoints: the runs of the last `python -m bench train` (its section "
                    "above has the recipe; method names as there)")
    lines = common.section_header(f"compare: optimizer vs seed, {arch}, {device}",
                              command, commit, device) + [
             training,
             f"- probe: {args.probe_size} CIFAR-10 test images (stratified); scan defaults; "
             f"{args.resamples} paired bootstrap resamples per comparison", "",
             "| run | probe accuracy | flagged | train s | scan s |", "|---|---:|---|---:|---:|"]
    for r in runs:
        lines.append(f"| {r['name']} | {100 * r['accuracy']:.1f}% | {', '.join(r['flagged']) or '-'} "
                     f"| {_num(r['train_seconds'], '{:.0f}')} | {r['scan_seconds']:.1f} |")
    lines += ["", "| comparison | A | B | flagged by both | Jaccard [95% CI] | overlap coef. | "
              "P(chance) | Spearman [95% CI] |", "|---|---|---|---|---|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['a']} | {r['b']} | {', '.join(r['both']) or '-'} | "
                     f"{_num(r['jaccard'])}{_ci(r['jaccard_ci'])} | {_num(r['overlap'])} | "
                     f"{r['p_value']:.3f} | {_num(r['spearman'])}{_ci(r['spearman_ci'])} |")
    import numpy as np

    for kind in ("optimizer", "seed"):
        vals = [r["jaccard"] for r in rows if r["kind"] == kind and r["jaccard"] is not None]
        rho = [r["spearman"] for r in rows if r["kind"] == kind and r["spearman"] is not None]
        if vals:
            lines.append("")
            lines.append(f"- {kind} pairs: mean Jaccard {np.mean(vals):.2f} (min {min(vals):.2f}, "
                         f"max {max(vals):.2f}, n={len(vals)}); mean Spearman "
                         f"{_num(float(np.mean(rho)) if rho else None)}")
    return "\n".join(lines) + "\n"
