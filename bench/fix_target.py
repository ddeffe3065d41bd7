"""``python -m bench fix --target auto``: the tool's targeted repair against an Arachne-style
search (:mod:`bench.arachne`), on the same images, seeds and time budget.

For every seed: ``model_audit.fix`` with ``target`` (its validation share held out of the
repair half, the flagged groups from a scan of the confusion's instances, the state kept only
when it beats the original on validation), then the Arachne-style repair of the last layer on
the same part of the repair data (the confusion's instances as negative inputs, the images
the model gets right as positive ones), given the tool's wall time. Both are scored on the
probe half: the confusion's probe count before and after, the repair rate (its probe
instances now right), the break rate (probe images right before, wrong after) and the net.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from . import _common as common
from . import arachne


def _scores(before_pred: torch.Tensor, after_pred: torch.Tensor, labels: torch.Tensor,
            target: Any) -> Dict[str, Any]:
    from model_audit.core.stats import mcnemar_exact

    inside = target.mask(labels, before_pred)
    right0, right1 = before_pred == labels, after_pred == labels
    fixed, broken = int((~right0 & right1).sum()), int((right0 & ~right1).sum())
    return {"probe_before": int(inside.sum()),
            "probe_after": int(target.mask(labels, after_pred).sum()),
            "repair_rate": int((inside & right1).sum()) / max(int(inside.sum()), 1),
            "break_rate": broken / max(int(right0.sum()), 1),
            "fixed": fixed, "broken": broken, "net": fixed - broken,
            "p": mcnemar_exact(fixed, broken)}


def _arachne(ckpt_path: Path, opts: Any, train_dir: Path, probe_dir: Path, spec: str,
             validation: float, budget: float, seed: int) -> Dict[str, Any]:
    from model_audit.commands.fix.target import resolve_target
    from model_audit.commands.fix.validate import holdout
    from model_audit.core.evaluate import evaluate
    from model_audit.options import load_inputs, open_probe_for

    ckpt, probe, _ = load_inputs(ckpt_path, probe_dir, opts)
    train, _ = open_probe_for(ckpt, train_dir, opts)
    model = ckpt.model.eval()
    ev = evaluate(model, train)
    target = resolve_target([spec], train.classes, ev)
    strata = target.mask(ev.labels, ev.predictions)
    fit, _ = holdout(train.labels, validation, seed, strata)  # the tool's own split
    neg = [p for p in fit if bool(strata[p])]
    pos = [p for p in fit if bool(ev.predictions[p] == ev.labels[p])]
    head, _ = arachne.head_and_features(model)
    feats_neg = arachne.features(model, train, neg)
    feats_pos = arachne.features(model, train, pos)
    start = time.perf_counter()
    result = arachne.repair(head, feats_neg, train.labels[neg], feats_pos, train.labels[pos],
                            budget_s=max(budget - (time.perf_counter() - start), 1.0),
                            seed=seed)
    probe_feats = arachne.features(model, probe, list(range(len(probe))))
    before = arachne.predict(head, head.weight.detach().float(), probe_feats)
    after = arachne.predict(head, result.w, probe_feats)
    return {**_scores(before, after, probe.labels, target), "seconds": result.seconds,
            "weights": len(result.weights), "generations": result.generations,
            "evaluations": result.evaluations, "neg": len(neg), "pos": len(pos),
            "target": target.names(train.classes)[0]}


def planted(ckpt: Path, arch: Optional[str], normalize: Optional[str], spec: str,
            cache: Path) -> Path:
    """A copy of ``ckpt`` with a confusion planted in its head: ``alpha`` times class TRUE's
    weights and bias added to class PRED's (``TRUE:PRED:ALPHA``), so that images of TRUE are
    read as PRED and the other classes barely move: a fault of the last layer."""
    from model_audit.models.checkpoint import audit_metadata, load_checkpoint, save_checkpoint
    from model_audit.models.registry import head_name

    true, pred, alpha = spec.split(":")
    loaded = load_checkpoint(ckpt, arch=arch)
    classes = list(loaded.classes or cifar_classes())
    t, p = classes.index(true), classes.index(pred)
    head = loaded.model.get_submodule(head_name(loaded.model))
    with torch.no_grad():
        head.weight[p] += float(alpha) * head.weight[t]
        head.bias[p] += float(alpha) * head.bias[t]
    out = cache / f"{Path(ckpt).stem}-planted-{true}-{pred}-{alpha}.safetensors"
    save_checkpoint(loaded.model.state_dict(), out,
                    metadata=audit_metadata(loaded.arch, loaded.num_classes,
                                            normalize=normalize or "none", classes=classes))
    return out


def cifar_classes() -> List[str]:
    from .cifar import CIFAR10_CLASSES
    return sorted(CIFAR10_CLASSES)


def run(args: Any, setting: Dict[str, Any], ckpt: Path, arch: Optional[str],
        normalize: Optional[str], train_dir: Path, probe_dir: Path, device: str,
        command: str, commit: str, data_text: str) -> str:
    from model_audit import AuditOptions
    from model_audit.commands.fix import fix
    from model_audit.results.fix import FixConfig

    undo: Optional[List[Dict[str, Any]]] = None
    if args.plant_confusion:
        original = ckpt
        ckpt = planted(ckpt, arch, normalize, args.plant_confusion,
                       args.cache_dir or common.default_cache_dir())
        undo = undo_frontier(original, ckpt, arch, normalize, probe_dir, device, args.target,
                             train_dir)
        print(f"undoing the planted fault (share: scores): {undo}", flush=True)
        data_text += (f"; a confusion planted in the head first ({args.plant_confusion}: "
                      "alpha x the true class's weights added to the predicted class's)")
    rows: List[Dict[str, Any]] = []
    for seed in range(args.seeds):
        opts = AuditOptions(device=device, seed=seed, arch=arch, normalize=normalize)
        extra: Dict[str, Any] = {}
        if args.validation is not None:
            extra["validation"] = args.validation
        if args.target_fraction is not None:
            extra["target_fraction"] = args.target_fraction
        if args.max_break is not None:
            extra["max_break"] = args.max_break
        if args.no_guard:
            extra["guard"] = False
        if args.head_rows is not None:
            extra["head_rows"] = args.head_rows
        layers = "auto" if args.layers == "auto" else tuple(args.layers.split(","))
        config = FixConfig(options=opts, layers=layers, steps=setting["steps"], lr=setting["lr"],
                           batchnorm=setting["batchnorm"], batch_size=args.batch,
                           preserve=setting["preserve"], target=(args.target,), controls=(),
                           evaluate_last=True, **extra)
        print(f"targeted repair, seed {seed} ...", flush=True)
        d = fix(ckpt, train_dir, probe_dir, None, config).to_dict()
        t, sel = d["target"], d["selection"]
        tool = {"probe_before": t["probe_before"], "probe_after": t["probe_after"],
                "repair_rate": t["repair_rate"], "break_rate": t["break_rate"],
                "fixed": d["fixed"], "broken": d["broken"], "net": d["net"],
                "p": sel["net_p_value"], "seconds": sel["seconds"],
                "kept": sel["kept_step"], "groups": sel["groups"],
                "last": sel["last_state"],
                "target": f"{t['true']}:{t['pred']}", "val_reason": d["validation"]["reason"]}
        print(f"  tool: {tool}", flush=True)
        other = _arachne(ckpt, opts, train_dir, probe_dir, args.target, config.validation,
                         tool["seconds"], seed)
        print(f"  arachne: {other}", flush=True)
        rows.append({"seed": seed, "tool": tool, "arachne": other})
    return markdown(rows, args, setting, ckpt, device, command, commit, data_text, undo)


#: Shares of a planted fault undone in :func:`undo_frontier` (1: the exact undo).
UNDO_SHARES = (1 / 3, 1 / 2, 2 / 3, 5 / 6, 1.0)


def undo_frontier(original: Path, planted_ckpt: Path, arch: Optional[str],
                  normalize: Optional[str], probe_dir: Path, device: str, spec: str,
                  train_dir: Path) -> List[Dict[str, Any]]:
    """What undoing a planted confusion gains and breaks: the planted head moved back by each
    of :data:`UNDO_SHARES` of the way to the original (1: the model before planting, the
    exact undo), scored on the probe against the planted model. Only the head was changed by
    the planting, so the penultimate features are computed once. A repair that knows the
    fault exactly: the frontier of repair rate against break rate that a repair of the head
    can hope for."""
    from model_audit import AuditOptions
    from model_audit.commands.fix.target import resolve_target
    from model_audit.core.evaluate import evaluate
    from model_audit.options import load_inputs, open_probe_for

    opts = AuditOptions(device=device, arch=arch, normalize=normalize)
    before_ckpt, probe, _ = load_inputs(planted_ckpt, probe_dir, opts)
    after_ckpt, _, _ = load_inputs(original, probe_dir, opts)
    train, _ = open_probe_for(before_ckpt, train_dir, opts)
    target = resolve_target([spec], train.classes,
                            evaluate(before_ckpt.model.eval(), train, device=device))
    head, _ = arachne.head_and_features(before_ckpt.model)
    orig_head, _ = arachne.head_and_features(after_ckpt.model)
    feats = arachne.features(before_ckpt.model, probe, list(range(len(probe))))
    w0, b0 = head.weight.detach().float(), head.bias.detach().float()
    w1, b1 = orig_head.weight.detach().float(), orig_head.bias.detach().float()
    before = (feats @ w0.T + b0).argmax(1)
    rows = []
    for share in UNDO_SHARES:
        after = (feats @ (w0 + share * (w1 - w0)).T + b0 + share * (b1 - b0)).argmax(1)
        rows.append({"share": share, **_scores(before, after, probe.labels, target)})
    return rows


def markdown(rows: List[Dict[str, Any]], args: Any, setting: Dict[str, Any], ckpt: Path,
             device: str, command: str, commit: str, data_text: str,
             undo: Optional[List[Dict[str, Any]]] = None) -> str:
    from model_audit.render.text import p_value as format_p
    from model_audit.results.fix import FixConfig

    title = ("a planted confusion" if args.plant_confusion else "the largest confusion")
    lines = common.section_header(f"fix: targeted repair of {title} against an "
                                  "Arachne-style search", command, commit, device)
    first = rows[0]["tool"]
    lines += [f"- checkpoint: `{Path(ckpt).name}`; {data_text}; target `--target "
              f"{args.target}` = {first['target']} (true:predicted); tool: {setting['steps']} "
              f"steps, lr {setting['lr']}, preservation {setting['preserve']}, target fraction "
              f"{args.target_fraction or 'default'}, "
              f"{'no positive set' if args.no_guard else 'positive set (guard)'}, head rows "
              f"{args.head_rows or FixConfig.head_rows}, break "
              f"budget {args.max_break if args.max_break is not None else 'none'}, "
              + ("the flagged groups of a scan of the confusion's instances"
                 if args.layers == "auto" else f"layers {args.layers}")
              + "; Arachne-style: the last layer's Pareto-front weights "
              "(gradient x forward impact, at most 20), differential evolution within the "
              "tool's wall time; both on the same part of the repair half (the tool's "
              "validation share held out)", "",
              "| seed | method | groups / weights | kept | confusion on the probe | repair rate "
              "| break rate | fixed | broken | net | p(net) | seconds |",
              "|---:|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        t, a = r["tool"], r["arachne"]
        lines.append(f"| {r['seed']} | tool | {', '.join(t['groups'])} | "
                     f"{'original' if t['kept'] == 0 else 'step ' + str(t['kept'])} | "
                     f"{t['probe_before']} -> {t['probe_after']} | {t['repair_rate']:.2f} | "
                     f"{100 * t['break_rate']:.2f}% | {t['fixed']} | {t['broken']} | "
                     f"{t['net']:+d} | {format_p(t['p'])} | {t['seconds']:.0f} |")
        lines.append(f"| {r['seed']} | Arachne-style | {a['weights']} weights, "
                     f"{a['generations']} generations | - | {a['probe_before']} -> "
                     f"{a['probe_after']} | {a['repair_rate']:.2f} | "
                     f"{100 * a['break_rate']:.2f}% | {a['fixed']} | {a['broken']} | "
                     f"{a['net']:+d} | {format_p(a['p'])} | {a['seconds']:.0f} |")
    lines += ["", "| method | mean repair rate | mean break rate | mean net | net >= 0 |",
              "|---|---:|---:|---:|---:|"]
    for name in ("tool", "arachne"):
        vals = [r[name] for r in rows]
        lines.append(f"| {'tool' if name == 'tool' else 'Arachne-style'} | "
                     f"{statistics.mean(v['repair_rate'] for v in vals):.2f} | "
                     f"{100 * statistics.mean(v['break_rate'] for v in vals):.2f}% | "
                     f"{statistics.mean(v['net'] for v in vals):+.1f} | "
                     f"{sum(v['net'] >= 0 for v in vals)}/{len(vals)} |")
    for u in undo or ():
        what = ("exact undo (the model before planting)" if u["share"] == 1.0 else
                f"{u['share']:.2f} of the planted fault undone")
        lines.append(f"| {what} | {u['repair_rate']:.2f} | {100 * u['break_rate']:.2f}% | "
                     f"{u['net']:+d} | - |")
    lasts = [r["tool"]["last"] for r in rows if r["tool"].get("last")]
    if lasts:
        lines += ["", "- the tool's last trained state (before validation chose): net "
                  + ", ".join(f"{x['net']:+d}" for x in lasts)]
    lines += ["- the tool's validation: " + "; ".join(r["tool"]["val_reason"] for r in rows),
              ""]
    return "\n".join(lines)
