"""``python -m bench fix``: surgical repair of the flagged groups against its controls.

Takes a CIFAR-10 checkpoint trained by ``python -m bench compare`` (default: the SGD, seed 0
run of its default architecture: ``resnet18-cifar`` on a GPU, ``tiny-resnet`` on a CPU),
repairs it with ``model_audit.fix.fix`` on the training subset it was trained on, evaluates on
``--probe-size`` held-out CIFAR-10 test images (10,000: the whole test split), and records
fixed, broken and net for the flagged selection and for each control (all layers, random
groups of the same parameter share, Auto-RGN), the parameter share and the compute saving.
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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--out", type=Path, default=sb.DEFAULT_RESULTS)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--data", type=Path, default=None)


def run(args: argparse.Namespace) -> int:
    import torch

    from model_audit import AuditOptions
    from model_audit.fix import FixConfig, fix

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else (
        "cpu" if args.device == "auto" else args.device)
    gpu = device.startswith("cuda")
    command = "python -m bench fix " + " ".join(sys.argv[2:])
    commit = sb.git_commit()
    cache = args.cache_dir or sb.default_cache_dir()
    cifar = sb._cifar_module()
    kwargs = {"tarball": args.data} if args.data else {}
    per_class = 5000 if gpu else 1000
    ckpt = args.checkpoint
    if ckpt is None:
        arch = "resnet18-cifar" if gpu else "tiny-resnet"
        found = sorted((cache / "compare").glob(f"{arch}-sgd-s0-*-n{per_class}.safetensors"))
        if not found:
            print("no compare-bench checkpoint: run `python -m bench compare` first, or give "
                  "--checkpoint", file=sys.stderr)
            return 2
        ckpt = found[-1]
    train_dir = cifar.cifar_subset(cache, "train", per_class, **kwargs)
    probe_dir = cifar.cifar_subset(cache, "test", args.probe_size // 10, **kwargs)
    output = cache / "fix" / f"{Path(ckpt).stem}-fixed.safetensors"
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.exists():
        output.unlink()
    print(f"repairing {ckpt} on {train_dir}, probe {probe_dir} ({device}) ...", flush=True)
    result = fix(ckpt, train_dir, probe_dir, output,
                 FixConfig(options=AuditOptions(device=device, seed=args.seed),
                           steps=args.steps, lr=args.lr))
    d = result.to_dict()
    lines = sb.section_header(f"fix: flagged selection vs controls, {d['model']['arch']}, "
                              f"{device}", command, commit, device) + [
             f"- checkpoint: `{Path(ckpt).name}`; repair data: {d['train']['n']} CIFAR-10 train "
             f"images ({d['train']['wrong']} wrong before); probe: {d['probe']['n']} held-out "
             f"test images; {d['selection']['steps']} steps, batch {d['config']['batch_size']}, "
             f"lr {d['config']['lr']}, {d['config']['schedule']} momentum, seed {d['seed']}",
             f"- probe accuracy {100 * d['accuracy']['before']:.2f}% -> "
             f"{100 * d['accuracy']['after']:.2f}%; parameter-step saving vs full fine-tune: "
             f"{100 * (d['compute']['param_steps_saving_vs_full'] or 0):.0f}%", "",
             "| selection | groups | params % | fixed | broken | net | parameter-steps | seconds |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in [d["selection"]] + d["controls"]:
        counts = ("diverged (loss NaN) | - | -" if r.get("diverged") else
                  f"{r['fixed']} | {r['broken']} | {r['net']:+d}")
        lines.append(f"| {r['name']} | {', '.join(r['groups'])} | {r['params_percent']:.1f} | "
                     f"{counts} | {r['compute_param_steps']:.3g} | {r['seconds']:.1f} |")
    v = d["verdict"]
    lines += ["", f"- the flagged selection beat: {', '.join(v['beat']) or 'none'}; did not "
              f"beat: {', '.join(v['did_not_beat']) or 'none'}; diverged: "
              f"{', '.join(v['diverged']) or 'none'} (by net; a tie is not a win)", ""]
    section = "\n".join(lines)
    print(section)
    sb.append_results(args.out, section)
    return 0
