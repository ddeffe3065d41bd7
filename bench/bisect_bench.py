"""``python -m bench bisect``: exact regression bisection on releases built with a known bug.

From the reference ResNet-18 (the baseline), each release is the baseline fine-tuned with all
layers trainable on the repair half of the CIFAR-10 test split with one bug in its data:

* ``swap:A:B``: the labels of classes A and B exchanged;
* ``noise:S``: every image with Gaussian noise of standard deviation S (in normalised units);
* ``drop:C``: class C left out.

Both releases are judged on the probe half. The bisection (:func:`model_audit.commands.bisect.
bisect`, what ``compare`` and ``gate --baseline`` run) puts each group of the baseline back
into the release and counts the regression recovered and the new fixes lost. A second,
independent computation checks the top group: a model built by hand (the release's state dict
with the baseline's tensors of that group, loaded into a fresh network) and evaluated on the
whole probe.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

from . import _common as common
from . import cifar

DEFAULT_BUGS = "swap:automobile:truck,noise:0.5,drop:bird"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_checkpoint_argument(parser)
    common.add_common_arguments(parser)
    parser.add_argument("--bugs", default=DEFAULT_BUGS,
                        help=f"releases to build, comma-separated [default: {DEFAULT_BUGS}]")
    parser.add_argument("--steps", type=int, default=150,
                        help="fine-tuning steps of each release [default: 150]")
    parser.add_argument("--lr", type=float, default=0.01,
                        help="peak learning rate of the fine-tune (cosine) [default: 0.01]")
    parser.add_argument("--batch", type=int, default=64, help="batch size [default: 64]")
    parser.add_argument("--half", type=int, default=500,
                        help="images per class in each test half [default: 500]")


def buggy_data(x: Any, y: Any, bug: str, classes: Tuple[str, ...], seed: int) -> Tuple[Any, Any]:
    """The fine-tuning data of one release: ``x, y`` with the bug ``bug`` in it."""
    import torch

    kind, *rest = bug.split(":")
    if kind == "swap":
        a, b = (classes.index(c) for c in rest)
        y = y.clone()
        ia, ib = y == a, y == b
        y[ia], y[ib] = b, a
        return x, y
    if kind == "noise":
        gen = torch.Generator().manual_seed(seed)
        return x + float(rest[0]) * torch.randn(x.shape, generator=gen), y
    if kind == "drop":
        keep = y != classes.index(rest[0])
        return x[keep], y[keep]
    raise ValueError(f"unknown bug {bug!r}: swap:A:B, noise:S or drop:C")


def fine_tune(baseline: Any, x: Any, y: Any, args: argparse.Namespace, device: str,
              seed: int) -> Any:
    """A copy of ``baseline`` fine-tuned with every layer trainable (BatchNorm in training
    mode, SGD momentum 0.9, cosine learning rate, random flips)."""
    import copy

    import torch

    torch.manual_seed(seed)
    model = copy.deepcopy(baseline).to(device)
    opt, momentum = common.make_optimizer("sgd", model.parameters(), args.lr, args.lr, 5e-4)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    gen = torch.Generator().manual_seed(seed)
    common.train_steps(model, common.flipped_batches(x, y, args.steps, args.batch, gen, device),
                       opt, cosine, momentum)
    return model.cpu().eval()


def hand_merged_recovery(baseline: Any, candidate: Any, group: Any, probe: Any,
                         regressed: List[int], fixes: List[int], arch: str) -> Tuple[int, int]:
    """The second computation: a fresh network loaded with the candidate's state dict and the
    baseline's tensors of ``group``, evaluated on the whole probe."""
    from model_audit.core.evaluate import evaluate
    from model_audit.models.registry import build_model

    state = {k: v.clone() for k, v in candidate.state_dict().items()}
    base = baseline.state_dict()
    for k in list(group.parameter_names) + list(group.buffer_names):
        state[k] = base[k].clone()
    merged = build_model(arch, len(probe.classes),
                         shapes={k: tuple(v.shape) for k, v in state.items()})
    merged.load_state_dict(state)
    right = evaluate(merged.eval(), probe).predictions == probe.labels
    return (int(right[regressed].sum()), int((~right[fixes]).sum()))


def run(args: argparse.Namespace) -> int:
    import torch

    from model_audit import AuditOptions
    from model_audit.commands.bisect import bisect
    from model_audit.core.evaluate import evaluate
    from model_audit.core.layers import layer_groups
    from model_audit.options import load_inputs

    device = common.pick_device(args.device)
    command = shlex.join(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    commit = common.git_commit()
    cache = args.cache_dir or common.default_cache_dir()
    kwargs = {"tarball": args.data} if args.data else {}
    train_dir = cifar.cifar_subset(cache, "test", args.half, **kwargs)
    probe_dir = cifar.cifar_subset(cache, "test", args.half, skip=args.half, **kwargs)
    ckpt_path, arch, normalize = common.resolve_checkpoint(args.checkpoint)
    opts = AuditOptions(device=device, seed=0, arch=arch, normalize=normalize)
    ckpt, probe, _ = load_inputs(ckpt_path, probe_dir, opts)
    baseline = ckpt.model.eval()
    groups = layer_groups(baseline)
    classes = tuple(probe.classes)
    x, y, _ = cifar.load_images(train_dir, normalize=normalize or "cifar10", classes=classes)
    base_eval = evaluate(baseline, probe, device=device)
    rows: List[Dict[str, Any]] = []
    for i, bug in enumerate(b.strip() for b in args.bugs.split(",") if b.strip()):
        print(f"release {bug}: fine-tuning {args.steps} steps ...", flush=True)
        start = time.perf_counter()
        bx, by = buggy_data(x, y, bug, classes, seed=i)
        candidate = fine_tune(baseline, bx, by, args, device, seed=i)
        tune_s = time.perf_counter() - start
        cand_eval = evaluate(candidate, probe, device=device)
        start = time.perf_counter()
        regression = bisect(baseline, candidate, groups, probe, device=device,
                            predictions=(base_eval.predictions, cand_eval.predictions))
        bisect_s = time.perf_counter() - start
        right_a = base_eval.predictions == probe.labels
        right_b = cand_eval.predictions == probe.labels
        regressed = torch.nonzero(right_a & ~right_b).flatten().tolist()
        fixes = torch.nonzero(~right_a & right_b).flatten().tolist()
        best = regression.best
        check = None
        if best is not None:
            group = next(g for g in groups if g.name == best.groups[0])
            check = hand_merged_recovery(baseline, candidate, group, probe, regressed, fixes,
                                         ckpt.arch)
        row = {"bug": bug, "acc_before": base_eval.accuracy, "acc_after": cand_eval.accuracy,
               "regressed": regression.regressed, "fixes": regression.new_fixes,
               "singles": [s.to_dict() for s in regression.groups],
               "pairs": [s.to_dict() for s in regression.pairs],
               "check": check, "tune_s": tune_s, "bisect_s": bisect_s}
        print(f"  {row}", flush=True)
        rows.append(row)
    lines = markdown(rows, args, ckpt_path, device, command, commit)
    return 0 if common.write_section(args.out, lines) else 2


def markdown(rows: List[Dict[str, Any]], args: argparse.Namespace, ckpt: Path, device: str,
             command: str, commit: str) -> List[str]:
    lines = common.section_header("bisect: exact regression bisection on releases with a known "
                                  "bug", command, commit, device)
    lines += [f"- baseline: `{Path(ckpt).name}`; each release: the baseline fine-tuned "
              f"{args.steps} steps (batch {args.batch}, SGD momentum 0.9, lr {args.lr} cosine, "
              "every layer trainable, BatchNorm in training mode, random flips) on the first "
              f"{args.half} CIFAR-10 test images per class with the bug; probe: the next "
              f"{args.half} per class", "",
              "| release (bug) | accuracy | regressed | new fixes | first group: recovered "
              "(share), lost fixes | second group | hand-merged check of the first | best pair "
              "| bisection s |",
              "|---|---|---:|---:|---|---|---|---|---:|"]
    for r in rows:
        s = r["singles"]
        n = max(r["regressed"], 1)

        def cell(d: Dict[str, Any]) -> str:
            return (f"{'+'.join(d['groups'])}: {d['recovered']} ({100 * d['recovered'] / n:.0f}%), "
                    f"{d['lost_fixes']}")

        first = cell(s[0]) if s else "-"
        second = cell(s[1]) if len(s) > 1 else "-"
        check = r["check"]
        same = ("-" if check is None else
                f"{check[0]} recovered, {check[1]} lost "
                f"({'equal' if s and tuple(check) == (s[0]['recovered'], s[0]['lost_fixes']) else 'DIFFERENT'})")
        pair = cell(r["pairs"][0]) if r["pairs"] else "not needed"
        lines.append(f"| {r['bug']} | {100 * r['acc_before']:.2f}% -> {100 * r['acc_after']:.2f}% "
                     f"| {r['regressed']} | {r['fixes']} | {first} | {second} | {same} | {pair} | "
                     f"{r['bisect_s']:.1f} |")
    lines += ["", "Every group alone (recovered of the regression / new fixes lost):", "",
              "| release | " + " | ".join(d["groups"][0] for d in
                                          sorted(rows[0]["singles"], key=lambda d: d["groups"][0]))
              + " |" if rows else "",
              ]
    if rows:
        names = sorted(d["groups"][0] for d in rows[0]["singles"])
        lines.append("|---|" + "---:|" * len(names))
        for r in rows:
            by = {d["groups"][0]: d for d in r["singles"]}
            lines.append(f"| {r['bug']} | " + " | ".join(
                f"{by[g]['recovered']} / {by[g]['lost_fixes']}" for g in names) + " |")
    return lines + [""]
