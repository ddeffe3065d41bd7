"""How far do the answers move between machines? The golden runs under emulated CPUs.

``python -m bench numerics [--capabilities default,avx2,avx512] [--threads 1,2,4]
[--layouts contiguous,channels-last] [--out FILE]``: the commands of the golden tests
(:data:`GOLDEN_FILES`: scan with every baseline, scan, compare, gate, fix with its three
controls, and a sanity check with a trained-in defect, all on the committed digits samples) run
once per setting, each in a fresh process with ``ATEN_CPU_CAPABILITY`` (the kernels torch picks:
what another CPU would run), ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` and
``MODEL_AUDIT_CHANNELS_LAST``. Every result file is compared with the first setting's, leaf by
leaf:

* floats: the largest difference, as ``|a - b| / (ABS_FLOOR + max(|a|, |b|))`` (relative,
  with a floor for values near 0), and where it is;
* everything else (flags, groups, ranks, counts, severities' cases, schema): must be equal;
  each difference is listed.

The golden tests (``tests/test_golden.py``) compare with :data:`REL_TOLERANCE`, set from this
measurement (see ``bench/RESULTS.md``, "numerics").
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

from . import _common as common

ROOT = common.ROOT
SAMPLES = ROOT / "samples"

#: Tolerance of the golden tests' floats: ``|a - b| <= REL_TOLERANCE * (ABS_FLOOR +
#: max(|a|, |b|))``, i.e. 1e-4 absolute for values up to about 1 and 1e-4 relative above.
#: Measured (RESULTS.md, "numerics"): across CPU kernel sets, 1/2/4 threads and both layouts
#: the golden floats moved by at most 5e-6 on this scale (per-image loss reductions of order
#: 1 differing by float32 rounding, written with 6 significant digits), so 1e-4 leaves a 20x
#: margin, while any change of the method (scores move by 1e-3 or more) still fails.
REL_TOLERANCE = 1e-4
#: Floats of a *trained* state (fix's validation losses along a repair, confidences after it),
#: where float32 rounding compounds over the repair's SGD steps: under
#: ``ATEN_CPU_CAPABILITY=default`` the full fine-tune control's validation losses moved by
#: 2.5e-4 on the scale above after 20 steps (2026-12-07), while every count beside them
#: (validation images fixed and broken, the state kept, probe fixed/broken) stayed equal; these
#: are compared at 40x that. A change of the method still moves them by far more.
TRAINED_TOLERANCE = 1e-2
#: Paths (with list indices removed) of the floats compared at :data:`TRAINED_TOLERANCE`.
TRAINED_FIELDS = re.compile(r"\.validation\.candidates\[\]\.loss$|\.confidence_after$")
#: Floats derived from the group-alone steps (the default ``alone_net`` metric: scores,
#: their intervals, per-image reductions, and the sanity scores of ``alone_net`` and
#: ``combined``). Three gradient steps per group, then a net of the errors' gain and the
#: correct images' loss that cancels much of both, amplify float32 rounding by about 1e3:
#: between 1 and 2 threads a planted model's shares moved by up to 1.3e-4 (2026-12-07, the
#: sanity golden's fc/noise case; no step-size decision changed, every flag and rank stayed).
#: Compared at 8x that; a change of the method still moves them by 1e-2 or more.
ALONE_TOLERANCE = 1e-3
ALONE_FIELDS = re.compile(
    r"\.layers\[\]\.(score|reduction|score_interval\[\])$|\.per_image\.reduction\[\]\[\]$"
    r"|\.scores\.(alone_net|alone_errors|combined)\[\]$|\.score_(a|b|low|high)(\[\])?$")
#: The scale below which floats are compared absolutely: the quantities are losses and loss
#: reductions of order 1, whose float32 noise is absolute (a reduction of 3e-4 carries the
#: same 1e-7 of rounding as one of 0.3).
ABS_FLOOR = 1.0

#: Result fields that differ from run to run or machine to machine and are never part of the
#: answer: wall times, paths of this run, versions and the machine description.
VOLATILE = frozenset({
    "timing", "seconds", "relative_to_own", "created", "version", "path", "paths", "out_dir",
    "output", "report", "torch", "python", "platform", "device", "threads", "duration",
    "wall_seconds", "scan_seconds", "cost", "environment"})

POLICY = """[policy]
min_accuracy = 0.5
min_class_accuracy = 0.2
max_flagged = 3
min_overlap = 0.3
min_rank_correlation = 0.0
no_new_flags = true
"""

#: The golden result files, by name, relative to the run's directory.
GOLDEN_FILES = {"scan": "sgd/audit.json", "compare": "compare/compare.json",
                "gate": "gate/gate.json", "fix": "fix/fix.json", "sanity": "sanity/sanity.json"}


def golden_commands(tmp: Path) -> List[List[str]]:
    """The CLI arguments of the golden runs, in order (each writes under ``tmp``)."""
    sgd, adam = SAMPLES / "digits-sgd.safetensors", SAMPLES / "digits-adam.safetensors"
    probe, train = SAMPLES / "digits-probe.safetensors", SAMPLES / "digits-train.safetensors"
    (tmp / "policy.toml").write_text(POLICY)
    commands = [
        ["scan", sgd, "--probe", probe, "--out", tmp / "sgd", "--quiet", "--baselines", "all",
         "--baseline-steps", "4", "--bootstrap", "50"],
        ["scan", adam, "--probe", probe, "--out", tmp / "adam", "--quiet", "--bootstrap", "50"],
        ["compare", tmp / "sgd" / "audit.json", tmp / "adam" / "audit.json", "--out",
         tmp / "compare", "--resamples", "100"],
        ["gate", sgd, "--probe", probe, "--policy", tmp / "policy.toml", "--baseline",
         tmp / "adam" / "audit.json", "--out", tmp / "gate", "--quiet"],
        # no full fine-tune control: its 20 steps over every weight leave one probe image of
        # the samples within rounding of its decision boundary (fixed 5 / 4 under the avx2 /
        # avx512 kernels, 2026-12-07); the counts of this selection and these controls do not
        # move; tests/test_fix.py covers the full fine-tune
        ["fix", sgd, "--train", train, "--probe", probe, "--output", tmp / "fixed.safetensors",
         "--out", tmp / "fix", "--layers", "layer2,fc", "--steps", "20", "--controls",
         "random,rgn", "--write-anyway", "--quiet"],
        # layer1/labelswap: the case whose severity moved with the thread count (0.253 / 0.236)
        ["sanity", sgd, "--probe", probe, "--groups", "layer1,fc", "--defects",
         "noise,labelswap", "--methods", "own,auto_rgn", "--out", tmp / "sanity", "--quiet"],
    ]
    return [[str(a) for a in c] for c in commands]


def run_golden(tmp: Path, invoke: Callable[[List[str]], None]) -> Dict[str, Dict[str, Any]]:
    """Run every golden command with ``invoke`` (one CLI call); the result files, read."""
    for args in golden_commands(tmp):
        invoke(args)
    return {name: json.loads((tmp / rel).read_text()) for name, rel in GOLDEN_FILES.items()}


def stable(value: Any) -> Any:
    """``value`` without its :data:`VOLATILE` fields; absolute paths reduced to their names."""
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [stable(v) for v in value]
    if isinstance(value, str) and value.startswith("/"):
        return Path(value).name
    return value


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def float_distance(a: float, b: float) -> float:
    """``|a - b| / (ABS_FLOOR + max(|a|, |b|))``; 0 for two NaNs, inf for one."""
    if math.isnan(a) or math.isnan(b):
        return 0.0 if math.isnan(a) and math.isnan(b) else math.inf
    if a == b:
        return 0.0
    return abs(a - b) / (ABS_FLOOR + max(abs(a), abs(b)))


def leaves(expected: Any, got: Any, where: str = "$"
           ) -> Iterator[Tuple[str, str, Any, Any]]:
    """Every leaf of two results side by side: ``(kind, path, expected, got)`` where kind is
    ``"float"`` (two numbers, one of them a float), ``"equal"`` or ``"different"``
    (anything else, compared exactly: keys, lengths, strings, ints, booleans)."""
    if isinstance(expected, dict) and isinstance(got, dict):
        if set(expected) != set(got):
            yield "different", f"{where} keys", sorted(expected), sorted(got)
        for k in sorted(set(expected) & set(got)):
            yield from leaves(expected[k], got[k], f"{where}.{k}")
        return
    if isinstance(expected, list) and isinstance(got, list):
        if len(expected) != len(got):
            yield "different", f"{where} length", len(expected), len(got)
            return
        for i, (e, g) in enumerate(zip(expected, got)):
            yield from leaves(e, g, f"{where}[{i}]")
        return
    if (isinstance(expected, float) or isinstance(got, float)) and _is_number(expected) \
            and _is_number(got):
        yield "float", where, expected, got
        return
    yield ("equal" if expected == got and type(expected) is type(got) else "different",
           where, expected, got)


def differences(expected: Any, got: Any, rel: float = REL_TOLERANCE) -> List[str]:
    """Every place where ``got`` differs from ``expected``: floats farther apart than ``rel``
    (:func:`float_distance`), anything else not equal."""
    out = []
    for kind, where, e, g in leaves(expected, got):
        path = re.sub(r"\[\d+\]", "[]", where)
        tol = (TRAINED_TOLERANCE if TRAINED_FIELDS.search(path)
               else max(rel, ALONE_TOLERANCE) if ALONE_FIELDS.search(path) else rel)
        if kind == "different" or (kind == "float" and not float_distance(e, g) <= tol):
            out.append(f"{where}: {e!r} != {g!r}")
    return out


def spread(expected: Dict[str, Any], got: Dict[str, Any]) -> Dict[str, Any]:
    """Per result file: the largest absolute float difference, the largest relative one among
    values of magnitude at least 0.01, the largest :func:`float_distance` (and where), and the
    exact differences."""
    out: Dict[str, Any] = {}
    for name in GOLDEN_FILES:
        worst, at, max_abs, max_rel, exact = 0.0, "", 0.0, 0.0, []
        for kind, where, e, g in leaves(stable(expected[name]), stable(got[name])):
            if kind == "float":
                d = float_distance(e, g)
                if math.isfinite(e) and math.isfinite(g):
                    max_abs = max(max_abs, abs(e - g))
                    if max(abs(e), abs(g)) >= 0.01:
                        max_rel = max(max_rel, abs(e - g) / max(abs(e), abs(g)))
                if d > worst:
                    worst, at = d, f"{where}: {e!r} vs {g!r}"
            elif kind == "different":
                exact.append(f"{where}: {e!r} vs {g!r}")
        out[name] = {"distance": worst, "at": at, "max_abs": max_abs, "max_rel": max_rel,
                     "exact": exact}
    return out


# ------------------------------------------------------------------------------------------
# The bench


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--capabilities", default="default,avx2,avx512",
                        help="ATEN_CPU_CAPABILITY values (kernels of another CPU) "
                             "[default,avx2,avx512]")
    parser.add_argument("--threads", default="1,2,4", help="OMP/MKL thread counts [1,2,4]")
    parser.add_argument("--layouts", default="contiguous,channels-last",
                        help="convolution layouts on the CPU [contiguous,channels-last]")
    parser.add_argument("--layout-timing", type=int, default=0, metavar="N",
                        help="also time N scans of the reference SGD ResNet-18 on 1,000 CIFAR-10 "
                             "test images per layout, alternating [0: no timing]")
    parser.add_argument("--out", type=Path, default=common.DEFAULT_RESULTS,
                        help="Markdown file the result section is appended to")


def _worker(out_dir: str) -> None:
    """One setting: the golden commands in this process (its environment is the setting)."""
    from click.testing import CliRunner

    from model_audit.cli import cli

    def invoke(args: List[str]) -> None:
        result = CliRunner().invoke(cli, args)
        if result.exit_code != 0:
            raise SystemExit(f"{' '.join(args)} failed:\n{result.output}")

    files = run_golden(Path(out_dir), invoke)
    import torch
    files["_setting"] = {"capability": torch.backends.cpu.get_cpu_capability(),
                         "threads": torch.get_num_threads()}
    (Path(out_dir) / "all.json").write_text(json.dumps(files))


def _run_setting(tmp: Path, capability: str, threads: int, layout: str) -> Dict[str, Any]:
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads),
               MODEL_AUDIT_CHANNELS_LAST="1" if layout == "channels-last" else "0")
    out = tmp / f"{capability}-{threads}-{layout}"
    out.mkdir()
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", "import sys; from bench.numerics_bench import "
                           "_worker; _worker(sys.argv[1])", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"setting {out.name} failed:\n{proc.stdout}\n{proc.stderr}")
    data = json.loads((out / "all.json").read_text())
    data["_seconds"] = time.perf_counter() - start
    return data


def run(args: argparse.Namespace) -> int:
    caps = [c.strip() for c in args.capabilities.split(",") if c.strip()]
    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    settings = [(c, t, lay) for lay in layouts for c in caps for t in threads]
    results: List[Tuple[Tuple[str, int, str], Dict[str, Any]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for setting in settings:
            print(f"running the golden commands with ATEN_CPU_CAPABILITY={setting[0]}, "
                  f"{setting[1]} thread(s), {setting[2]} ...", flush=True)
            results.append((setting, _run_setting(Path(tmp), *setting)))
    (ref_setting, ref), rows = results[0], []
    worst = 0.0
    for setting, data in results:
        s = spread(ref, data)
        worst = max([worst] + [v["distance"] for v in s.values()])
        rows.append((setting, data, s))
    lines = _section(args, ref_setting, rows, worst)
    if args.layout_timing:
        lines += layout_timing(args.layout_timing)
    print("\n".join(lines))
    common.write_section(args.out, lines)
    return 0


def _section(args: argparse.Namespace, ref_setting: Tuple[str, int, str],
             rows: Sequence[Tuple[Tuple[str, int, str], Dict[str, Any], Dict[str, Any]]],
             worst: float) -> List[str]:
    command = ("python -m bench numerics --capabilities " + args.capabilities + " --threads "
               + args.threads + " --layouts " + args.layouts
               + (f" --layout-timing {args.layout_timing}" if args.layout_timing else ""))
    lines = common.section_header("numerics: the golden runs under emulated CPUs, thread counts "
                                  "and layouts", command, common.git_commit(), "cpu")
    lines += [f"- reference setting: ATEN_CPU_CAPABILITY={ref_setting[0]}, {ref_setting[1]} "
              f"thread(s), {ref_setting[2]}; each setting in a fresh process. Per file: the "
              "largest absolute float difference / the largest relative one among values of "
              f"magnitude >= 0.01 / the largest distance |a-b| / ({ABS_FLOOR:g} + "
              "max(|a|,|b|)) that the golden tests bound; every other field exactly", "",
              "| capability (reported) | threads | layout | " + " | ".join(GOLDEN_FILES)
              + " | exact differences | seconds |",
              "|---|---:|---|" + "---|" * len(GOLDEN_FILES) + "---:|---:|"]
    for (cap, threads, layout), data, s in rows:
        exact = sum(len(v["exact"]) for v in s.values())
        lines.append(f"| {cap} ({data['_setting']['capability']}) | {threads} | {layout} | "
                     + " | ".join(f"{s[n]['max_abs']:.0e} / {s[n]['max_rel']:.0e} / "
                                  f"{s[n]['distance']:.0e}" for n in GOLDEN_FILES)
                     + f" | {exact} | {data['_seconds']:.0f} |")
    lines += ["", f"- largest distance over every setting and file: {worst:.2e} (the golden "
              f"tests' tolerance: {REL_TOLERANCE:g})"]
    where = [(name, setting, v["at"]) for setting, _, s in rows for name, v in s.items()
             if v["distance"] > 0 and v["distance"] == worst]
    if where:
        name, (cap, threads, layout), at = where[0]
        lines.append(f"- where: {name} under {cap}/{threads}/{layout} (and {len(where) - 1} "
                     f"other setting(s)): {at}")
    for (cap, threads, layout), _, s in rows:
        for name, v in s.items():
            for diff in v["exact"][:5]:
                lines.append(f"- exact difference, {name} under {cap}/{threads}/{layout}: "
                             f"{diff}")
    return lines


def layout_timing(repeats: int) -> List[str]:
    """Wall time of the library scan of the reference SGD ResNet-18 on 1,000 CIFAR-10 test
    images in the contiguous and the channels-last layout, ``repeats`` times each, alternating
    (after one warm-up scan), in this process with its thread count."""
    import statistics

    import torch

    from model_audit import scan
    from model_audit.results.scan import ScanConfig
    from model_audit.options import AuditOptions

    from . import cifar

    ckpt, arch, normalize = common.resolve_checkpoint("reference-sgd")
    probe = cifar.cifar_subset(common.default_cache_dir() / "cifar10", "test", 100)
    config = ScanConfig(options=AuditOptions(arch=arch, normalize=normalize))
    seconds: Dict[str, List[float]] = {"contiguous": [], "channels-last": []}
    flags = {}
    for r in range(repeats + 1):
        for layout in seconds:
            os.environ["MODEL_AUDIT_CHANNELS_LAST"] = "1" if layout == "channels-last" else "0"
            start = time.perf_counter()
            result = scan(ckpt, probe, config)
            if r:  # the first round warms up
                seconds[layout].append(time.perf_counter() - start)
            flags[layout] = result.flagged
    os.environ.pop("MODEL_AUDIT_CHANNELS_LAST", None)
    med = {k: statistics.median(v) for k, v in seconds.items()}
    return ["", f"Layout timing: `scan` of the reference SGD ResNet-18 on 1,000 CIFAR-10 test "
            f"images, {torch.get_num_threads()} threads, {repeats} runs per layout after a "
            "warm-up, alternating:", "",
            "| layout | median s | runs | flagged |", "|---|---:|---|---|"] + [
        f"| {k} | {med[k]:.2f} | {', '.join(f'{x:.2f}' for x in v)} | {', '.join(flags[k])} |"
        for k, v in seconds.items()] + [
        "", f"- channels-last / contiguous: {med['channels-last'] / med['contiguous']:.3f}"]
