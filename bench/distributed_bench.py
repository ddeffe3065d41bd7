"""torch.distributed: time and parallel efficiency of 1 process against N ranks, and peak memory
against probe size.

``python -m bench distributed [--ranks 2] [--per-class 100] [--large-per-class 1000]
[--repeats 2] [--fix-steps 30] [--no-memory] [--device cpu|cuda]``

Every run is the command line a user types, in a child process: ``model-audit scan`` (and
``fix``) on the reference ResNet-18 and a CIFAR-10 test ImageFolder, once as one process with
one thread, once as one process with every thread the ranks would have together (what a user
gets without torchrun), and under ``torchrun --nproc_per_node N`` (one thread per rank). Side by
side in one run, ``--repeats`` times each, alternating:

* wall time of the command (start-up included) and the scan's own ``total_s``;
* speedup of N ranks over 1 process with 1 thread, and parallel efficiency = speedup / N;
* the answer: flagged groups identical? largest score difference from the 1-process run;
* ``fix`` (``--layers layer3``, ``--fix-steps`` steps, no controls) of one process and of N ranks
  (DistributedDataParallel): fixed, broken, net identical?
* peak resident memory (the largest process, from ``wait4``) of a scan of ``--per-class`` x 10
  images against one of ``--large-per-class`` x 10: does a 10x larger probe stay in bounded
  memory (images decoded per batch, in DataLoader workers)?

``--checkpoint``/``--probe``/``--train`` run it on other inputs (the tests use the digits
samples). Appends a Markdown section to the day's log, ``bench/log/DATE.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from . import _common as common
from . import cifar


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_common_arguments(parser)
    common.add_checkpoint_argument(parser)
    parser.add_argument("--probe", type=Path, default=None,
                        help="probe (default: the first --per-class test images of every "
                             "CIFAR-10 class)")
    parser.add_argument("--train", type=Path, default=None,
                        help="repair data of the fix runs (default: the next --per-class test "
                             "images of every class, disjoint from the probe)")
    parser.add_argument("--ranks", type=int, default=2, help="torchrun ranks [2]")
    parser.add_argument("--per-class", type=int, default=100,
                        help="probe images per class of the timed runs [100]")
    parser.add_argument("--large-per-class", type=int, default=1000,
                        help="images per class of the large probe in the memory runs [1000]")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each setting [2]")
    parser.add_argument("--fix-steps", type=int, default=30,
                        help="repair steps of the fix runs (0: no fix runs) [30]")
    parser.add_argument("--layers", default="layer3", help="groups the fix runs retrain")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the peak-memory runs (large probe)")
    parser.add_argument("--extra", default="",
                        help="further scan options, e.g. '--baselines none'")


def _executable() -> str:
    path = Path(sys.executable).parent / "model-audit"
    if not path.exists():
        raise SystemExit(f"error: {path} is not installed; run `make .venv/.installed`")
    return str(path)


def _launch(args: Sequence[str], ranks: int) -> List[str]:
    """The command line: ``model-audit ARGS``, or under torchrun with ``ranks`` ranks."""
    if ranks == 1:
        return [_executable(), *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", str(ranks), "--no-python", _executable(), *args]


def run_command(cmd: List[str], threads: int) -> Dict[str, Any]:
    """Run ``cmd`` with ``threads`` intra-op threads per process: exit code, wall seconds,
    peak resident memory of its largest process (MiB), output."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        log.seek(0)
        text = log.read()
    # ru_maxrss (KiB on Linux) of the child, or of a descendant it waited for if larger
    return {"rc": proc.returncode, "wall_s": wall, "peak_mib": usage.ru_maxrss / 1024,
            "output": text}


def _scan_args(ckpt: Path, probe: Path, out: Path, args: argparse.Namespace,
               arch: Optional[str], normalize: Optional[str]) -> List[str]:
    cmd = ["scan", str(ckpt), "--probe", str(probe), "--out", str(out), "--quiet",
           "--device", args.device]
    cmd += (["--arch", arch] if arch else []) + (["--normalize", normalize] if normalize else [])
    return cmd + shlex.split(args.extra)


def _settings(ranks: int) -> List[Dict[str, Any]]:
    """1 process x 1 thread, 1 process x ``ranks`` threads, ``ranks`` ranks x 1 thread."""
    return [{"name": "1 process, 1 thread", "ranks": 1, "threads": 1},
            {"name": f"1 process, {ranks} threads", "ranks": 1, "threads": ranks},
            {"name": f"torchrun, {ranks} ranks x 1 thread", "ranks": ranks, "threads": 1}]


def _scan_row(run: Dict[str, Any], out: Path) -> Dict[str, Any]:
    if run["rc"] != 0:
        raise SystemExit(f"error: a scan failed (exit {run['rc']}):\n{run['output'][-3000:]}")
    audit = json.loads((out / "audit.json").read_text())
    return {**{k: run[k] for k in ("wall_s", "peak_mib")},
            "scan_s": audit["timing"]["total_s"], "timing": audit["timing"],
            "flagged": audit["flagged"],
            "scores": [layer["score"] for layer in audit["layers"]],
            "n": audit["probe"]["n"], "errors": audit["probe"]["misclassified"]}


def timed_scans(ckpt: Path, probe: Path, args: argparse.Namespace, arch: Optional[str],
                normalize: Optional[str], tmp: Path) -> List[Dict[str, Any]]:
    """Every setting ``--repeats`` times, alternating (a drift of the machine hits all)."""
    rows: List[Dict[str, Any]] = []
    for r in range(args.repeats):
        for k, setting in enumerate(_settings(args.ranks)):
            out = tmp / f"scan-{k}-{r}"
            run = run_command(_launch(_scan_args(ckpt, probe, out, args, arch, normalize),
                                      setting["ranks"]), setting["threads"])
            rows.append({**setting, "repeat": r, **_scan_row(run, out)})
            print(f"{setting['name']}: {rows[-1]['wall_s']:.1f} s", file=sys.stderr)
    return rows


def fix_runs(ckpt: Path, probe: Path, train: Path, args: argparse.Namespace,
             arch: Optional[str], normalize: Optional[str], tmp: Path) -> List[Dict[str, Any]]:
    rows = []
    for k, setting in enumerate(_settings(args.ranks)):
        out = tmp / f"fix-{k}"
        cmd = ["fix", str(ckpt), "--train", str(train), "--probe", str(probe), "--layers",
               args.layers, "--steps", str(args.fix_steps), "--controls", "none",
               "--write-anyway", "--output",
               str(tmp / f"fixed-{k}.safetensors"), "--out", str(out), "--quiet",
               "--device", args.device]
        cmd += (["--arch", arch] if arch else []) + (["--normalize", normalize]
                                                      if normalize else [])
        run = run_command(_launch(cmd, setting["ranks"]), setting["threads"])
        if run["rc"] != 0:
            raise SystemExit(f"error: a fix failed (exit {run['rc']}):\n{run['output'][-3000:]}")
        data = json.loads((out / "fix.json").read_text())
        rows.append({**setting, "wall_s": run["wall_s"],
                     "train_s": data["selection"]["seconds"],
                     "fixed": data["fixed"], "broken": data["broken"], "net": data["net"]})
        print(f"fix, {setting['name']}: {run['wall_s']:.1f} s", file=sys.stderr)
    return rows


def memory_runs(ckpt: Path, probes: Sequence[Path], args: argparse.Namespace,
                arch: Optional[str], normalize: Optional[str], tmp: Path
                ) -> List[Dict[str, Any]]:
    rows = []
    for probe in probes:
        for ranks in (1, args.ranks):
            out = tmp / f"mem-{len(rows)}"
            threads = args.ranks if ranks == 1 else 1
            run = run_command(_launch(_scan_args(ckpt, probe, out, args, arch, normalize),
                                      ranks), threads)
            rows.append({"ranks": ranks, "threads": threads, **_scan_row(run, out)})
            print(f"memory, {rows[-1]['n']} images, {ranks} rank(s): "
                  f"{run['peak_mib']:.0f} MiB", file=sys.stderr)
    return rows


#: The stages of a scan's ``timing`` (audit.json), in pipeline order.
STAGES = ("load", "evaluate", "replay", "attribution", "bootstrap", "baselines", "total")


def _spread(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{min(values):.1f}-{max(values):.1f}"


def report(args: argparse.Namespace, scans: List[Dict[str, Any]], fixes: List[Dict[str, Any]],
           memory: List[Dict[str, Any]], inputs: str) -> List[str]:
    command = "python -m bench distributed " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    lines = common.section_header("torch.distributed: 1 process against torchrun ranks",
                                  command, common.git_commit(), common.pick_device(args.device))
    lines += [f"- inputs: {inputs}; scan options: `{args.extra or '(defaults)'}`; "
              f"{args.repeats} run(s) of each setting, alternating", ""]
    names = [s["name"] for s in _settings(args.ranks)]
    base = [r for r in scans if r["ranks"] == 1 and r["threads"] == 1]
    t1 = sorted(r["wall_s"] for r in base)[len(base) // 2]
    ref = base[0]
    lines += ["| setting | wall s (spread) | scan total_s | speedup vs 1 thread | "
              "efficiency | flagged | max abs score diff |",
              "|---|---|---|---|---|---|---|"]
    for name in names:
        rows = [r for r in scans if r["name"] == name]
        walls = [r["wall_s"] for r in rows]
        median = sorted(walls)[len(walls) // 2]
        workers = rows[0]["ranks"] * rows[0]["threads"]
        diff = max(abs(a - b) for r in rows for a, b in zip(r["scores"], ref["scores"]))
        same = all(r["flagged"] == ref["flagged"] for r in rows)
        lines.append(f"| {name} | {median:.1f} ({_spread(walls)}) | "
                     f"{_spread([r['scan_s'] for r in rows])} | {t1 / median:.2f}x | "
                     f"{t1 / median / workers:.2f} | {', '.join(rows[0]['flagged']) or 'none'}"
                     f"{'' if same else ' (DIFFERS between runs)'} | {diff:.2g} |")
    lines += ["", f"Probe: {ref['n']} images, {ref['errors']} misclassified. Efficiency = "
              "speedup / (processes x threads). Wall time includes each process's start-up "
              "(import torch, load the checkpoint, join the process group)."]
    lines += ["", "Inside the scan (rank 0's `timing` in audit.json; median seconds per stage):",
              "", "| setting | " + " | ".join(STAGES) + " |",
              "|---|" + "---|" * len(STAGES)]
    for name in names:
        rows = [r for r in scans if r["name"] == name]
        cells = []
        for stage in STAGES:
            values = sorted(r["timing"].get(f"{stage}_s", 0.0) for r in rows)
            cells.append(f"{values[len(values) // 2]:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if fixes:
        lines += ["", f"`fix --layers {args.layers} --steps {args.fix_steps} --controls none`:",
                  "", "| setting | wall s | training s | fixed | broken | net |",
                  "|---|---|---|---|---|---|"]
        for r in fixes:
            lines.append(f"| {r['name']} | {r['wall_s']:.1f} | {r['train_s']:.1f} | "
                         f"{r['fixed']} | {r['broken']} | {r['net']:+d} |")
        same = len({(r["fixed"], r["broken"], r["net"]) for r in fixes}) == 1
        lines += ["", "fixed/broken/net " + ("identical in every setting" if same else
                                               "DIFFER between settings")]
    if memory:
        lines += ["", "Peak resident memory (largest process) of a scan against probe size:", "",
                  "| probe images | misclassified | ranks x threads | peak MiB | wall s |",
                  "|---|---|---|---|---|"]
        for r in memory:
            lines.append(f"| {r['n']} | {r['errors']} | {r['ranks']} x {r['threads']} | "
                         f"{r['peak_mib']:.0f} | {r['wall_s']:.1f} |")
    return lines


def run(args: argparse.Namespace) -> int:
    if args.ranks < 2:
        raise SystemExit("error: --ranks must be >= 2 (one process is the baseline)")
    ckpt, arch, normalize = common.resolve_checkpoint(args.checkpoint)
    cache = args.cache_dir or common.default_cache_dir()
    cache = Path(cache) / "cifar10"
    tarball = args.data
    probe = args.probe or cifar.cifar_subset(cache, "test", args.per_class, tarball=tarball)
    train = args.train or (cifar.cifar_subset(cache, "test", args.per_class, tarball=tarball,
                                              skip=args.per_class) if args.fix_steps else None)
    inputs = f"{ckpt.name} on {probe}" + (f", repair data {train}" if train else "")
    tmp = Path(tempfile.mkdtemp(prefix="bench-distributed-"))
    try:
        scans = timed_scans(ckpt, probe, args, arch, normalize, tmp)
        fixes = (fix_runs(ckpt, probe, train, args, arch, normalize, tmp)
                 if args.fix_steps and train else [])
        memory: List[Dict[str, Any]] = []
        if not args.no_memory:
            large = cifar.cifar_subset(cache, "test", args.large_per_class, tarball=tarball)
            memory = memory_runs(ckpt, [probe, large], args, arch, normalize, tmp)
        lines = report(args, scans, fixes, memory, inputs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n".join(lines))
    return 0 if common.write_section(args.out, lines) else 1
