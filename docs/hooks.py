"""mkdocs hooks: the demo report in the site is made by the current code at every build.

``on_post_build`` scans the committed digits samples with the installed model-audit and writes
the scan's ``report.html`` to ``SITE/demo/report.html``, which "Reading the report" embeds:
the picture in the documentation is always what the tool produces now.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def on_post_build(config: Any, **kwargs: Any) -> None:
    from model_audit import ScanConfig, scan
    from model_audit.outputs import write_scan

    samples = ROOT / "samples"
    if Path.cwd().resolve() == ROOT:  # the paths the report shows, as `make demo` gives them
        samples = Path("samples")
    result = scan(samples / "digits-sgd.safetensors", samples / "digits-probe.safetensors",
                  ScanConfig())
    write_scan(result, Path(config["site_dir"]) / "demo")
