"""HTML reports: one self-contained file (inline CSS, charts as inline SVG, thumbnails as
``data:`` PNG URIs re-encoded by the tool), rendered by jinja2 with autoescaping on.

Every string that comes from the user's files (class names, paths) is escaped by the
template engine; nothing in the page runs script, and a Content-Security-Policy forbids it.
"""
from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import jinja2
import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from ..errors import AuditError, ConfigError
from ..io.files import atomic_write_bytes
from ..io.probe import ProbeSet, open_probe
from .text import num, probe_unit
from .text import sanity_verdict as verdict

MAX_THUMBNAILS = 32


def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("model_audit.render", "templates"),
        autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.globals["probe_unit"] = probe_unit
    return env


def _figure(width: float, height: float) -> Tuple[Figure, Any]:
    """A figure and its axes, without pyplot: no global backend or figure state is touched
    (a notebook's backend stays as it was)."""
    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def _svg(fig: Figure) -> str:
    buf = io.StringIO()
    # Text as text (small and crisp); a fixed hash salt and no date: the same data gives
    # byte-identical SVG, so re-rendering a report reproduces it.
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "model-audit"}):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg"):]


def layer_chart(layers: List[Dict[str, Any]]) -> str:
    """Grouped bars per layer group: the own score (with its bootstrap interval; red when
    flagged), each baseline's share beside it, and the parameter share."""

    names = [layer["name"] for layer in layers]
    baselines = list(layers[0].get("baselines", {})) if layers else []
    scores = np.array([layer["score"] for layer in layers])
    low = np.array([layer["score_interval"][0] for layer in layers])
    high = np.array([layer["score_interval"][1] for layer in layers])
    series = len(baselines) + 2
    width = 0.8 / series
    x = np.arange(len(names))
    fig, ax = _figure(max(6.5, (0.35 + 0.12 * series) * len(names) + 2), 3.6)
    colors = ["#c0392b" if layer["flagged"] else "#2e86c1" for layer in layers]
    offset = lambda i: x - 0.4 + width * (i + 0.5)  # noqa: E731
    ax.bar(offset(0), scores, width, color=colors, label="score (red: flagged)",
           yerr=[np.clip(scores - low, 0, None), np.clip(high - scores, 0, None)], capsize=2)
    palette = ["#f5b041", "#58d68d", "#af7ac5", "#5dade2", "#ec7063", "#48c9b0", "#dc7633"]
    for j, name in enumerate(baselines):
        vals = [layer["baselines"].get(name) for layer in layers]
        ax.bar(offset(j + 1), [np.nan if v is None else v for v in vals], width,
               color=palette[j % len(palette)], label=f"{name} (share)")
    ax.bar(offset(series - 1), [layer["share"] for layer in layers], width, color="#aab7b8",
           label="parameter share")
    ax.axhline(1.0 / max(len(names), 1), color="#555", lw=0.8, ls="--", label="1 / groups")
    ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("share of the total over groups")
    ax.set_xlabel("layer group")
    ax.legend(fontsize=7, frameon=False, ncol=2)
    ax.spines[["top", "right"]].set_visible(False)
    return _svg(fig)


def damping_chart(steps: List[Dict[str, Any]]) -> Optional[str]:
    """Learning rate and momentum per replay step, points coloured by damping regime."""
    if not steps:
        return None

    colors = {"underdamped": "#e67e22", "critical": "#27ae60", "overdamped": "#2e86c1"}
    t = [s["step"] for s in steps]
    fig, ax = _figure(6, 2.8)
    ax.plot(t, [s["momentum"] for s in steps], color="#333", lw=1)
    for s in steps:
        ax.scatter(s["step"], s["momentum"], color=colors[s["regime"]], zorder=3)
    ax.set_xlabel("replay step")
    ax.set_ylabel("momentum")
    ax2 = ax.twinx()
    ax2.plot(t, [s["lr"] for s in steps], color="#888", ls="--", lw=1)
    ax2.set_ylabel("learning rate (dashed)")
    for name, c in colors.items():
        ax.scatter([], [], color=c, label=name)
    ax.legend(fontsize=7, frameon=False, loc="lower right")
    return _svg(fig)


def thumbnail(probe: ProbeSet, position: int, size: int = 64) -> str:
    """A probe image re-encoded by the tool as a PNG ``data:`` URI (never the original bytes)."""

    x = probe.load([position], normalized=False)[0]
    if getattr(probe, "rescale_for_display", False):  # normalised by the dataset's transform
        x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)
    x = x.clamp(0, 1)
    arr = (x.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    scale = max(1, size // max(img.size))
    img = img.resize((img.size[0] * scale, img.size[1] * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


#: Values of a non-image input shown in a report gallery, in place of a thumbnail.
MAX_SHOWN_VALUES = 16


def input_values(x: torch.Tensor, shown: int = MAX_SHOWN_VALUES) -> str:
    """The first ``shown`` values of a non-image input (a tabular row, token ids), flattened;
    a longer input ends with its number of values.

    >>> input_values(torch.tensor([0.5, 1 / 3, 12.0])), input_values(torch.arange(20), 4)
    ('0.5 0.333 12', '0 1 2 3 … (20 values)')
    """
    flat = x.reshape(-1)
    spec = ".3g" if x.is_floating_point() else "d"
    text = " ".join(num(v, spec) for v in flat[:shown].tolist())
    return text + (f" … ({flat.numel()} values)" if flat.numel() > shown else "")


def preview(probe: ProbeSet, position: int) -> Dict[str, str]:
    """What a gallery shows of a probe item: ``src``, a thumbnail, for an image; for any other
    input ``values`` (its first values) and ``shape`` (e.g. ``shape 12, int64``), as text."""
    if probe.is_image:
        return {"src": thumbnail(probe, position), "values": "", "shape": ""}
    x = probe.load([position], normalized=False)[0]
    shape = "x".join(map(str, x.shape)) or "scalar"
    return {"src": "", "values": input_values(x),
            "shape": f"shape {shape}, {str(x.dtype).replace('torch.', '')}"}


#: What a gallery shows when the probe cannot be read again (captions only).
NO_PREVIEW = {"src": "", "values": "", "shape": ""}


def _scan_context(data: Dict[str, Any], probe: Optional[ProbeSet]) -> Dict[str, Any]:
    classes = data["probe"]["classes"]

    def name(i: int) -> str:
        return classes[i] if 0 <= i < len(classes) else str(i)

    gallery = []
    if probe is not None:
        for item in data["misclassified"][:MAX_THUMBNAILS]:
            gallery.append({**item, **preview(probe, item["index"]),
                            "label_name": name(item["label"]),
                            "prediction_name": name(item["prediction"])})
    return {"audit": data, "layer_svg": layer_chart(data["layers"]),
            "damping_svg": damping_chart(data["damping"]), "gallery": gallery}


def render_scan_report(data: Dict[str, Any], probe: Optional[ProbeSet] = None) -> str:
    """The HTML report of a scan (``audit.json`` content, plus the probe for thumbnails)."""
    return _env().get_template("scan.html").render(**_scan_context(data, probe))


def render_gate_report(gate: Dict[str, Any], audit: Optional[Dict[str, Any]] = None,
                       probe: Optional[ProbeSet] = None) -> str:
    """The HTML report of a gate run: the verdict, every check, then the scan (if any)."""
    context = _scan_context(audit, probe) if audit else {"audit": None}
    return _env().get_template("gate.html").render(gate=gate, **context)


def compare_chart(scores: List[Dict[str, Any]]) -> str:
    """Grouped bars: the two scans' scores per shared group."""

    names = [s["name"] for s in scores]
    x = np.arange(len(names))
    fig, ax = _figure(max(6.0, 0.55 * len(names) + 2), 3.2)
    ax.bar(x - 0.2, [s["score_a"] for s in scores], 0.4, color="#2e86c1", label="A")
    ax.bar(x + 0.2, [s["score_b"] for s in scores], 0.4, color="#e67e22", label="B")
    ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("score (share of error loss removed)")
    ax.set_xlabel("layer group")
    ax.legend(fontsize=7, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return _svg(fig)


def render_compare_report(data: Dict[str, Any]) -> str:
    """The HTML report of a comparison (``compare.json`` content)."""
    def iv(key: str) -> str:
        interval = data["intervals"].get(key)
        return f" (95% interval {interval[0]:.2f} to {interval[1]:.2f})" if interval else ""

    return _env().get_template("compare.html").render(
        cmp=data, chart=compare_chart(data["scores"]), fmt=num, iv=iv)


def reopen_probe(audit: Dict[str, Any]) -> Optional[ProbeSet]:
    """The scan's probe set opened again (same subset), for thumbnails; None when it is gone."""
    options = audit.get("options", {})
    try:
        return open_probe(audit["probe"]["source"], channels=audit["model"].get("in_channels", 3),
                          normalize="none", resize=options.get("resize"),
                          limit=options.get("limit"), seed=options.get("seed", 0))
    except (AuditError, OSError, KeyError):
        return None


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict) or "schema_version" not in data:
        raise ConfigError(f"{path} was not written by model-audit (no schema_version)")
    return data


def render_directory(directory: Union[str, os.PathLike]) -> Path:
    """Re-render ``report.html`` from the JSON files a command wrote into ``directory``.

    ``gate.json`` (with ``audit.json``) gives the gate report, else ``compare.json`` the
    comparison, else ``audit.json`` the scan report. Thumbnails are re-made from the probe
    set when it is still where the scan found it.

    Raises:
        ConfigError: no such directory or none of those files in it.
    """

    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"{directory} is not a directory of model-audit results")
    gate, compare, audit = (directory / n for n in ("gate.json", "compare.json", "audit.json"))
    fix_json = directory / "fix.json"
    sanity_json = directory / "sanity.json"
    if sanity_json.is_file():
        html = render_sanity_report(_read_json(sanity_json))
    elif fix_json.is_file():
        fix_data = _read_json(fix_json)
        html = render_fix_report(fix_data, reopen_probe({
            "probe": fix_data["probe"], "model": fix_data["model"],
            "options": fix_data["config"]["options"]}))
    elif gate.is_file():
        audit_data = _read_json(audit) if audit.is_file() else None
        html = render_gate_report(_read_json(gate), audit_data,
                                  reopen_probe(audit_data) if audit_data else None)
    elif compare.is_file():
        html = render_compare_report(_read_json(compare))
    elif audit.is_file():
        audit_data = _read_json(audit)
        html = render_scan_report(audit_data, reopen_probe(audit_data))
    else:
        raise ConfigError(f"{directory} holds no sanity.json, fix.json, gate.json, compare.json "
                          "or audit.json; give the --out directory of a scan, compare, fix, "
                          "gate or sanity run")
    target = directory / "report.html"
    atomic_write_bytes(target, html.encode("utf-8"))
    return target


def controls_chart(data: Dict[str, Any]) -> str:
    """Fixed, broken and net per run: the flagged selection and each control."""

    runs = [data["selection"]] + data["controls"]
    labels = [f"{r['name']}\n{r['params_percent']:.1f}% params" for r in runs]
    x = np.arange(len(runs))
    fig, ax = _figure(max(5.0, 1.4 * len(runs) + 2), 3.0)
    ax.bar(x - 0.27, [r["fixed"] for r in runs], 0.27, color="#27ae60", label="fixed")
    ax.bar(x, [r["broken"] for r in runs], 0.27, color="#c0392b", label="broken")
    ax.bar(x + 0.27, [r["net"] for r in runs], 0.27, color="#2e86c1", label="net")
    ax.axhline(0, color="#333", lw=0.8)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel(f"probe {probe_unit(data.get('probe', {}))}")
    ax.set_xlabel("retrained selection")
    ax.legend(fontsize=7, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return _svg(fig)


def validation_chart(data: Dict[str, Any]) -> Optional[str]:
    """Validation images right at each scored state of the flagged repair, the kept one
    marked."""
    v = (data.get("selection") or {}).get("validation")
    if not v:
        return None
    steps = [c["step"] for c in v["candidates"]]
    right = [c["correct"] for c in v["candidates"]]
    fig, ax = _figure(5.0, 2.4)
    ax.plot(steps, right, marker="o", color="#2e86c1", lw=1.2, ms=4)
    ax.axhline(right[0], color="#888", lw=0.8, ls="--", label="original")
    kept = next(c for c in v["candidates"] if c["step"] == v["chosen_step"])
    ax.plot([kept["step"]], [kept["correct"]], marker="s", color="#27ae60", ms=8, ls="none",
            label="kept")
    ax.set_xlabel("repair step")
    ax.set_ylabel(f"validation {probe_unit(data.get('probe', {}))} right")
    ax.legend(fontsize=7, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return _svg(fig)


def render_fix_report(data: Dict[str, Any], probe: Optional[ProbeSet] = None) -> str:
    """The HTML report of a repair: the outcome, the targeted confusion, summary, validation
    evidence, controls, galleries, per-class accuracy."""
    classes = data["probe"]["classes"]
    shown: Dict[int, Dict[str, str]] = {}
    for key in ("fixed", "broken", "still_wrong", "target_fixed", "target_still_wrong"):
        for item in data["images"].get(key, [])[:MAX_THUMBNAILS]:
            if item["index"] not in shown:
                # no probe to make thumbnails from: galleries show captions only
                shown[item["index"]] = (NO_PREVIEW if probe is None
                                        else preview(probe, item["index"]))

    def cname(i: int) -> str:
        return classes[i] if 0 <= i < len(classes) else str(i)

    return _env().get_template("fix.html").render(
        fix=data, shown=shown, cname=cname, max_thumbs=MAX_THUMBNAILS,
        controls_svg=controls_chart(data), validation_svg=validation_chart(data) or "")


def sanity_matrix(data: Dict[str, Any], method: str) -> Dict[str, Any]:
    """Planted group -> how often each group was ranked first by ``method`` (reached cases)."""
    groups = list(data["groups"])
    counts = {g: {h: 0 for h in groups} for g in data["planted_groups"]}
    totals = {g: 0 for g in data["planted_groups"]}
    for case in data["cases"]:
        if case["reached"] and method in case["top_group"]:
            counts[case["group"]][case["top_group"][method]] += 1
            totals[case["group"]] += 1
    return {"groups": groups, "rows": [(g, [counts[g][h] for h in groups], totals[g])
                                       for g in data["planted_groups"]]}


def render_sanity_report(data: Dict[str, Any]) -> str:
    """The HTML report of ``model-audit sanity``: hit rates against chance, a planted ->
    top-ranked matrix per method, and every case."""
    matrices = {m: sanity_matrix(data, m) for m in data["methods_order"]}
    return _env().get_template("sanity.html").render(data=data, matrices=matrices,
                                                     verdict=verdict(data))
