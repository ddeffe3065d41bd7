"""Terminal text of the commands: tables (tabulate) and one way of writing a missing number.

Every function takes the JSON form of a command's result (its ``to_dict()``: what
``audit.json``, ``compare.json``, ``gate.json``, ``sanity.json`` and ``fix.json`` hold) and
returns the text the CLI prints, so the same text can be made again from the files alone;
nothing here prints or exits.
"""
from __future__ import annotations

from typing import Any, List, Mapping, Optional, Sequence

from tabulate import tabulate

from ..core.attribution import METRIC_NAME, SCORE_KEY
from ..core.scoring import COMBINED, RANDOM, MethodEvidence
from ..core.stats import p_value

Data = Mapping[str, Any]


def probe_unit(probe: Mapping[str, Any]) -> str:
    """What a probe section of a result file held, for text: ``images``, or ``inputs`` for
    a tensor probe of non-image data.

    >>> probe_unit({"kind": "inputs"}), probe_unit({"kind": "imagefolder"}), probe_unit({})
    ('inputs', 'images', 'images')
    """
    return "inputs" if probe.get("kind") == "inputs" else "images"


def num(value: Optional[float], spec: str = ".3f", missing: str = "n/a") -> str:
    """A number for a table, or ``missing`` when there is none (undefined correlation...).

    >>> num(0.12345), num(None), num(None, missing="-"), num(2.0, ".1f")
    ('0.123', 'n/a', '-', '2.0')
    """
    return missing if value is None else format(value, spec)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A column-aligned table: the first column left-aligned, the others right-aligned.

    >>> print(text_table(["group", "score"], [["layer1", "0.500"], ["fc", "0.125"]]))
    group      score
    -------  -------
    layer1     0.500
    fc         0.125
    """
    align = ("left",) + ("right",) * (len(headers) - 1)
    return tabulate([list(r) for r in rows], headers=list(headers), tablefmt="simple",
                    disable_numparse=True, colalign=align)


def scan_table(data: Data) -> str:
    """Per group: parameter share, score with its interval, flag frequency, flagged."""
    rows = [(layer["name"], f"{100 * layer['share']:.2f}", f"{layer['score']:.3f}",
             f"{layer['score_interval'][0]:.3f}-{layer['score_interval'][1]:.3f}",
             f"{layer['flag_frequency']:.2f}", "FLAGGED" if layer["flagged"] else "")
            for layer in data["layers"]]
    return text_table(("group", "params %", "score", "95% interval", "flag freq", "flagged"),
                      rows)


def baselines_table(data: Data) -> str:
    """Per-group baseline shares, then each baseline's agreement with the own metric and cost."""
    agree = data["agreement"]
    names = list(agree)
    rows = [(layer["name"], f"{layer['score']:.3f}",
             *(num(layer["baselines"].get(n)) for n in names)) for layer in data["layers"]]
    cost = data["cost"]
    rows += [("", "", *("" for _ in names)), ("agreement", "", *("" for _ in names)),
             ("spearman", "", *(num(agree[n]["spearman"], ".2f") for n in names)),
             ("kendall", "", *(num(agree[n]["kendall"], ".2f") for n in names)),
             ("top-k overlap", "", *(num(agree[n]["topk_overlap"], ".2f") for n in names)),
             ("seconds", num(cost[_own(data)]["seconds"], ".2f"),
              *(num(cost[n]["seconds"], ".2f") for n in names))]
    ranked = (data.get("ranking") or {}).get("method") or (data.get("metric") or {}).get("name")
    return (f"baselines (shares of each method; score = the scan's, ranked by {ranked}):\n"
            + text_table(("group", "score", *names), rows))


def _own(data: Data) -> str:
    """The own metric's key in a scan's ``cost`` (files before 2026-12-07: replay_reduction)."""
    name = (data.get("metric") or {}).get("name", METRIC_NAME)
    return name if name in data["cost"] else METRIC_NAME


def scan_summary(data: Data) -> str:
    """The line before the table: model, probe size, accuracy and errors."""
    model, probe = data["model"], data["probe"]
    return (f"{model['arch']}: {model['parameters']:,} parameters; probe "
            f"{probe['n']} {probe_unit(probe)}, accuracy {100 * probe['accuracy']:.2f}% "
            f"({len(data['misclassified'])} misclassified)")


def compare_text(data: Data) -> str:
    """The comparison: scores side by side, overlap against chance, rank correlations."""
    def interval(key: str) -> str:
        iv = data["intervals"].get(key)
        return f" [{iv[0]:.2f}, {iv[1]:.2f}]" if iv else ""

    rows = [(s["name"], f"{s['params']:,}", f"{s['score_a']:.3f}", f"{s['score_b']:.3f}",
             "yes" if s["flagged_a"] else "", "yes" if s["flagged_b"] else "")
            for s in data["scores"]]
    ch, flagged = data["chance"], data["flagged"]
    key = SCORE_KEY if SCORE_KEY in data["correlation"] else METRIC_NAME  # older files
    corr = data["correlation"][key]
    lines = [
        text_table(("group", "params", "score A", "score B", "flag A", "flag B"), rows),
        f"A: {data['a']['source']}  flagged: {', '.join(flagged['a']) or 'none'}",
        f"B: {data['b']['source']}  flagged: {', '.join(flagged['b']) or 'none'}",
        f"overlap: {ch['observed_overlap']} of {ch['groups']} groups; "
        f"Jaccard {num(data['jaccard'])}{interval('jaccard')}; overlap coefficient "
        f"{num(data['overlap_coefficient'])}{interval('overlap_coefficient')}",
        f"chance: expected overlap {ch['expected_overlap']:.2f}; "
        f"P(overlap >= {ch['observed_overlap']} by chance) = {ch['p_value']:.3g}",
        f"rank correlation of scores: Spearman {num(corr['spearman'])}{interval('spearman')}, "
        f"Kendall {num(corr['kendall'])}{interval('kendall')}",
        "top-k overlap: " + ", ".join(f"k={k}: {v:.2f}"
                                      for k, v in data["top_k_overlap"].items()),
    ]
    lines += [f"baseline {name}: Spearman {num(c['spearman'])}, Kendall {num(c['kendall'])}"
              for name, c in data["correlation"].items() if name != key]
    left = data["left_out"]
    if left["a_only"] or left["b_only"]:
        lines.append(f"left out: only in A {', '.join(left['a_only']) or '-'}; "
                     f"only in B {', '.join(left['b_only']) or '-'}")
    lines += _regression_lines(data["regression"])
    return "\n".join(lines)


def _regression_lines(reg: Optional[Data]) -> List[str]:
    """The regression bisection of B against A: per group, what A's tensors recover."""
    if not reg or "summary" not in reg:
        note = (reg or {}).get("note")
        return [f"regression bisection: {note}"] if note else []
    lines = [f"regression (exact; A = baseline, B = candidate): {reg['summary']}"]
    if reg["regressed"]:
        rows = [(" + ".join(s["groups"]), str(s["recovered"]),
                 f"{100 * s['recovered'] / reg['regressed']:.0f}%", str(s["lost_fixes"]))
                for s in list(reg["groups"]) + list(reg.get("pairs", []))[:3]]
        lines.append(text_table(("A's tensors put back", "recovered", "share",
                                 "fixes lost"), rows))
    return lines


def sanity_text(data: Data, verdict: str) -> str:
    """The terminal table of ``sanity.json``: per case the planted group's rank under each
    method, then per method top-1 and MRR beside chance."""
    methods = list(data["methods_order"])
    rows = []
    for c in data["cases"]:
        drop = f"{100 * c['drop']:.1f}" + ("" if c["reached"] else " NOT REACHED")
        rows.append([c["group"], c["defect"], c["seed"], f"{c['severity']:.3g}", drop,
                     *[(f"{c['ranks'][m]:.1f}" if c["reached"] else "-") for m in methods]])
    cases = tabulate(rows, headers=["group", "defect", "seed", "severity", "drop (pts)",
                                    *[f"rank: {m}" for m in methods]],
                     tablefmt="simple", disable_numparse=True)
    summary = [[m, num(data["methods"][m]["top1"], ".2f", "-"),
                num(data["methods"][m]["mrr"], ".2f", "-"), data["methods"][m]["n"]]
               for m in methods]
    summary.append(["chance", num(data["chance"]["top1"], ".2f", "-"),
                    num(data["chance"]["mrr"], ".2f", "-"), ""])
    table = tabulate(summary, headers=["method", "top-1", "MRR", "cases"], tablefmt="simple",
                     disable_numparse=True)
    lines = [cases, "", table]
    if verdict:
        lines.append(verdict)
    if data["not_reached"]:
        lines.append("not reached (no severity cost the drop within the tolerance; not scored): "
                     + ", ".join(f"{c['group']}/{c['defect']} (closest {100 * c['drop']:.1f} pts)"
                                 for c in data["not_reached"]))
    null = data.get("null")
    if null:
        lines.append(f"null (nothing planted): flagged {', '.join(null['flagged']) or 'nothing'}")
    return "\n".join(lines)


def sanity_verdict(data: Data) -> str:
    """One sentence: which method localised the planted faults best on this model, and whether
    ``scan --method auto`` would leave the default ranking for it (the same test:
    :meth:`~model_audit.core.scoring.MethodEvidence.choice`)."""
    methods = [m for m in data["methods_order"]
               if m != RANDOM and data["methods"][m]["mrr"] is not None]
    if not methods:
        return ""
    choice = MethodEvidence.from_dict(data, "sanity").choice(methods)
    ref = choice.reference
    what = "default ranking" if ref == COMBINED else "own metric"
    mrr = {m: num(data["methods"][m]["mrr"], ".2f", "-") for m in methods}
    if choice.rival is None:
        return f"on this model only the scan's {what} ({ref}) was measured"
    if choice.p_value is None:
        return (f"on this model {choice.rival} reached MRR {mrr[choice.rival]}, the scan's "
                f"{what} ({ref}) {mrr[ref]}; not tested (no per-fault ranks)")
    if choice.method != ref:
        return (f"on this model {choice.method} localised the planted faults better than the "
                f"scan's {what} ({ref}): MRR {mrr[choice.method]} against {mrr[ref]} (p "
                f"{p_value(choice.p_value)}); `scan --method auto` ranks with it")
    if (choice.gain or 0.0) > 0:
        return (f"on this model {choice.rival} localised the planted faults a little better than "
                f"the scan's {what} ({ref}): MRR {mrr[choice.rival]} against {mrr[ref]}, within "
                f"chance (p {p_value(choice.p_value)}); `scan --method auto` keeps {ref}")
    return (f"on this model the scan's {what} ({ref}) localised the planted faults best "
            "of the methods checked")


def fix_text(data: Data) -> str:
    """The repair: the selection and every control (fixed, broken, net, its p-value, cost),
    then the verdict. ``data`` is ``FixResult.to_dict()``."""
    sel = data["selection"]
    lines = [
        f"retrained {', '.join(sel['groups'])}{_head_rows(sel)}: "
        f"{sel['trainable_params']:,} parameters "
        f"({sel['params_percent']:.1f}% of {sel['total_params']:,}), {sel['steps']} steps, "
        f"{data['config']['schedule']} momentum",
        f"probe accuracy {100 * data['accuracy']['before']:.2f}% -> "
        f"{100 * data['accuracy']['after']:.2f}%: fixed {data['fixed']}, broken "
        f"{data['broken']}, net {data['net']:+d}",
    ]
    lines += _target_lines(data)
    rows = []
    for run in [sel] + data["controls"]:
        unit = "modules" if run.get("disjoint_from_selection") else "groups"
        kept = run.get("kept_step")
        rows.append((run["name"], ",".join(run["groups"]) if len(run["groups"]) <= 4 else
                     f"{len(run['groups'])} {unit}", f"{run['params_percent']:.1f}",
                     "original" if kept == 0 else ("-" if kept is None else f"step {kept}"),
                     str(run["fixed"]), str(run["broken"]), f"{run['net']:+d}",
                     p_value(run["net_p_value"]), f"{run['compute_param_steps']:.3g}",
                     f"{run['seconds']:.1f}"))
    lines.append(tabulate(rows, headers=["selection", "groups", "params %", "kept", "fixed",
                                         "broken", "net", "p(net)", "param-steps", "seconds"],
                          tablefmt="simple", disable_numparse=True,
                          colalign=("left", "left") + ("right",) * 8))
    lines += _fix_verdict_lines(data)
    lines += _fix_outcome_lines(data)
    return "\n".join(lines)


def _head_rows(run: Data) -> str:
    """`` (the head's rows of dog only)`` when a targeted repair held the head's other rows."""
    rows = run.get("head_rows")
    return f" (the head's row{'s' if len(rows) > 1 else ''} of {', '.join(rows)} only)" \
        if rows else ""


def _target_lines(data: Data) -> List[str]:
    t = data.get("target")
    if not t:
        return []
    names = t["true"] if isinstance(t["true"], str) else ", ".join(
        f"{a}:{b}" for a, b in zip(t["true"], t["pred"]))
    what = f"{t['true']} predicted as {t['pred']}" if isinstance(t["true"], str) else names
    return [f"target: {what}{' (picked: the largest confusion)' if t['auto'] else ''}: "
            f"{t['probe_before']} -> {t['probe_after']} on the probe; repair rate "
            f"{num(t['repair_rate'], '.2f')}, break rate {num(t['break_rate'], '.4f')}, net "
            f"{t['net']:+d}"]


def _fix_outcome_lines(data: Data) -> List[str]:
    """Validation's verdict, and whether the checkpoint was written."""
    val, out = data.get("validation") or {}, data["output"]
    if not val:
        return []
    head = (f"validation ({val['n']} {probe_unit(data.get('probe', {}))} held out of the "
            f"repair data): ")
    if val["repair_found"]:
        done = (f"wrote {out['path']}" if out["written"] else "no --output given: nothing "
                "written")
        return [head + val["reason"], f"repair found: {done}"]
    lines = [head + val["reason"]]
    if out["written"]:
        lines.append(f"no repair found; --write-anyway: wrote the best trained state to "
                     f"{out['path']} (it did not beat the original on validation)")
    else:
        lines.append("no repair found: the original is the best model; no checkpoint was "
                     "written")
    return lines


def _fix_verdict_lines(data: Data) -> List[str]:
    sel, verdict = data["selection"], data["verdict"]
    lines = [f"p(net): exact McNemar test of fixed vs broken; the net is "
             f"{'' if verdict.get('net_significant') else 'NOT '}distinguishable from churn "
             f"(p {p_value(sel['net_p_value'])}, level {verdict['significance_level']:g})"]
    if not data["controls"]:
        return lines
    lines.append("the flagged selection beat: " + (", ".join(verdict["beat"]) or "none") +
                 ("; did not beat: " + ", ".join(verdict["did_not_beat"])
                  if verdict["did_not_beat"] else "") +
                 ("; diverged: " + ", ".join(verdict["diverged"])
                  if verdict["diverged"] else ""))
    paired = [f"{c['name']} p {p_value(c['vs_flagged']['p_value'])}" for c in data["controls"]
              if c.get("vs_flagged")]
    if paired:
        lines.append("paired McNemar test against each control on the same probe "
                     f"{probe_unit(data.get('probe', {}))}: " +
                     ", ".join(paired) + "; significantly better than: " +
                     (", ".join(verdict["beat_significantly"]) or "none") +
                     "; significantly worse than: " +
                     (", ".join(verdict["worse_significantly"]) or "none"))
    return lines
