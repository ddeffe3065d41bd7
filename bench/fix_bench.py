"""``python -m bench fix``: surgical repair of the flagged groups against its controls.

Takes a CIFAR-10 checkpoint trained by ``python -m bench compare`` (default: the SGD, seed 0
run of its default architecture: ``resnet18-cifar`` on a GPU, ``tiny-resnet`` on a CPU),
repairs it with ``model_audit.fix.fix`` on the training subset it was trained on, evaluates on
``--probe-size`` held-out CIFAR-10 test images (10,000: the whole test split), and records
fixed, broken and net for the flagged selection and for each control (all layers, random
groups of the same parameter share, Auto-RGN), the parameter share and the compute saving.

One repair's net is noisy: a repair changes hundreds of predictions both ways. So every
selection gets the tool's exact McNemar p-values (net vs churn; flagged vs each control on the
same images), and ``--seeds N`` repeats the whole comparison with N seeds (batch order, random
control) and reports the mean and range of every net. ``--repair-data unseen`` repairs on
training images the model never saw (the next ``per-class`` images of each class) instead of
its own training subset.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import scan_bench as sb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="checkpoint to repair [default: the compare bench's sgd seed 0]")
    parser.add_argument("--probe-size", type=int, default=10000,
                        help="held-out test images [default: 10000]")
    parser.add_argument("--steps", type=int, default=200, help="repair steps [default: 200]")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seeds", type=int, default=1,
                        help="repeat with seeds 0..N-1 and report mean and range [default: 1]")
    parser.add_argument("--wrong-fraction", default="natural",
                        help="share of each batch from the errors, or natural [default: "
                             "natural, the tool's default]")
    parser.add_argument("--batchnorm", default="train", choices=("frozen", "train"),
                        help="[default: train, the tool's default]")
    parser.add_argument("--repair-data", default="seen", choices=("seen", "unseen"),
                        help="seen: the subset the model was trained on; unseen: the next "
                             "images of the training split [default: seen]")
    sb.add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from model_audit import AuditOptions
    from model_audit.fix import FixConfig, fix

    device = sb.pick_device(args.device)
    command = "python -m bench fix " + " ".join(sys.argv[2:])
    commit = sb.git_commit()
    cache = args.cache_dir or sb.default_cache_dir()
    cifar = sb._cifar_module()
    kwargs = {"tarball": args.data} if args.data else {}
    arch, per_class = sb.scale_defaults(device, None, None)
    ckpt = args.checkpoint
    if ckpt is None:
        found = sorted((cache / "compare").glob(f"{arch}-sgd-s0-*-n{per_class}.safetensors"))
        if not found:
            print("no compare-bench checkpoint: run `python -m bench compare` first, or give "
                  "--checkpoint", file=sys.stderr)
            return 2
        ckpt = found[-1]
    skip = per_class if args.repair_data == "unseen" else 0
    train_dir = cifar.cifar_subset(cache, "train", per_class, skip=skip, **kwargs)
    probe_dir = cifar.cifar_subset(cache, "test", args.probe_size // 10, **kwargs)
    output = cache / "fix" / f"{Path(ckpt).stem}-fixed.safetensors"
    output.parent.mkdir(parents=True, exist_ok=True)
    wrong_fraction = None if args.wrong_fraction == "natural" else float(args.wrong_fraction)
    results = []
    for seed in range(args.seeds):
        if output.exists():
            output.unlink()
        print(f"repairing {ckpt} on {train_dir}, probe {probe_dir} ({device}, seed {seed}) ...",
              flush=True)
        result = fix(ckpt, train_dir, probe_dir, output,
                     FixConfig(options=AuditOptions(device=device, seed=seed),
                               steps=args.steps, lr=args.lr, wrong_fraction=wrong_fraction,
                               batchnorm=args.batchnorm))
        results.append(result.to_dict())
    section = markdown(results, ckpt, device, command, commit, args.repair_data)
    print(section)
    sb.append_results(args.out, section)
    return 0


def markdown(results, ckpt, device, command, commit, repair_data: str) -> str:
    import statistics

    from model_audit.fix import format_p

    d = results[0]
    cfg = d["config"]
    lines = sb.section_header(f"fix: flagged selection vs controls, {d['model']['arch']}, "
                              f"{device}", command, commit, device) + [
             f"- checkpoint: `{Path(ckpt).name}`; repair data: {d['train']['n']} CIFAR-10 train "
             f"images, {'the ones the model was trained on' if repair_data == 'seen' else 'unseen by the model'} "
             f"({d['train']['wrong']} wrong before); probe: {d['probe']['n']} held-out test "
             f"images; {d['selection']['steps']} steps, batch {cfg['batch_size']}, lr "
             f"{cfg['lr']}, {cfg['schedule']} momentum, wrong fraction "
             f"{cfg['wrong_fraction'] if cfg['wrong_fraction'] is not None else 'natural'}, "
             f"batchnorm {cfg['batchnorm']}; seeds {', '.join(str(r['seed']) for r in results)}",
             f"- probe accuracy before {100 * d['accuracy']['before']:.2f}%; parameter-step "
             f"saving of the flagged selection vs the full fine-tune: "
             f"{100 * (d['compute']['param_steps_saving_vs_full'] or 0):.0f}%", ""]
    lines += ["| seed | selection | groups | params % | fixed | broken | net | p(net) | "
              "paired p vs flagged | seconds |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    nets: dict = {}
    for r in results:
        for run in [r["selection"]] + r["controls"]:
            if run.get("diverged"):
                counts = "diverged (loss NaN) | - | - | -"
            else:
                counts = (f"{run['fixed']} | {run['broken']} | {run['net']:+d} | "
                          f"{format_p(run['net_p_value'])}")
                nets.setdefault(run["name"], []).append(run["net"])
            paired = format_p((run.get("vs_flagged") or {}).get("p_value")) \
                if run["name"] != "flagged" else ""
            where = {True: " (outside the selection)", False: " (overlaps the selection)"}.get(
                run.get("disjoint_from_selection"), "")
            lines.append(f"| {r['seed']} | {run['name']} | {', '.join(run['groups'])}{where} | "
                         f"{run['params_percent']:.1f} | {counts} | {paired} | "
                         f"{run['seconds']:.1f} |")
    lines += ["", "| selection | mean net | min | max | runs (not diverged) |",
              "|---|---:|---:|---:|---:|"]
    for name, values in nets.items():
        lines.append(f"| {name} | {statistics.mean(values):+.1f} | {min(values):+d} | "
                     f"{max(values):+d} | {len(values)}/{len(results)} |")
    counts = []  # per control: seeds it was beaten in, significantly, significantly worse
    for name in (c["name"] for c in d["controls"]):
        counts.append([sum(1 for r in results if name in r["verdict"][key])
                       for key in ("beat", "beat_significantly", "worse_significantly")])
    lines += ["", "- the flagged selection's net was higher than: " + ", ".join(
        f"{c['name']} in {b}/{len(results)} seeds ({s} significantly at p < 0.05; "
        f"significantly worse in {w})"
        for c, (b, s, w) in zip(d["controls"], counts)) + "; net > 0 in "
        f"{sum(1 for r in results if r['net'] > 0)}/{len(results)} seeds, significantly in "
        f"{sum(1 for r in results if r['net'] > 0 and r['verdict']['net_significant'])}", ""]
    return "\n".join(lines)
