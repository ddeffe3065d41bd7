"""``python -m bench cuda``: do scan, the baselines and fix give the same answers on CUDA?

Runs the library on the committed digits samples twice, on the CPU and on ``--device``
(default ``cuda``), with the same seed, and records whether the two agree: probe accuracy,
the flagged groups, the largest score difference of the own metric and of every baseline, and
fix's fixed/broken/net; with the wall time of each on both devices. GPU kernels are not
bitwise equal to CPU ones, so scores are compared with a tolerance (``--atol``), and the
section says how large the differences were. Needs a CUDA device: on a machine without one it
exits 2 and writes nothing.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

from . import _common as common

SAMPLES = common.ROOT / "samples"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda", help="the device to check [default: cuda]")
    parser.add_argument("--atol", type=float, default=1e-3,
                        help="largest score difference counted as agreement [default: 1e-3]")
    parser.add_argument("--fix-steps", type=int, default=25)
    parser.add_argument("--out", type=Path, default=common.DEFAULT_RESULTS)


def _scan(device: str) -> Dict[str, Any]:
    from model_audit import AuditOptions, ScanConfig, scan

    start = time.perf_counter()
    result = scan(SAMPLES / "digits-sgd.safetensors", SAMPLES / "digits-probe.safetensors",
                  ScanConfig(options=AuditOptions(device=device, seed=0), baselines=("all",)))
    seconds = time.perf_counter() - start
    d = result.to_dict()
    scores = {"replay_reduction": [layer["score"] for layer in d["layers"]]}
    for layer in d["layers"]:  # audit.json: layers[i].baselines.<name> is the group's score
        for name, value in (layer.get("baselines") or {}).items():
            scores.setdefault(name, []).append(value)
    return {"accuracy": result.evaluation.accuracy, "flagged": list(result.flagged),
            "scores": scores, "seconds": seconds, "device": result.device}


def _fix(device: str, steps: int) -> Dict[str, Any]:
    from model_audit import AuditOptions
    from model_audit.commands.fix import fix
    from model_audit.results.fix import FixConfig
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = fix(SAMPLES / "digits-sgd.safetensors", SAMPLES / "digits-train.safetensors",
                     SAMPLES / "digits-probe.safetensors", Path(tmp) / "fixed.safetensors",
                     FixConfig(options=AuditOptions(device=device, seed=0), steps=steps,
                               layers=("layer2", "fc"), write_anyway=True))
    d = result.to_dict()
    return {"fixed": d["fixed"], "broken": d["broken"], "net": d["net"],
            "controls": {c["name"]: c["net"] for c in d["controls"]},
            "seconds": time.perf_counter() - start, "device": d["device"]}


def _max_diff(a: List[Any], b: List[Any]) -> float:
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    missing = sum((x is None) != (y is None) for x, y in zip(a, b))
    if missing:
        return float("inf")
    return max((abs(x - y) for x, y in pairs), default=0.0)


def run(args: argparse.Namespace) -> int:
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device here: `python -m bench cuda` checks the CUDA paths on a GPU "
              "machine (nothing written)", file=sys.stderr)
        return 2
    command = "python -m bench cuda " + " ".join(sys.argv[2:])
    commit = common.git_commit()
    cpu_scan, dev_scan = _scan("cpu"), _scan(args.device)
    cpu_fix, dev_fix = _fix("cpu", args.fix_steps), _fix(args.device, args.fix_steps)
    lines = common.section_header(f"cuda: scan, baselines and fix on cpu vs {args.device}",
                              command, commit, args.device) + [
        f"- digits samples (`samples/`), seed 0, all baselines; fix of layer2+fc, "
        f"{args.fix_steps} steps, with the three controls; tolerance {args.atol:g}", "",
        "| check | cpu | " + args.device + " | agree |", "|---|---|---|---|",
        f"| ran on | {cpu_scan['device']} | {dev_scan['device']} | "
        f"{'yes' if dev_scan['device'].startswith(args.device.split(':')[0]) else 'NO'} |",
        f"| probe accuracy | {cpu_scan['accuracy']:.4f} | {dev_scan['accuracy']:.4f} | "
        f"{'yes' if cpu_scan['accuracy'] == dev_scan['accuracy'] else 'NO'} |",
        f"| flagged | {', '.join(cpu_scan['flagged'])} | {', '.join(dev_scan['flagged'])} | "
        f"{'yes' if cpu_scan['flagged'] == dev_scan['flagged'] else 'NO'} |"]
    agree = cpu_scan["flagged"] == dev_scan["flagged"]
    for name, values in cpu_scan["scores"].items():
        diff = _max_diff(values, dev_scan["scores"].get(name, []))
        ok = diff <= args.atol
        agree &= ok
        lines.append(f"| max score difference, {name} | | {diff:.2e} | {'yes' if ok else 'NO'} |")
    same_fix = (cpu_fix["fixed"], cpu_fix["broken"]) == (dev_fix["fixed"], dev_fix["broken"])
    lines += [f"| fix fixed / broken / net | {cpu_fix['fixed']} / {cpu_fix['broken']} / "
              f"{cpu_fix['net']:+d} | {dev_fix['fixed']} / {dev_fix['broken']} / "
              f"{dev_fix['net']:+d} | {'yes' if same_fix else 'differs'} |",
              f"| fix controls' net | {cpu_fix['controls']} | {dev_fix['controls']} | |",
              f"| seconds: scan (all baselines) | {cpu_scan['seconds']:.1f} | "
              f"{dev_scan['seconds']:.1f} | |",
              f"| seconds: fix with controls | {cpu_fix['seconds']:.1f} | "
              f"{dev_fix['seconds']:.1f} | |", "",
              f"- verdict: scan and baselines {'agree' if agree else 'DISAGREE'} within "
              f"{args.atol:g}; fix counts {'identical' if same_fix else 'differ (training on different kernels; compare the nets)'}",
              ""]
    section = "\n".join(lines)
    print(section)
    common.append_results(args.out, section)
    return 0 if agree else 1
