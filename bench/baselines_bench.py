"""``python -m bench baselines``: the own metric against each Captum baseline, side by side.

On the briefly trained CIFAR ResNet-18 (CIFAR stem) that ``python -m bench scan`` trains and
caches, one run scans a ``--probe-size`` CIFAR-10 test probe with the own metric and the cheap
baselines, and a smaller ``--path-probe-size`` probe with every baseline (the path methods at
n_steps=50 cost 51 (conductance) and 50 (internal influence) forward+backward passes per
misclassified image for all groups together, layer integrated gradients 52 per group: most
of an hour on a 2-core CPU for a ResNet-18's errors in 1,000 images). Every cost ratio is
measured inside one scan, where the own metric and the baseline see the same misclassified
images, so it does not depend on the probe size; the rank agreement (Spearman, Kendall, top-k
overlap with the flagged set) is reported for both probes.
``--path-baselines`` chooses the baselines of the path probe (all by default); when both probes
have the same size, one scan runs the cheap baselines and those together.

The tool computes conductance for every group from one backward pass per path point, where
captum's ``LayerConductance`` runs once per group. ``--captum-reference N`` measures what that
saves: on the first N misclassified images of the largest probe it times captum's class one
layer at a time (with the same images per forward) against the tool's shared pass, checks that
their per-group values agree, and reports the seconds per image of both and of the own metric.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List

from . import _common as common
from . import cifar


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
    parser.add_argument("--captum-reference", type=int, default=32, metavar="N",
                        help="time captum's LayerConductance one layer at a time against the "
                             "tool's shared pass on N misclassified images (0: off) "
                             "[default: 32]")
    common.add_common_arguments(parser)
    parser.add_argument("--train-steps", type=int, default=common.DEFAULT_TRAIN_STEPS)
    parser.add_argument("--train-batch", type=int, default=common.DEFAULT_TRAIN_BATCH)
    parser.add_argument("--train-per-class", type=int, default=common.DEFAULT_TRAIN_PER_CLASS)
    parser.add_argument("--retrain", action="store_true")
    common.add_checkpoint_argument(parser, extra=", brief (the scan bench's briefly trained "
                               "ResNet-18)")


def run(args: argparse.Namespace) -> int:
    from model_audit import AuditOptions, ScanConfig, scan
    from model_audit.baselines import DEFAULT_BASELINES, resolve_baselines
    path_names = resolve_baselines(args.path_baselines)  # a bad name fails before any work
    device = common.pick_device(args.device)
    command = "python -m bench baselines " + " ".join(sys.argv[2:])
    commit = common.git_commit()
    cache = args.cache_dir or common.default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    kwargs = {"tarball": args.data} if args.data else {}
    classes = list(cifar.CIFAR10_CLASSES)
    train_dir = cifar.cifar_subset(cache, "train", args.train_per_class, **kwargs)
    ckpt, training = common.prepare_checkpoint(cache, train_dir, args, device, classes)
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
        opts = AuditOptions(device=device, arch=training.get("arch"),
                            normalize=training.get("normalize"))
        result = scan(ckpt, probe, ScanConfig(options=opts,
                                              baselines=names, baseline_steps=args.steps))
        results.append({"size": size, "audit": result.to_dict()})
    reference = None
    if args.captum_reference > 0:
        size = max(args.probe_size, args.path_probe_size)
        probe = cifar.cifar_subset(cache, "test", size // 10, **kwargs)
        print(f"captum's LayerConductance one layer at a time on {args.captum_reference} "
              "errors ...", flush=True)
        reference = captum_reference(ckpt, probe, args.captum_reference, args.steps, device,
                                     training.get("arch"), training.get("normalize"))
    section = markdown(results, device, command, commit, args, reference)
    print(section)
    common.append_results(args.out, section)
    return 0


def captum_reference(checkpoint: Path, probe_dir: Path, n_images: int, n_steps: int,
                     device: str, arch=None, normalize=None) -> Dict[str, Any]:
    """captum's ``LayerConductance`` per group vs the tool's shared pass, on the same errors.

    Both see the same prepared copy of the model (group outputs protected from in-place
    operations, as in every scan) and the same images per forward (whole paths of
    ``internal_batch_size // (n_steps + 1)`` images, the scan's batch size as the internal
    batch size), so the ratio is the saving of one backward pass for every group.
    """
    import copy
    import time

    import captum.attr as ca
    import numpy as np
    import torch

    from model_audit import AuditOptions
    from model_audit.baselines import _Counter, _abs_sum, _shared_path_totals, prepare_layers
    from model_audit.core.evaluate import evaluate
    from model_audit.core.layers import layer_groups
    from model_audit.options import load_inputs

    opts = AuditOptions(device=device, arch=arch, normalize=normalize)
    ckpt, probe, _ = load_inputs(checkpoint, probe_dir, opts)
    model = ckpt.model.to(device).eval()
    ev = evaluate(model, probe, device=device, batch_size=opts.batch_size)
    errors = ev.misclassified[:n_images]
    x = probe.load(errors).to(device)
    y = ev.labels[errors].to(device).long()
    groups = layer_groups(model)
    net = copy.deepcopy(model)
    layers = prepare_layers(net, groups, x)
    ibs = opts.batch_size
    per_forward = max(1, ibs // (n_steps + 1))

    counter = _Counter()
    forward = counter.wrap(net)
    t0 = time.perf_counter()
    with torch.enable_grad():
        shared = _shared_path_totals("conductance", forward, layers, x, y, n_steps, ibs)
    shared_s = time.perf_counter() - t0
    shared_passes = counter.forward

    counter = _Counter()
    forward = counter.wrap(net)
    per_layer: Dict[int, List[Any]] = {j: [] for j in layers}
    t0 = time.perf_counter()
    with torch.enable_grad():
        for j, module in layers.items():
            cond = ca.LayerConductance(forward, module)
            for start in range(0, len(errors), per_forward):
                part = slice(start, start + per_forward)
                a = cond.attribute(x[part], target=y[part], n_steps=n_steps,
                                   internal_batch_size=ibs)
                per_layer[j].append(_abs_sum(a))
    captum_s = time.perf_counter() - t0
    diffs = [float((torch.cat(per_layer[j]) - shared[j]).abs().max()
                   / shared[j].abs().max().clamp_min(1e-30)) for j in layers]
    return {"images": len(errors), "groups": len(layers), "n_steps": n_steps,
            "images_per_forward": per_forward * (n_steps + 1),
            "captum_s": captum_s, "captum_passes": counter.forward,
            "shared_s": shared_s, "shared_passes": shared_passes,
            "max_relative_difference": float(np.max(diffs)) if diffs else None}


def _reference_lines(reference: Dict[str, Any], results: List[Dict[str, Any]]) -> List[str]:
    n = reference["images"]
    captum_pi, shared_pi = reference["captum_s"] / n, reference["shared_s"] / n
    lines = [f"### captum's LayerConductance one layer at a time vs the shared pass, on {n} of "
             "the errors", "",
             f"Both at n_steps={reference['n_steps']}, {reference['images_per_forward']} images "
             f"per forward, {reference['groups']} groups; largest relative difference of the "
             f"per-image group values: {reference['max_relative_difference']:.1e}.", "",
             "| conductance | seconds | seconds per image | passes per image |",
             "|---|---:|---:|---:|",
             f"| captum, one layer at a time | {reference['captum_s']:.2f} | {captum_pi:.3f} | "
             f"{reference['captum_passes'] / n:.0f} |",
             f"| tool, all groups per pass | {reference['shared_s']:.2f} | {shared_pi:.3f} | "
             f"{reference['shared_passes'] / n:.0f} |", "",
             f"captum one layer at a time / shared pass: **{captum_pi / shared_pi:.1f}x**."]
    for r in results:
        a = r["audit"]
        own = a["cost"].get(a["metric"]["name"])
        errors = a["probe"]["misclassified"]
        if own and errors:
            own_pi = own["seconds"] / errors
            lines.append(f"On the {r['size']}-image probe the own metric took {own_pi:.3f} s per "
                         "error: captum's per-layer conductance costs "
                         f"**{captum_pi / own_pi:.1f}x** that per image (the shared pass "
                         f"{shared_pi / own_pi:.1f}x).")
    return lines + [""]


def _n(v: Any, fmt: str = "{:.2f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def markdown(results, device, command, commit, args, reference=None) -> str:
    arch = results[0]["audit"]["model"]["arch"] if results else "resnet18-cifar"
    lines = common.section_header(f"own metric vs Captum baselines, {arch}, {device}",
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
    if reference:
        lines += _reference_lines(reference, results)
    return "\n".join(lines) + "\n"
