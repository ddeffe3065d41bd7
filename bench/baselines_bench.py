"""``python -m bench baselines``: the own metric against each Captum baseline, side by side.

On the briefly trained CIFAR ResNet-18 (CIFAR stem) that ``python -m bench scan`` trains and
caches, one run scans a ``--probe-size`` CIFAR-10 test probe with the own metric and the cheap
baselines, and a smaller ``--path-probe-size`` probe with every baseline (the path methods,
conductance, integrated gradients and internal influence at n_steps=50, cost about
groups x 51 forward+backward passes per misclassified image: hours on a 2-core CPU for 1,000
images). Every cost ratio is measured inside one scan, where the own metric and the baseline
see the same misclassified images, so it does not depend on the probe size; the rank agreement
(Spearman, Kendall, top-k overlap with the flagged set) is reported for both probes.
``--path-baselines`` chooses the baselines of the path probe (all by default); when both probes
have the same size, one scan runs the cheap baselines and those together.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List

from . import scan_bench as sb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--probe-size", type=int, default=1000,
                        help="probe for the own metric and the cheap baselines [default: 1000]")
    parser.add_argument("--path-probe-size", type=int, default=50,
                        help="probe for all baselines, path methods included [default: 50]")
    parser.add_argument("--path-baselines", default="all",
                        help="baselines run on the path probe, as `model-audit scan --baselines` "
                             "takes them (e.g. `default,conductance` when the other path "
                             "methods would not fit the time) [default: all]")
    parser.add_argument("--steps", type=int, default=50, help="n_steps of the path methods")
    sb.add_common_arguments(parser)
    parser.add_argument("--train-steps", type=int, default=sb.DEFAULT_TRAIN_STEPS)
    parser.add_argument("--train-batch", type=int, default=sb.DEFAULT_TRAIN_BATCH)
    parser.add_argument("--train-per-class", type=int, default=sb.DEFAULT_TRAIN_PER_CLASS)
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="a CIFAR-10 checkpoint (e.g. from `python -m bench train`) instead "
                             "of the scan bench's briefly trained one")


def run(args: argparse.Namespace) -> int:
    from model_audit import AuditOptions, ScanConfig, scan
    from model_audit.baselines import DEFAULT_BASELINES, resolve_baselines

    path_names = resolve_baselines(args.path_baselines)  # a bad name fails before any work
    device = sb.pick_device(args.device)
    command = "python -m bench baselines " + " ".join(sys.argv[2:])
    commit = sb.git_commit()
    cache = args.cache_dir or sb.default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    cifar = sb._cifar_module()
    kwargs = {"tarball": args.data} if args.data else {}
    classes = list(cifar.CIFAR10_CLASSES)
    train_dir = cifar.cifar_subset(cache, "train", args.train_per_class, **kwargs)
    ckpt, training = sb.prepare_checkpoint(cache, train_dir, args, device, classes)
    args.model_text = (f"`{training['checkpoint']}`" if training.get("checkpoint") else
                       f"the `python -m bench scan` checkpoint ({args.train_steps} steps x "
                       f"batch {args.train_batch})")
    runs = [(args.probe_size, DEFAULT_BASELINES), (args.path_probe_size, path_names)]
    if args.path_probe_size == args.probe_size:  # one probe: one scan with every baseline
        runs = [(args.probe_size, resolve_baselines(DEFAULT_BASELINES + path_names))]
    results: List[Dict[str, Any]] = []
    for size, names in runs:
        probe = cifar.cifar_subset(cache, "test", size // 10, **kwargs)
        print(f"scanning {size} images with {', '.join(names)} ...", flush=True)
        result = scan(ckpt, probe, ScanConfig(options=AuditOptions(device=device),
                                              baselines=names, baseline_steps=args.steps))
        results.append({"size": size, "audit": result.to_dict()})
    section = markdown(results, device, command, commit, args)
    print(section)
    sb.append_results(args.out, section)
    return 0


def _n(v: Any, fmt: str = "{:.2f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def markdown(results, device, command, commit, args) -> str:
    arch = results[0]["audit"]["model"]["arch"] if results else "resnet18-cifar"
    lines = sb.section_header(f"own metric vs Captum baselines, {arch}, {device}",
                              command, commit, device) + [
             f"- model: {getattr(args, 'model_text', 'the scan bench checkpoint')}; path "
             f"methods at n_steps={args.steps}", ""]
    for r in results:
        a = r["audit"]
        lines += [f"### probe of {r['size']} images: accuracy {100 * a['probe']['accuracy']:.1f}%, "
                  f"{a['probe']['misclassified']} misclassified, flagged "
                  f"{', '.join(a['flagged']) or 'none'}", "",
                  "| method | seconds | x own metric | forward images | backward images | "
                  "Spearman | Kendall | top-k overlap |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, c in a["cost"].items():
            ag = a["agreement"].get(name, {})
            lines.append(f"| {name} | {c['seconds']:.2f} | {_n(c['relative_to_own'])} | "
                         f"{c['forward_images']:,} | {c['backward_images']:,} | "
                         f"{_n(ag.get('spearman')) if ag else '-'} | "
                         f"{_n(ag.get('kendall')) if ag else '-'} | "
                         f"{_n(ag.get('topk_overlap')) if ag else '-'} |")
        lines.append("")
        lines.append("| group | own score | " + " | ".join(a["agreement"]) + " |")
        lines.append("|---|---:|" + "---:|" * len(a["agreement"]))
        for layer in a["layers"]:
            lines.append(f"| {layer['name']} | {layer['score']:.3f} | " + " | ".join(
                _n(layer["baselines"].get(n), "{:.3f}") for n in a["agreement"]) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"
