"""Every torchvision classifier, not only one per family: saved at its defaults, loaded, scanned.

``python -m bench torchvision [--only NAME,...] [--out FILE]``: for each name of
``torchvision.models.list_models(module=torchvision.models)``, build it with random weights and
10 classes, give its BatchNorm statistics two training-mode passes (an untrained network in
eval mode only blows its activations up), save ``model.state_dict()`` as safetensors (auxiliary
heads included, no module versions), then ``model-audit scan`` it through the CLI on 6 random
images of the smallest size it takes, twice: once with ``--arch`` and once without (the
architecture guessed from keys and shapes). Records exit codes, the guess, seconds and peak
memory, and appends a Markdown table to the day's log (``bench/log/DATE.md``). The suite tests one variant per
family (``tests/test_torchvision_families.py``); this covers the large ones too.
"""
from __future__ import annotations

import argparse
import json
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

from . import _common as common

#: Input sizes for the models that need more than 32 pixels (the rest take 32).
SIZES = {"alexnet": 64, "inception_v3": 80, "squeezenet1_0": 48, "squeezenet1_1": 48,
         "maxvit_t": 224, "vit_b_16": 224, "vit_b_32": 224, "vit_l_16": 224, "vit_l_32": 224,
         "vit_h_14": 224}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", default=None, help="comma-separated model names [default: all]")
    parser.add_argument("--size", type=int, default=None,
                        help="image size for every model [default: 32, or the model's entry "
                             "in SIZES]")
    parser.add_argument("--out", type=Path, default=common.DEFAULT_RESULTS,
                        help="Markdown file the result section is appended to")


def _one(name: str, tmp: Path, size_override: Any = None) -> Dict[str, Any]:
    import torch
    import torchvision.models as tvm
    from click.testing import CliRunner
    from safetensors.torch import save_file

    from model_audit.cli import cli
    size = size_override or SIZES.get(name, 32)
    start = time.perf_counter()
    torch.manual_seed(0)
    model = tvm.get_model(name, weights=None, num_classes=10)
    aux = getattr(model, "AuxLogits", None)
    if aux is not None:
        model.AuxLogits = None  # inception's aux head needs 299-pixel images
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(4, 3, size, size))
    if aux is not None:
        model.AuxLogits = aux
    ckpt, probe = tmp / f"{name}.safetensors", tmp / f"{name}-probe.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    params = sum(p.numel() for p in model.parameters())
    del model
    save_file({"images": torch.rand(6, 3, size, size), "labels": torch.arange(6)}, str(probe))
    row: Dict[str, Any] = {"name": name, "size": size, "parameters": params}
    for mode, extra in (("arch", ["--arch", name]), ("guess", [])):
        out = tmp / f"{name}-{mode}"
        result = CliRunner().invoke(cli, ["scan", str(ckpt), *extra, "--probe", str(probe),
                                          "--out", str(out), "--bootstrap", "0",
                                          "--replay-steps", "1", "--baselines", "none"])
        row[mode] = result.exit_code
        row[f"{mode}_traceback"] = result.exception is not None and result.exit_code not in (0, 2)
        if result.exit_code:
            row[f"{mode}_error"] = (result.output.strip().splitlines() or [""])[-1][:160]
        elif mode == "guess":
            row["guessed"] = json.loads((out / "audit.json").read_text())["model"]["arch"]
        else:
            rep = json.loads((out / "audit.json").read_text())["replay"]
            row["replay"] = {"initial_loss": rep.get("initial_loss"),
                             "peak_lr": rep.get("peak_lr"),
                             "skipped": rep.get("lr_halvings_skipped"),
                             "trials": rep.get("lr_trials")}
    row["seconds"] = round(time.perf_counter() - start, 1)
    ckpt.unlink()
    return row


def run(args: argparse.Namespace) -> int:
    import torchvision.models as tvm

    command = shlex.join(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    commit = common.git_commit()
    names = args.only.split(",") if args.only else sorted(tvm.list_models(module=tvm))
    rows: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            rows.append(_one(name, Path(tmp), args.size))
            print(json.dumps(rows[-1]), flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    ok = sum(r["arch"] == 0 for r in rows)
    right = sum(r.get("guessed") == r["name"] for r in rows)
    lines = common.section_header("every torchvision classifier: load and scan", command, commit,
                                  "cpu")
    lines += [f"- {ok} of {len(rows)} scanned with `--arch`; without `--arch` the guess was the "
              f"model itself for {right} of {len(rows)}; peak memory of the process "
              f"{peak:.1f} GiB", "",
              "| model | parameters | image | with --arch | guessed without --arch | replay: "
              "error loss, peak lr (halvings skipped / tried) | seconds |",
              "|---|---:|---:|---|---|---|---:|"]
    for r in rows:
        guess = r.get("guessed") or f"exit {r['guess']}: {r.get('guess_error', '')}"
        arch = "scanned" if r["arch"] == 0 else f"exit {r['arch']}: {r.get('arch_error', '')}"
        rep = r.get("replay") or {}
        lr = (f"{rep['initial_loss']:.3g}, {rep['peak_lr']:.3g} ({rep['skipped']} / "
              f"{rep['trials']})" if rep.get("peak_lr") is not None else "-")
        lines.append(f"| {r['name']} | {r['parameters']:,} | {r['size']} | {arch} | {guess} | "
                     f"{lr} | {r['seconds']} |")
    if not common.write_section(args.out, lines):
        return 2
    return 0 if ok == len(rows) and right == len(rows) else 1
