"""Compact HTML views of a result for a notebook cell: the report's summary table (and, for a
scan, its chart as inline SVG). Self-contained, no script; every text from a file is escaped.

Like the rest of :mod:`model_audit.render`, each view takes the JSON form of a result (its
``to_dict()``); :mod:`model_audit.outputs` registers them as the results' ``_repr_html_``.
"""
from __future__ import annotations

import html
from typing import Any, Iterable, Mapping, Optional, Sequence

from .html import layer_chart
from .text import num, probe_unit

Data = Mapping[str, Any]

_STYLE = ("<style>.ma-view table{border-collapse:collapse;font-size:12px}"
          ".ma-view td,.ma-view th{padding:2px 8px;text-align:right;border-bottom:1px solid #ddd}"
          ".ma-view td:first-child,.ma-view th:first-child{text-align:left}"
          ".ma-view tr.flagged td{background:#fdecea;font-weight:bold}</style>")


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]],
           marked: Optional[Sequence[bool]] = None) -> str:
    rows = list(rows)
    marks = list(marked) if marked is not None else [False] * len(rows)
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    flagged = ' class="flagged"'
    body = "".join(
        f"<tr{flagged if m else ''}>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>"
        for row, m in zip(rows, marks))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _view(title: str, lines: Sequence[str], *parts: str) -> str:
    text = "".join(f"<p>{_e(line)}</p>" for line in lines if line)
    return f'<div class="ma-view">{_STYLE}<h4>{_e(title)}</h4>{text}{"".join(parts)}</div>'


def scan_view(data: Data) -> str:
    """The scan: model, probe, accuracy; the groups' table; the chart; the ranking's line."""
    model, probe, layers = data["model"], data["probe"], data["layers"]
    lines = [f"{model['arch']}: {model['parameters']:,} parameters; probe {probe['n']} "
             f"{probe_unit(probe)}, accuracy {100 * probe['accuracy']:.2f}% "
             f"({len(data['misclassified'])} misclassified)",
             f"flagged: {', '.join(data['flagged']) or 'none'}",
             (data.get("ranking") or {}).get("trust", "")]
    table = _table(("group", "params %", "score", "95% interval", "flag freq", "flagged"),
                   [(layer["name"], f"{100 * layer['share']:.2f}", f"{layer['score']:.3f}",
                     f"{layer['score_interval'][0]:.3f}-{layer['score_interval'][1]:.3f}",
                     f"{layer['flag_frequency']:.2f}", "yes" if layer["flagged"] else "")
                    for layer in layers], [layer["flagged"] for layer in layers])
    return _view("model-audit scan", lines, table, layer_chart(list(layers)) if layers else "")


def compare_view(data: Data) -> str:
    """Two scans side by side: the flagged sets, their overlap against chance, the scores."""
    flagged, chance = data["flagged"], data["chance"]
    lines = [f"A: {data['a']['source']}: flagged {', '.join(flagged['a']) or 'none'}",
             f"B: {data['b']['source']}: flagged {', '.join(flagged['b']) or 'none'}",
             f"Jaccard {num(data['jaccard'])}; P(overlap >= {chance['observed_overlap']} by "
             f"chance) = {chance['p_value']:.3g}",
             (data.get("regression") or {}).get("summary", "")]
    table = _table(("group", "params", "score A", "score B", "flag A", "flag B"),
                   [(s["name"], f"{s['params']:,}", f"{s['score_a']:.3f}", f"{s['score_b']:.3f}",
                     "yes" if s["flagged_a"] else "", "yes" if s["flagged_b"] else "")
                    for s in data["scores"]])
    return _view("model-audit compare", lines, table)


def fix_view(data: Data) -> str:
    """The repair: whether one was found (and written), and each run's effect on the probe."""
    sel, out = data["selection"], data["output"]
    lines = [data["validation"]["reason"],
             "a repaired checkpoint was written to " + str(out["path"]) if out.get("written")
             else "no checkpoint was written"]
    runs = [sel, *data.get("controls", [])]
    table = _table(("run", "groups", "params %", "kept step", "fixed", "broken", "net",
                    "p(net)"),
                   [(r["name"], ", ".join(r["groups"]), f"{r['params_percent']:.1f}",
                     r.get("kept_step"), r["fixed"], r["broken"], f"{r['net']:+d}",
                     f"{r['net_p_value']:.3g}") for r in runs])
    return _view("model-audit fix", lines, table)


def sanity_view(data: Data) -> str:
    """Planted faults: each method's top-1 and MRR beside chance."""
    chance = data["chance"]
    rows = [(m, num(s.get("top1"), ".2f", "-"), num(s.get("mrr"), ".2f", "-"), s.get("n"))
            for m, s in data["methods"].items()]
    rows.append(("chance", f"{chance['top1']:.2f}", f"{chance['mrr']:.2f}", ""))
    lines = [f"{len(data['cases'])} planted faults in {len(data['planted_groups'])} groups"]
    return _view("model-audit sanity", lines, _table(("method", "top-1", "MRR", "faults"), rows))


def gate_view(data: Data) -> str:
    """The gate's verdict and every check."""
    icon = {True: "pass", False: "FAIL", None: "not run"}
    rows = [(c["name"], icon[c["passed"]], c["value"], c["limit"], c["message"])
            for c in data["checks"]]
    return _view(f"model-audit gate: {data['verdict']} (exit {data['exit_code']})",
                 [data.get("error") or ""],
                 _table(("check", "result", "value", "limit", "message"), rows))
