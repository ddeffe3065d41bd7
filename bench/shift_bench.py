"""Repair under distribution shift: which groups to retrain, judged against an oracle.

``python -m bench shift [--checkpoint reference-sgd] [--shifts ...] [--seeds 3] [--steps 100]
[--repair-per-class 100] [--probe-per-class 200]``

Surgical fine-tuning (Lee et al., ICLR 2023) gains where the data is genuinely new: which
block is tuned matters (the first for input-level corruptions, the last for label shift). Here
every shift is built from the CIFAR-10 test split, which the reference models never saw:

* the corruptions of CIFAR-10-C (Hendrycks and Dietterich, ICLR 2019), written from the
  parameters of their ``make_cifar_c.py`` for 32x32 images (Gaussian noise, defocus blur,
  contrast, JPEG, pixelate): the ``imagecorruptions`` package re-implements them, but its last
  release (1.1.2, 2020) imports ``scipy.ndimage.interpolation`` and calls scikit-image's
  removed ``multichannel`` argument, so it does not run against the locked numpy 2 / scipy
  1.17. A severity ladder extends theirs where their five levels cost the reference model
  fewer than 25 points; the bench takes the first level that costs at least 25 (:data:`LADDER`);
* a label shift: three classes permuted cyclically (a -> b -> c -> a).

For each shift and seed the model is repaired on ``--repair-per-class`` shifted images per
class from the first half of the test split and scored on ``--probe-per-class`` per class from
the second half, with ``model_audit.fix`` itself (its validation share held out of the repair
images, the state it keeps, nothing changed when no state beat the original): the flagged
groups (``layers="auto"``: a scan of the shifted repair images), each group alone (the
oracle; the first residual stage and the last layer among them), the full fine-tune and
Auto-RGN's choice. The scan's rank of the oracle's best group is reported per shift.
Appends a Markdown section to the day's log, ``bench/log/DATE.md``.
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import _common as common
from . import cifar

#: Severity ladders: CIFAR-10-C's five levels (make_cifar_c.py), then stronger ones.
LADDER: Dict[str, List[Any]] = {
    "gaussian_noise": [0.04, 0.06, 0.08, 0.09, 0.10, 0.15, 0.20, 0.30],
    "defocus_blur": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1), (2, 0.1),
                     (2.5, 0.1), (3, 0.1)],
    "contrast": [0.75, 0.5, 0.4, 0.3, 0.15, 0.2, 0.1, 0.05],
    "jpeg": [80, 65, 58, 50, 40, 25, 15, 8],
    "pixelate": [0.95, 0.9, 0.85, 0.75, 0.65, 0.5, 0.4, 0.3],
}
SHIFTS = tuple(LADDER) + ("labels",)
#: The accuracy drop (points) a corruption's severity is chosen to cost.
DROP_RANGE = (25.0, 50.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_checkpoint_argument(parser)
    parser.add_argument("--shifts", default=",".join(SHIFTS),
                        help=f"comma-separated, of {', '.join(SHIFTS)} [all]")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per shift [3]")
    parser.add_argument("--steps", type=int, default=100, help="repair steps [100]")
    parser.add_argument("--lr", type=float, default=0.01, help="peak learning rate [0.01]")
    parser.add_argument("--preserve", type=float, default=None,
                        help="weight of fix's preservation term [fix's default]")
    parser.add_argument("--repair-per-class", type=int, default=100,
                        help="shifted repair images per class [100]")
    parser.add_argument("--probe-per-class", type=int, default=200,
                        help="shifted probe images per class, disjoint [200]")
    parser.add_argument("--selections", default="flagged,groups,all,rgn",
                        help="flagged, groups (each group alone), all, rgn [all four]")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write every run as JSON here")
    parser.add_argument("--from-json", default=None,
                        help="comma-separated --json files of earlier runs (e.g. shifts split "
                             "over two processes): report them together, run nothing")
    common.add_common_arguments(parser)


# ------------------------------------------------------------------------------------------
# Corruptions (images: uint8 H x W x 3 numpy arrays)


def _disk(radius: float, alias_blur: float) -> np.ndarray:
    """make_cifar_c's defocus kernel: an aliased disk, then a 3x3 Gaussian (cv2's
    ``GaussianBlur(ksize=(3, 3))``, written out)."""
    from scipy.ndimage import convolve

    grid = np.arange(-8, 9) if radius <= 8 else np.arange(-int(radius), int(radius) + 1)
    xx, yy = np.meshgrid(grid, grid)
    disk = ((xx ** 2 + yy ** 2) <= radius ** 2).astype(np.float32)
    disk /= disk.sum()
    g = np.exp(-np.arange(-1, 2) ** 2 / (2 * alias_blur ** 2))
    g /= g.sum()
    return convolve(disk, np.outer(g, g).astype(np.float32), mode="mirror")


def corrupt(img: np.ndarray, shift: str, level: Any, rng: np.random.Generator) -> np.ndarray:
    """One image corrupted as CIFAR-10-C does at severity parameter ``level``."""
    from PIL import Image
    from scipy.ndimage import convolve

    x = img.astype(np.float64) / 255.0
    if shift == "gaussian_noise":
        x = np.clip(x + rng.normal(size=x.shape, scale=level), 0, 1)
    elif shift == "defocus_blur":
        kernel = _disk(*level)
        x = np.clip(np.stack([convolve(x[..., c], kernel, mode="mirror") for c in range(3)],
                             axis=-1), 0, 1)
    elif shift == "contrast":
        means = x.mean(axis=(0, 1), keepdims=True)
        x = np.clip((x - means) * level + means, 0, 1)
    elif shift == "jpeg":
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=int(level))
        return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), dtype=np.uint8)
    elif shift == "pixelate":
        small = int(32 * level)
        pil = Image.fromarray(img).resize((small, small), Image.BOX).resize((32, 32), Image.BOX)
        return np.asarray(pil, dtype=np.uint8)
    else:
        raise ValueError(f"unknown corruption {shift!r}")
    return np.uint8(np.round(x * 255))


def _images(directory: Path) -> Tuple[np.ndarray, np.ndarray, Tuple[str, ...]]:
    """An ImageFolder subset as uint8 N x 32 x 32 x 3 and labels (the tool's reader)."""
    from model_audit.io.probe import open_probe

    probe = open_probe(directory, channels=3, normalize="none",
                       model_classes=cifar.CIFAR10_CLASSES)
    x = probe.load(list(range(len(probe))), normalized=False)
    arr = (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return arr, probe.labels.numpy(), probe.classes


def _write(path: Path, images: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> Path:
    import torch
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"images": torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))),
               "labels": torch.from_numpy(labels.astype(np.int64))}, str(tmp),
              metadata={"classes": json.dumps(list(classes))})
    tmp.replace(path)
    return path


def _corrupt_all(images: np.ndarray, shift: str, level: Any, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([corrupt(img, shift, level, rng) for img in images])


def permuted(labels: np.ndarray, seed: int, classes: int = 10) -> Tuple[np.ndarray, List[int]]:
    """Labels with three classes (seeded) permuted cyclically: a -> b -> c -> a."""
    rng = np.random.default_rng(seed + 31)
    a, b, c = (int(v) for v in rng.choice(classes, size=3, replace=False))
    out = labels.copy()
    out[labels == a], out[labels == b], out[labels == c] = b, c, a
    return out, [a, b, c]


def _accuracy(ckpt_path: Path, path: Path, arch: Optional[str], normalize: Optional[str]
              ) -> float:
    from model_audit import AuditOptions
    from model_audit.core.evaluate import evaluate
    from model_audit.options import load_inputs

    ckpt, probe, _ = load_inputs(ckpt_path, path, AuditOptions(arch=arch, normalize=normalize))
    return evaluate(ckpt.model, probe, batch_size=256).accuracy


def choose_level(shift: str, ckpt_path: Path, clean: np.ndarray, labels: np.ndarray,
                 classes: Sequence[str], base: float, tmp: Path, arch: Optional[str],
                 normalize: Optional[str]) -> Tuple[Any, float]:
    """The level of :data:`LADDER` whose cost on ``clean`` (the repair images) is closest to
    the middle of :data:`DROP_RANGE` (25-50 points). Returns (level, drop in points)."""
    drops = []
    for level in LADDER[shift]:
        path = _write(tmp / f"level-{shift}.safetensors",
                      _corrupt_all(clean, shift, level, 12345), labels, classes)
        drops.append((100 * (base - _accuracy(ckpt_path, path, arch, normalize)), level))
        print(f"  {shift} at {level}: -{drops[-1][0]:.1f} points", flush=True)
    middle = sum(DROP_RANGE) / 2
    drop, level = min(drops, key=lambda d: abs(d[0] - middle))
    return level, drop


# ------------------------------------------------------------------------------------------
# Runs


def _repair(ckpt: Path, repair: Path, probe: Path, seed: int, args: argparse.Namespace,
            arch: Optional[str], normalize: Optional[str], layers: Any,
            controls: Tuple[str, ...], last: bool = False) -> Dict[str, Any]:
    from model_audit import AuditOptions
    from model_audit.commands.fix import fix
    from model_audit.results.fix import FixConfig

    opts = AuditOptions(device=common.pick_device(args.device), seed=seed, arch=arch,
                        normalize=normalize)
    config = FixConfig(options=opts, layers=layers, steps=args.steps, lr=args.lr,
                       controls=controls, evaluate_last=last, preserve=args.preserve)
    return fix(ckpt, repair, probe, None, config).to_dict()


def _rows(result: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Each run of a fix.json: its probe gain (points) and what validation kept."""
    before = result["accuracy"]["before"]
    out = {}
    for run in [result["selection"]] + result["controls"]:
        last = run.get("last_state") or {}
        out[run["name"]] = {
            "groups": run["groups"], "gain": 100 * (run["accuracy_after"] - before),
            "last_gain": 100 * (last["accuracy"] - before) if last else None,
            "accepted": run["accepted"], "kept_step": run["kept_step"],
            "diverged": run["diverged"], "seconds": run["seconds"]}
    return out


def run_one(shift: str, seed: int, level: Any, ckpt: Path, data: Dict[str, Any],
            args: argparse.Namespace, arch: Optional[str], normalize: Optional[str],
            tmp: Path) -> Dict[str, Any]:
    """One shift and seed: the shifted data, then every selection repaired on it."""
    rx, ry, px, py = data["repair_x"], data["repair_y"], data["probe_x"], data["probe_y"]
    info: Dict[str, Any] = {"shift": shift, "seed": seed, "level": level}
    if shift == "labels":
        ry, info["permuted"] = permuted(ry, seed)
        py, _ = permuted(py, seed)
    else:
        rx = _corrupt_all(rx, shift, level, 1000 + seed)
        px = _corrupt_all(px, shift, level, 2000 + seed)
    repair = _write(tmp / f"{shift}-{seed}-repair.safetensors", rx, ry, data["classes"])
    probe = _write(tmp / f"{shift}-{seed}-probe.safetensors", px, py, data["classes"])
    wanted = set(args.selections.split(","))
    runs: Dict[str, Dict[str, Any]] = {}
    controls = tuple(c for c in ("all", "rgn") if c in wanted)
    start = time.perf_counter()
    first = _repair(ckpt, repair, probe, seed, args, arch, normalize, "auto", controls, True)
    info["accuracy_before"] = 100 * first["accuracy"]["before"]
    info["flagged"] = first["selection"]["groups"]
    info["scan_scores"] = first["selection"]["scan_scores"]
    info["groups"] = list(first["selection"]["scan_scores"])
    runs.update(_rows(first))
    if "groups" in wanted:
        for g in info["groups"]:
            one = _repair(ckpt, repair, probe, seed, args, arch, normalize, (g,), ())
            runs[g] = _rows(one)["flagged"]
            print(f"    {shift} s{seed}: {g:<8} gain {runs[g]['gain']:+.1f} (kept step "
                  f"{runs[g]['kept_step']})", flush=True)
    info["runs"] = runs
    info["seconds"] = time.perf_counter() - start
    print(f"  {shift} s{seed}: flagged {', '.join(info['flagged'])} gain "
          f"{runs['flagged']['gain']:+.1f}", flush=True)
    return info


def run(args: argparse.Namespace) -> int:
    import tempfile

    from model_audit.errors import ConfigError

    if args.from_json:
        return _report_saved(args)
    shifts = [s.strip() for s in args.shifts.split(",") if s.strip()]
    unknown = [s for s in shifts if s not in SHIFTS]
    if unknown:
        raise ConfigError(f"unknown shift(s) {', '.join(unknown)}; valid: {', '.join(SHIFTS)}")
    ckpt, arch, normalize = common.resolve_checkpoint(args.checkpoint)
    if args.preserve is None:
        from model_audit.results.fix import FixConfig
        args.preserve = FixConfig.preserve
    cache = args.cache_dir or common.default_cache_dir()
    kwargs = {"tarball": args.data} if args.data else {}
    repair_dir = cifar.cifar_subset(cache, "test", args.repair_per_class, **kwargs)
    probe_dir = cifar.cifar_subset(cache, "test", args.probe_per_class, skip=500, **kwargs)
    rx, ry, classes = _images(repair_dir)
    px, py, _ = _images(probe_dir)
    data = {"repair_x": rx, "repair_y": ry, "probe_x": px, "probe_y": py, "classes": classes}
    results: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        clean = _write(tmp / "clean-repair.safetensors", rx, ry, classes)
        base = _accuracy(ckpt, clean, arch, normalize)
        levels: Dict[str, Tuple[Any, Optional[float]]] = {"labels": (None, None)}
        for shift in shifts:
            if shift != "labels":
                levels[shift] = choose_level(shift, ckpt, rx, ry, classes, base, tmp, arch,
                                             normalize)
            for seed in range(args.seeds):
                results.append(run_one(shift, seed, levels[shift][0], ckpt, data, args, arch,
                                       normalize, tmp))
    if args.json:
        args.json.write_text(json.dumps({"levels": {k: [str(v[0]), v[1]] for k, v in
                                                    levels.items()},
                                         "base": 100 * base, "results": results,
                                         "argv": sys.argv[2:]}, indent=1, default=str))
    lines = report(args, results, levels, 100 * base, ckpt)
    print("\n".join(lines))
    common.write_section(args.out, lines)
    return 0


def _report_saved(args: argparse.Namespace) -> int:
    """One report of the runs saved by earlier ``--json`` runs (same settings)."""
    results: List[Dict[str, Any]] = []
    levels: Dict[str, Tuple[Any, Optional[float]]] = {}
    base = 0.0
    for name in args.from_json.split(","):
        saved = json.loads(Path(name).read_text())
        results += saved["results"]
        levels.update({k: (v[0], v[1]) for k, v in saved["levels"].items()})
        base = saved["base"]
    ckpt, _, _ = common.resolve_checkpoint(args.checkpoint)
    if args.preserve is None:
        from model_audit.results.fix import FixConfig
        args.preserve = FixConfig.preserve
    lines = report(args, results, levels, base, ckpt)
    print("\n".join(lines))
    common.write_section(args.out, lines)
    return 0


# ------------------------------------------------------------------------------------------
# Report


def _mean(values: Sequence[float]) -> float:
    return statistics.mean(values) if values else float("nan")


def _spread(values: Sequence[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:+.1f}" if values else "n/a"
    return f"{_mean(values):+.1f} ({min(values):+.1f} to {max(values):+.1f})"


def _rank_of(scores: Dict[str, float], name: str) -> int:
    order = sorted(scores, key=lambda g: -scores[g])
    return order.index(name) + 1


def summarize(results: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Per shift: mean gains of every selection over the seeds, the oracle's best group, the
    scan's rank of it, and how often validation kept the original."""
    out: Dict[str, Dict[str, Any]] = {}
    for shift in dict.fromkeys(r["shift"] for r in results):
        rs = [r for r in results if r["shift"] == shift]
        names = list(rs[0]["runs"])
        gains = {n: [r["runs"][n]["gain"] for r in rs if n in r["runs"]] for n in names}
        groups = [g for g in rs[0]["groups"] if g in gains]
        best = max(groups, key=lambda g: _mean(gains[g])) if groups else None
        ranks = [_rank_of(r["scan_scores"], best) for r in rs] if best else []
        kept = sum(1 for r in rs for run in r["runs"].values() if run["kept_step"] == 0)
        out[shift] = {"gains": gains, "best": best, "ranks": ranks,
                      "before": _mean([r["accuracy_before"] for r in rs]),
                      "flagged": [", ".join(r["flagged"]) for r in rs],
                      "kept_original": kept, "runs": sum(len(r["runs"]) for r in rs),
                      "last_flagged": [r["runs"]["flagged"]["last_gain"] for r in rs]}
    return out


def report(args: argparse.Namespace, results: List[Dict[str, Any]],
           levels: Dict[str, Tuple[Any, Optional[float]]], base: float, ckpt: Path
           ) -> List[str]:
    command = "python -m bench shift " + " ".join(sys.argv[2:])
    device = common.pick_device(args.device)
    lines = common.section_header("shift: repair under distribution shift, flagged groups "
                                  "against the per-group oracle", command, common.git_commit(),
                                  device)
    lines += [f"- checkpoint: `{ckpt.name}`, {base:.1f}% on the clean repair images; repair on "
              f"{args.repair_per_class} shifted CIFAR-10 test images per class (first half of "
              f"the split), probe {args.probe_per_class} per class from the second half; "
              f"`fix` with {args.steps} steps, lr {args.lr}, preservation weight {args.preserve}, "
              f"its validation share (0.2 of the repair images) and kept state; seeds "
              f"{args.seeds}", ""]
    s = summarize(results)
    lines += ["| shift | level (drop) | acc before | flagged (groups) | flagged | first block "
              "(layer1) | last layer (fc) | oracle best group | all | rgn | scan rank of "
              "the oracle's best |", "|---|---|---:|---|---:|---:|---:|---|---:|---:|---|"]
    wins, close = 0, []
    for shift, v in s.items():
        g = v["gains"]
        level, drop = levels.get(shift, (None, None))
        lv = "3 classes permuted" if shift == "labels" else f"{level} (-{drop:.0f})"
        oracle = f"{v['best']} {_spread(g[v['best']])}" if v["best"] else "n/a"
        lines.append(
            f"| {shift} | {lv} | {v['before']:.1f} | {'; '.join(dict.fromkeys(v['flagged']))} "
            f"| {_spread(g.get('flagged', []))} | {_spread(g.get('layer1', []))} | "
            f"{_spread(g.get('fc', []))} | {oracle} | {_spread(g.get('all', []))} | "
            f"{_spread(g.get('rgn', []))} | {', '.join(map(str, v['ranks']))} |")
        if shift != "labels" and g.get("all") and g.get("flagged"):
            wins += _mean(g["flagged"]) >= _mean(g["all"])
        if v["best"] and g.get("flagged"):
            close.append(_mean(g[v["best"]]) - _mean(g["flagged"]))
    corruptions = [x for x in s if x != "labels"]
    lines += ["", "Gains are probe accuracy points after minus before, mean over seeds (range)."]
    if all(g in v["gains"] for v in s.values() for g in results[0]["groups"]):
        lines += ["Per group alone:", "",
                  "| shift | " + " | ".join(results[0]["groups"]) + " |",
                  "|---|" + "---:|" * len(results[0]["groups"])]
        for shift, v in s.items():
            lines.append(f"| {shift} | " + " | ".join(
                f"{_mean(v['gains'][gname]):+.1f}" for gname in results[0]["groups"]) + " |")
    else:
        lines += ["Each group alone was not run (`--selections` left `groups` out): no oracle."]
    lines += ["", f"- flagged >= full fine-tune on {wins} of {len(corruptions)} corruptions "
              "(goal: >= 4 of 5)",
              (f"- flagged {'below' if _mean(close) > 0 else 'above'} the per-group oracle "
               f"by {abs(_mean(close)):.1f} points on average (goal: within 1 below)")
              if close else "- no oracle",
              f"- validation kept the original in {sum(v['kept_original'] for v in s.values())} "
              f"of {sum(v['runs'] for v in s.values())} runs",
              "- the flagged repair's last state, before validation chose a state (mean gain): "
              + ", ".join(f"{k} {_mean([x for x in v['last_flagged'] if x is not None]):+.1f}"
                          for k, v in s.items())]
    return lines
