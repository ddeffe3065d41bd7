"""What the command line does with a command's result: the files it writes, the text it prints,
and the progress bars it shows while a long command runs.

A command (:mod:`model_audit.commands`) returns a result and writes nothing but its product (a
repaired checkpoint); this layer, above the commands and :mod:`model_audit.render`, turns the
result into files (atomically: all of a command's files or none) and terminal text. A notebook
user calls the same functions, e.g. ``write_scan(scan(...), "out/")``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from torch import nn
from tqdm import tqdm

from . import distributed
from .commands.sanity import sanity
from .core.calibrate import PlantResult
from .errors import OutputError
from .io.files import atomic_write_files, json_bytes, refuse_inputs
from .models.checkpoint import audit_metadata, save_checkpoint
from .options import load_inputs
from .render.html import (render_compare_report, render_fix_report, render_gate_report,
                          render_sanity_report, render_scan_report, reopen_probe)
from .render.junit import junit_xml
from .render.notebook import compare_view, fix_view, gate_view, sanity_view, scan_view
from .render.markdown import markdown_summary
from .render.text import (baselines_table, compare_text, fix_text, sanity_text, sanity_verdict,
                          scan_summary, scan_table)
from .results.compare import CompareResult
from .results.display import HTML_VIEWS
from .results.fix import FixResult
from .results.gate import GateResult
from .results.sanity import SanityCase, SanityConfig, SanityResult
from .results.scan import ScanConfig, ScanResult
from .models.checkpoint import LoadedCheckpoint
from .io.probe import ProbeSet


def write_scan(result: ScanResult, out_dir: Union[str, os.PathLike]) -> Dict[str, Path]:
    """Write ``audit.json`` and ``report.html`` into ``out_dir`` (atomically, both or neither)."""
    out = Path(out_dir)
    inputs = (Path(result.checkpoint.path), Path(result.probe.source))
    refuse_inputs([out], inputs, "; choose another directory")
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} exists and is not a directory")
    paths = {"audit": out / "audit.json", "report": out / "report.html"}
    refuse_inputs(paths.values(), inputs)
    data = result.to_dict()
    html = render_scan_report(data, result.probe)
    # Both files are written in full before either replaces an old one: a full disk or an
    # unwritable directory leaves the previous audit.json and report.html as they were.
    atomic_write_files([(paths["audit"], json_bytes(data)),
                        (paths["report"], html.encode("utf-8"))])
    return paths


def write_compare(result: CompareResult, out_dir: Union[str, os.PathLike],
                  inputs: Sequence[Union[str, os.PathLike]] = ()) -> Dict[str, Path]:
    """Write ``compare.json`` and ``report.html`` into ``out_dir`` (atomically, both or neither)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} exists and is not a directory")
    refuse_inputs([out], inputs, "; choose another directory")
    data = result.to_dict()
    html = render_compare_report(data)
    paths = {"compare": out / "compare.json", "report": out / "report.html"}
    # both files or neither: a full disk leaves the old pair as it was
    atomic_write_files([(paths["compare"], json_bytes(data)),
                        (paths["report"], html.encode("utf-8"))])
    return paths


def write_gate(result: GateResult, out_dir: Union[str, os.PathLike], *,
               junit: Optional[Union[str, os.PathLike]] = None,
               summary: Optional[Union[str, os.PathLike]] = None,
               inputs: Tuple[Union[str, os.PathLike], ...] = ()) -> Dict[str, Path]:
    """Write gate.json, report.html (and audit.json when a scan ran), JUnit and Markdown,
    all or none of them (atomically)."""
    out = Path(out_dir)
    targets = [out / "gate.json"] + [Path(p) for p in (junit, summary) if p is not None]
    refuse_inputs(targets + [out], inputs, "")
    paths: Dict[str, Path] = {"gate": out / "gate.json", "report": out / "report.html"}
    data = result.to_dict()
    audit = result.audit.to_dict() if result.audit is not None else None
    html = render_gate_report(data, audit, reopen_probe(audit) if audit else None)
    files = [(paths["gate"], json_bytes(data)), (paths["report"], html.encode("utf-8"))]
    if result.audit is not None:
        paths["audit"] = out / "audit.json"
        files.append((paths["audit"], json_bytes(audit)))
    if junit is not None:
        paths["junit"] = Path(junit)
        files.append((paths["junit"], junit_xml(data).encode("utf-8")))
    if summary is not None:
        paths["summary"] = Path(summary)
        files.append((paths["summary"], markdown_summary(data, audit).encode("utf-8")))
    atomic_write_files(files)  # all of them or none: a full disk leaves the old ones
    return paths


def format_sanity(data: Dict[str, Any]) -> str:
    """The terminal text of ``sanity.json`` (tables and the verdict)."""
    return sanity_text(data, sanity_verdict(data))


def write_sanity(result: SanityResult, out_dir: Union[str, os.PathLike], *,
                 inputs: Sequence[Union[str, os.PathLike]] = ()
                 ) -> Dict[str, Any]:
    """Write ``sanity.json`` and ``report.html`` into ``out_dir`` (both or neither)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} exists and is not a directory")
    paths = {"sanity": out / "sanity.json", "report": out / "report.html"}
    refuse_inputs([out, *paths.values()], inputs, "")
    data = result.to_dict()
    atomic_write_files([(paths["sanity"], json_bytes(data)),
                        (paths["report"], render_sanity_report(data).encode("utf-8"))])
    return paths


def run_sanity_cli(checkpoint: Union[str, os.PathLike, LoadedCheckpoint],
                   probe: Union[str, os.PathLike, ProbeSet], config: SanityConfig, *,
                   keep_damaged: Optional[Union[str, os.PathLike]] = None, progress: bool = False,
                   say: Optional[Callable[[str], None]] = None) -> SanityResult:
    """:func:`sanity` with what the command line adds: the cost up front, a progress bar with
    an ETA, and ``--keep-damaged`` (each damaged copy saved as ``.safetensors``)."""
    bar: List[Any] = []
    keep = Path(keep_damaged) if keep_damaged is not None else None
    if keep is not None and keep.exists() and not keep.is_dir():
        raise OutputError(f"--keep-damaged {keep} exists and is not a directory")
    scan_config: ScanConfig = config.scan or ScanConfig()
    scan_config.validate()
    with distributed.agree():
        ckpt, probe_set, warnings = load_inputs(checkpoint, probe, scan_config.options)
    if say:
        for warning in warnings:
            say(f"warning: {warning}")
    meta = {**ckpt.metadata, **audit_metadata(ckpt.arch, ckpt.num_classes,
                                              normalize=scan_config.options.normalize
                                              or ckpt.normalize, classes=ckpt.classes)}

    def on_plan(cost: Dict[str, Any]) -> None:
        if say:
            say(f"sanity: {cost['cases']} planted cases in {len(cost['groups'])} groups "
                f"({cost['selection']}: {', '.join(cost['groups'])}) + the unmodified model: "
                f"{cost['scans']} scans of {cost['probe_images_per_scan']} probe images and up "
                f"to {cost['evaluations_at_most']} probe evaluations to calibrate the defects")
        if progress and sys.stderr.isatty():
            bar.append(tqdm(total=cost["cases"], desc="sanity", file=sys.stderr,
                            dynamic_ncols=True))

    def on_case(done: int, total: int, case: Optional[SanityCase]) -> None:
        if bar:
            bar[0].update(1)

    def on_damaged(plant: PlantResult, model: nn.Module) -> None:
        if keep is None:
            return
        target = keep / f"{plant.group}-{plant.defect}-s{plant.seed}.safetensors"
        planted = {"model_audit.planted": f"{plant.defect} in {plant.group}, severity "
                                          f"{plant.severity:.4g}, seed {plant.seed}"}
        distributed.on_main(_keep, model, target, {**meta, **planted})

    try:
        return sanity(ckpt, probe_set, config, on_case=on_case, on_plan=on_plan,
                      on_damaged=on_damaged)
    finally:
        if bar:
            bar[0].close()


def _keep(model: nn.Module, target: Path, metadata: Dict[str, str]) -> None:
    """Save a damaged copy (``--keep-damaged``), creating its directory."""
    target.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model.state_dict(), target, metadata=metadata)


def write_fix(result: FixResult, out_dir: Union[str, os.PathLike]) -> Dict[str, Path]:
    """Write ``fix.json`` and ``report.html`` into ``out_dir`` (atomically, both or neither)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} exists and is not a directory")
    data = result.to_dict()
    html = render_fix_report(data, result.probe)
    paths = {"fix": out / "fix.json", "report": out / "report.html"}
    inputs = tuple(Path(p) for p in (result.checkpoint.path, result.train_source,
                                     result.probe.source))
    refuse_inputs(paths.values(), inputs)
    atomic_write_files([(paths["fix"], json_bytes(data)),
                        (paths["report"], html.encode("utf-8"))])
    return paths


def format_fix(result: FixResult) -> str:
    """The readable summary the CLI prints."""
    return fix_text(result.to_dict())


def format_scan(result: ScanResult, *, summary: bool = True) -> str:
    """The scan as the CLI prints it: the model and probe line (``summary``), the table, the
    flagged groups, the ranking's trust line (when a method other than the default ranked or
    evidence was given) and the baselines' table (when baselines ran)."""
    data = result.to_dict()
    lines = [scan_summary(data)] if summary else []
    lines += [scan_table(data), f"flagged: {', '.join(result.flagged) or 'none'}"]
    ranking = result.ranking
    if ranking is not None and (ranking.evidence is not None or ranking.chosen_by != "default"):
        lines.append(ranking.trust())
    if result.agreement:
        lines.append(baselines_table(data))
    return "\n".join(lines)


def format_compare(result: CompareResult) -> str:
    """The comparison as the CLI prints it."""
    return compare_text(result.to_dict())


def format_gate(result: GateResult) -> str:
    """The gate's Markdown summary, as the CLI prints it and ``--summary`` writes it."""
    return markdown_summary(result.to_dict(),
                            result.audit.to_dict() if result.audit is not None else None)


# The notebook views of the results (their ``_repr_html_``): registered here, where render/ is
# at hand, for the result types of the layer below.
HTML_VIEWS.update({
    ScanResult: lambda r: scan_view(r.to_dict()),
    CompareResult: lambda r: compare_view(r.to_dict()),
    FixResult: lambda r: fix_view(r.to_dict()),
    SanityResult: lambda r: sanity_view(r.to_dict()),
    GateResult: lambda r: gate_view(r.to_dict()),
})
