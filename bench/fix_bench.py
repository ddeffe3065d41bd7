"""``python -m bench fix``: surgical repair of the flagged groups against its controls.

Default, the paper's setting on a converged model: the fully trained SGD ResNet-18 of
``../shared/models`` (``--checkpoint reference-sgd``; ``reference-adam`` or a path) is
repaired on one half of the CIFAR-10 test split (the first 500 images of every class: images
it never saw, ``--repair-data test-half``) and evaluated on the other half (the last 500 of
every class), which ``fix`` checks to be disjoint from the repair data by content hash. The
training split cannot serve: the reference models were trained on all of it.

Every run records fixed, broken and net for the flagged selection and for each control (all
layers, random groups of the same parameter share, Auto-RGN), the parameter share and the
compute against the full fine-tune (parameter-steps, and wall time side by side). One repair's
net is noisy (it changes hundreds of predictions both ways), so every selection gets exact
McNemar p-values (net vs churn; flagged vs each control on the same images), and ``--seeds N``
repeats the whole comparison with N seeds (batch order, random control).

``--sweep`` looks for better repair settings without touching the probe half: the flagged
selection alone, for every combination of the comma-separated ``--lr``, ``--steps``,
``--wrong-fraction`` and ``--batchnorm`` values, repaired on the first 400 images per class of
the repair half and scored on its last 100 per class (a validation split); the best setting by
validation net is printed as the flags to give the comparison.

``--repair-data seen`` / ``unseen`` are the older settings for checkpoints trained by
``python -m bench compare --train`` on a training subset: repair on that subset, or on the
next images of the training split.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

from . import _common as common
from . import cifar


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_checkpoint_argument(parser)
    parser.add_argument("--probe-size", type=int, default=10000,
                        help="held-out test images with --repair-data seen/unseen "
                             "[default: 10000]")
    parser.add_argument("--steps", default="200", help="repair steps [default: 200]")
    parser.add_argument("--lr", default="0.01", help="peak learning rate [default: 0.01]")
    parser.add_argument("--batch", type=int, default=64, help="batch size [default: 64]")
    parser.add_argument("--seeds", type=int, default=3,
                        help="repeat with seeds 0..N-1 and report mean and range [default: 3]")
    parser.add_argument("--wrong-fraction", default="natural",
                        help="share of each batch from the errors, or natural [default: "
                             "natural, the tool's default]")
    parser.add_argument("--batchnorm", default="train",
                        help="frozen or train [default: train, the tool's default]")
    parser.add_argument("--preserve", default=None,
                        help="weight(s) of the preservation term [default: the tool's]")
    parser.add_argument("--validation", type=float, default=None,
                        help="share of the repair data fix holds out [default: the tool's]")
    parser.add_argument("--target", default=None,
                        help="targeted repair (e.g. auto): the tool's targeted repair against an "
                             "Arachne-style search of the last layer, same images, seeds and "
                             "time budget")
    parser.add_argument("--layers", default="auto",
                        help="groups to retrain: auto (the flagged ones) or names separated by "
                             "commas [default: auto]")
    parser.add_argument("--plant-confusion", default=None, metavar="TRUE:PRED:ALPHA",
                        help="with --target: first plant a confusion in the head (alpha times "
                             "class TRUE's weights added to class PRED's), e.g. cat:dog:0.6")
    parser.add_argument("--target-fraction", type=float, default=None,
                        help="with --target: share of each batch from its instances "
                             "[default: the tool's]")
    parser.add_argument("--max-break", type=float, default=None,
                        help="with --target: fix's break budget on validation [default: none]")
    parser.add_argument("--head-rows", default=None, choices=("target", "all"),
                        help="with --target: rows of a retrained head that may change "
                             "[default: the tool's]")
    parser.add_argument("--no-guard", action="store_true",
                        help="with --target: no positive set in the batches (fix's guard off)")
    parser.add_argument("--repair-data", default="test-half",
                        choices=("test-half", "seen", "unseen"),
                        help="test-half: repair on one half of the test split, probe on the "
                             "other; seen/unseen: a training subset (see above) "
                             "[default: test-half]")
    parser.add_argument("--half", type=int, default=500,
                        help="images per class in each test half (test-half) [default: 500, "
                             "the whole test split]")
    parser.add_argument("--sweep", action="store_true",
                        help="search the comma-separated --lr/--steps/--wrong-fraction/"
                             "--batchnorm values on a validation split of the repair half")
    common.add_common_arguments(parser)


def _values(text: str, kind, name: str) -> list:
    from model_audit.errors import ConfigError

    try:
        out = [kind(v.strip()) for v in str(text).split(",") if v.strip()]
    except ValueError as exc:
        raise ConfigError(f"--{name}: {exc}") from exc
    if not out:
        raise ConfigError(f"--{name} is empty")
    return out


def _fraction(v: str):
    return None if v == "natural" else float(v)


def _grid(args: argparse.Namespace) -> List[Dict[str, Any]]:
    from model_audit.errors import ConfigError

    from model_audit.results.fix import FixConfig
    preserve = FixConfig.preserve if args.preserve is None else args.preserve
    grid = [{"lr": lr, "steps": steps, "wrong_fraction": wf, "batchnorm": bn, "preserve": pr}
            for lr in _values(args.lr, float, "lr")
            for steps in _values(args.steps, int, "steps")
            for wf in _values(args.wrong_fraction, _fraction, "wrong-fraction")
            for bn in _values(args.batchnorm, str, "batchnorm")
            for pr in _values(preserve, float, "preserve")]
    if len(grid) > 1 and not args.sweep:
        raise ConfigError("several values of --lr/--steps/--wrong-fraction/--batchnorm/"
                          "--preserve need --sweep")
    return grid


def _data(args: argparse.Namespace, cache: Path, sweep: bool) -> Tuple[Path, Path, str]:
    """(repair data, probe, description)."""
    kwargs = {"tarball": args.data} if args.data else {}
    if args.repair_data == "test-half":
        half = args.half
        if not 5 <= half <= 500:
            from model_audit.errors import ConfigError

            raise ConfigError(f"--half must be between 5 and 500 images per class, got {half}")
        if sweep:
            fit = half * 4 // 5
            return (cifar.cifar_subset(cache, "test", fit, **kwargs),
                    cifar.cifar_subset(cache, "test", half - fit, skip=fit, **kwargs),
                    f"repair: the first {fit} CIFAR-10 test images per class; validation: the "
                    f"next {half - fit} per class (both inside the repair half: the probe half "
                    "is not touched)")
        return (cifar.cifar_subset(cache, "test", half, **kwargs),
                cifar.cifar_subset(cache, "test", half, skip=half, **kwargs),
                f"repair: the first {half} CIFAR-10 test images per class (unseen in "
                f"training); probe: the next {half} per class (disjoint, checked by content "
                "hash)")
    _, per_class = common.scale_defaults(common.pick_device(args.device), None, None)
    skip = per_class if args.repair_data == "unseen" else 0
    return (cifar.cifar_subset(cache, "train", per_class, skip=skip, **kwargs),
            cifar.cifar_subset(cache, "test", args.probe_size // 10, **kwargs),
            f"repair: {per_class} CIFAR-10 train images per class "
            f"({'the ones the model was trained on' if args.repair_data == 'seen' else 'unseen by the model'}); "
            f"probe: {args.probe_size} held-out test images")


def run(args: argparse.Namespace) -> int:
    from model_audit import AuditOptions
    from model_audit.commands.fix import fix
    from model_audit.results.fix import FixConfig
    grid = _grid(args)
    device = common.pick_device(args.device)
    command = "python -m bench fix " + " ".join(sys.argv[2:])
    commit = common.git_commit()
    cache = args.cache_dir or common.default_cache_dir()
    ckpt, arch, normalize = common.resolve_checkpoint(args.checkpoint)
    train_dir, probe_dir, data_text = _data(args, cache, args.sweep)
    if args.target:
        from . import fix_target
        section = fix_target.run(args, grid[0], ckpt, arch, normalize, train_dir, probe_dir,
                                 device, command, commit, data_text)
        print(section)
        common.append_results(args.out, section)
        return 0
    results = []
    for setting in grid:
        for seed in range(args.seeds):
            print(f"repairing {ckpt.name} ({setting}, seed {seed}) on {train_dir}, probe "
                  f"{probe_dir} ({device}) ...", flush=True)
            opts = AuditOptions(device=device, seed=seed, arch=arch, normalize=normalize)
            extra = {} if args.validation is None else {"validation": args.validation}
            result = fix(ckpt, train_dir, probe_dir, None,
                         FixConfig(options=opts, steps=setting["steps"], lr=setting["lr"],
                                   wrong_fraction=setting["wrong_fraction"],
                                   batchnorm=setting["batchnorm"], batch_size=args.batch,
                                   preserve=setting["preserve"], evaluate_last=True,
                                   controls=() if args.sweep else ("all", "random", "rgn"),
                                   **extra))
            results.append(result.to_dict())
            sel = results[-1]["selection"]
            print(f"  net {sel['net']:+d} ({sel['fixed']} fixed, {sel['broken']} broken; kept "
                  f"step {sel['kept_step']}; last state net {sel['last_state']['net']:+d})",
                  flush=True)
    if args.sweep:
        section = markdown_sweep(results, ckpt, device, command, commit, data_text)
    else:
        section = markdown(results, ckpt, device, command, commit, data_text)
    print(section)
    common.append_results(args.out, section)
    return 0


def markdown_sweep(results, ckpt, device, command, commit, data_text: str) -> str:
    import statistics

    from model_audit.render.text import p_value as format_p
    lines = common.section_header(f"fix: repair settings on a validation split, "
                              f"{results[0]['model']['arch']}, {device}", command, commit,
                              device) + [
        f"- checkpoint: `{Path(ckpt).name}`; {data_text}; the flagged selection only "
        f"({', '.join(results[0]['selection']['groups'])}); {results[0]['train']['wrong']} "
        f"errors in the repair data, {results[0]['probe']['n']} validation images at "
        f"{100 * results[0]['accuracy']['before']:.2f}% before", "",
        "The repair's own validation part (fix's share of the repair images) chooses the state "
        "kept; 'last state' is the trajectory's end, which an unvalidated repair would keep.",
        "", "| lr | steps | wrong fraction | batchnorm | preserve | seed | kept step | fixed | "
        "broken | net | p(net) | last state: fixed / broken / net |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    by: Dict[tuple, List[int]] = {}
    last_by: Dict[tuple, List[int]] = {}
    for r in results:
        c, sel = r["config"], r["selection"]
        key = (c["lr"], c["steps"], c["wrong_fraction"], c["batchnorm"], c["preserve"])
        wf = "natural" if c["wrong_fraction"] is None else c["wrong_fraction"]
        head = f"| {c['lr']} | {c['steps']} | {wf} | {c['batchnorm']} | {c['preserve']} | {r['seed']}"
        if sel.get("diverged"):
            lines.append(head + " | diverged | | | | | |")
            continue
        last = sel["last_state"]
        by.setdefault(key, []).append(sel["net"])
        last_by.setdefault(key, []).append(last["net"])
        lines.append(f"{head} | {sel['kept_step']} | {sel['fixed']} | {sel['broken']} | "
                     f"{sel['net']:+d} | {format_p(sel['net_p_value'])} | {last['fixed']} / "
                     f"{last['broken']} / {last['net']:+d} |")
    if by:
        best = max(by, key=lambda k: (statistics.mean(last_by[k]), statistics.mean(by[k])))
        wf = "natural" if best[2] is None else best[2]
        lines += ["", "| lr | steps | preserve | mean net (kept state) | mean net (last state) |",
                  "|---:|---:|---:|---:|---:|"]
        lines += [f"| {k[0]} | {k[1]} | {k[4]} | {statistics.mean(by[k]):+.1f} | "
                  f"{statistics.mean(last_by[k]):+.1f} |" for k in by]
        lines += ["", f"- best by mean validation net of the last state "
                  f"({statistics.mean(last_by[best]):+.1f}; kept state "
                  f"{statistics.mean(by[best]):+.1f}): `--lr {best[0]} --steps {best[1]} "
                  f"--wrong-fraction {wf} --batchnorm {best[3]} --preserve {best[4]}`"]
    return "\n".join(lines) + "\n"


def _time_ratio(r: Dict[str, Any]) -> str:
    full = next((c for c in r["controls"] if c["name"] == "all"), None)
    if not full or not full["seconds"]:
        return "n/a"
    return f"{r['selection']['seconds'] / full['seconds']:.2f}"


def markdown(results, ckpt, device, command, commit, data_text: str) -> str:
    import statistics

    from model_audit.render.text import p_value as format_p
    d = results[0]
    cfg = d["config"]
    lines = common.section_header(f"fix: flagged selection vs controls, {d['model']['arch']}, "
                              f"{device}", command, commit, device) + [
             f"- checkpoint: `{Path(ckpt).name}`; {data_text}; {d['train']['n']} repair "
             f"images ({d['train']['wrong']} wrong before), {d['probe']['n']} probe images; "
             f"{d['selection']['steps']} steps, batch {cfg['batch_size']}, lr "
             f"{cfg['lr']}, {cfg['schedule']} momentum, wrong fraction "
             f"{cfg['wrong_fraction'] if cfg['wrong_fraction'] is not None else 'natural'}, "
             f"batchnorm {cfg['batchnorm']}, preservation weight {cfg['preserve']}; "
             f"validation: {d['validation']['n']} of the repair images held out by fix "
             f"({d['validation']['fit_n']} trained on); seeds "
             f"{', '.join(str(r['seed']) for r in results)}",
             f"- probe accuracy before {100 * d['accuracy']['before']:.2f}%; parameter-step "
             f"saving of the flagged selection vs the full fine-tune: "
             f"{100 * (d['compute']['param_steps_saving_vs_full'] or 0):.0f}%; wall time of "
             f"the flagged repair / the full fine-tune's, per seed: " + ", ".join(
                 _time_ratio(r) for r in results), ""]
    lines += ["| seed | selection | groups | params % | kept step | fixed | broken | net | "
              "p(net) | paired p vs flagged | last state: net (p) | seconds |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    nets: dict = {}
    last_nets: dict = {}
    for r in results:
        for run in [r["selection"]] + r["controls"]:
            last = run.get("last_state")
            if run.get("diverged"):
                counts = "- | diverged (loss NaN) | - | - | -"
            else:
                counts = (f"{run['kept_step']} | {run['fixed']} | {run['broken']} | "
                          f"{run['net']:+d} | {format_p(run['net_p_value'])}")
                nets.setdefault(run["name"], []).append(run["net"])
                if last:
                    last_nets.setdefault(run["name"], []).append(last["net"])
            paired = format_p((run.get("vs_flagged") or {}).get("p_value")) \
                if run["name"] != "flagged" else ""
            where = {True: " (outside the selection)", False: " (overlaps the selection)"}.get(
                run.get("disjoint_from_selection"), "")
            last_text = (f"{last['net']:+d} ({format_p(last['net_p_value'])})"
                         if last else "-")
            lines.append(f"| {r['seed']} | {run['name']} | {', '.join(run['groups'])}{where} | "
                         f"{run['params_percent']:.1f} | {counts} | {paired} | {last_text} | "
                         f"{run['seconds']:.1f} |")
    lines += ["", "| selection | mean net | min | max | runs (not diverged) | mean net of the "
              "last state (no validation) |", "|---|---:|---:|---:|---:|---:|"]
    for name, values in nets.items():
        last = last_nets.get(name)
        lines.append(f"| {name} | {statistics.mean(values):+.1f} | {min(values):+d} | "
                     f"{max(values):+d} | {len(values)}/{len(results)} | "
                     f"{statistics.mean(last) if last else float('nan'):+.1f} |")
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
