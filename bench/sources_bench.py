"""Checkpoints from timm and Hugging Face transformers: saved by their library, loaded, scanned.

``python -m bench sources [--timm-sample N] [--seed S] [--max-params P] [--only-timm A,B]
[--only-hf A,B] [--out FILE]``:

* **timm**: every ``test_*`` model plus a seeded random sample of ``N`` of
  ``timm.list_models()`` (models above ``--max-params`` parameters are drawn again). Each is
  built with random weights and 10 classes, its BatchNorm statistics get two training-mode
  passes, and ``model.state_dict()`` is saved as safetensors with no metadata. Then
  ``model-audit scan`` runs through the CLI on 6 random 32x32 images, once with
  ``--arch timm:NAME`` (the tool resizes to the input size of timm's pretrained config) and
  once without ``--arch`` (the architecture guessed from keys and shapes). The guess starts
  from an empty key cache: the first model of each family pays for building the candidates,
  later ones read the cache. Records whether the guess was the model itself, one of several
  listed (timm aliases with the same keys and shapes), or wrong.
* **transformers**: tiny configs of several ``*ForImageClassification`` families, saved with
  ``save_pretrained`` (and an image-processor config), scanned as directories.

Appends a Markdown table to the day's log, ``bench/log/DATE.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

from . import _common as common

SCAN_FLAGS = ["--bootstrap", "0", "--replay-steps", "1", "--baselines", "none"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timm-sample", type=int, default=30,
                        help="timm models drawn at random besides the test_* ones [30]")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw [0]")
    parser.add_argument("--max-params", type=float, default=30e6,
                        help="skip timm models larger than this [30e6]")
    parser.add_argument("--only-timm", default=None,
                        help="comma-separated timm names instead of test_* and the draw")
    parser.add_argument("--only-hf", default=None,
                        help="comma-separated transformers classes [default: all listed]")
    parser.add_argument("--out", type=Path, default=common.DEFAULT_RESULTS,
                        help="Markdown file the result section is appended to")


def _scan(args: List[str], out: Path) -> Dict[str, Any]:
    from click.testing import CliRunner

    from model_audit.cli import cli
    start = time.perf_counter()
    result = CliRunner().invoke(cli, ["scan", *args, "--out", str(out), *SCAN_FLAGS])
    row: Dict[str, Any] = {"exit": result.exit_code,
                           "seconds": round(time.perf_counter() - start, 1),
                           "traceback": result.exception is not None
                           and result.exit_code not in (0, 2)}
    if result.exit_code:
        row["error"] = (result.output.strip().splitlines() or [""])[-1]
    else:
        audit = json.loads((out / "audit.json").read_text())
        row.update(arch=audit["model"]["arch"], groups=[g["name"] for g in audit["layers"]],
                   resize=audit["probe"]["resize"])
    return row


def _listed(guess: Dict[str, Any]) -> str:
    """The architectures a refused guess listed, else its message."""
    error = guess.get("error", "")
    if "fit several: " in error:
        return "several: " + error.split("fit several: ", 1)[1].split("; give --arch")[0]
    return f"exit {guess['exit']}: {error[:200]}"


def _timm_names(args: argparse.Namespace) -> List[str]:
    import timm
    import torch

    if args.only_timm is not None:
        return [n for n in args.only_timm.split(",") if n]
    tests = sorted(timm.list_models("test_*"))
    pool = sorted(set(timm.list_models()) - set(tests))
    rng = random.Random(args.seed)
    rng.shuffle(pool)
    chosen: List[str] = []
    for name in pool:
        if len(chosen) == args.timm_sample:
            break
        with torch.device("meta"):
            params = sum(p.numel() for p in timm.create_model(name, num_classes=10).parameters())
        if params <= args.max_params:
            chosen.append(name)
    return tests + chosen


def _timm_one(name: str, tmp: Path) -> Dict[str, Any]:
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))[-2:]
    model.train()
    try:
        with torch.no_grad():
            for _ in range(2):
                model(torch.rand(2, 3, *size))
    except Exception:  # noqa: BLE001 - a model that cannot take 2 images still gets saved
        pass
    ckpt = tmp / f"{name}.safetensors"
    probe = tmp / f"{name}-probe.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    save_file({"images": torch.rand(6, 3, 32, 32), "labels": torch.arange(6)}, str(probe))
    row: Dict[str, Any] = {"source": "timm", "name": name,
                           "parameters": sum(p.numel() for p in model.parameters())}
    del model
    row["arch"] = _scan([str(ckpt), "--arch", f"timm:{name}", "--probe", str(probe)],
                        tmp / f"{name}-arch")
    row["guess"] = _scan([str(ckpt), "--probe", str(probe)], tmp / f"{name}-guess")
    ckpt.unlink()
    return row


def _hf_configs() -> Dict[str, Callable[[], Any]]:
    import transformers as t

    def labelled(config: Any) -> Any:
        config.num_labels = 10
        return config
    # the tiny transformer encoder shared by the ViT-like families
    vit = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               image_size=32, patch_size=8)
    return {
        "ViTForImageClassification": lambda: labelled(t.ViTConfig(**vit)),
        "DeiTForImageClassification": lambda: labelled(t.DeiTConfig(**vit)),
        "BeitForImageClassification": lambda: labelled(t.BeitConfig(**vit)),
        "Dinov2ForImageClassification": lambda: labelled(t.Dinov2Config(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
            image_size=32, patch_size=8)),
        "ConvNextForImageClassification": lambda: labelled(t.ConvNextConfig(
            hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1])),
        "ConvNextV2ForImageClassification": lambda: labelled(t.ConvNextV2Config(
            hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1])),
        "ResNetForImageClassification": lambda: labelled(t.ResNetConfig(
            embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1])),
        "RegNetForImageClassification": lambda: labelled(t.RegNetConfig(
            embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
            groups_width=8)),
        "SwinForImageClassification": lambda: labelled(t.SwinConfig(
            image_size=32, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
            window_size=4)),
        "MobileViTForImageClassification": lambda: labelled(t.MobileViTConfig(
            image_size=32, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 32,
                                                                          64])),
        "EfficientNetForImageClassification": lambda: labelled(t.EfficientNetConfig(
            image_size=32, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320)),
    }


def _hf_one(name: str, make: Callable[[], Any], tmp: Path) -> Dict[str, Any]:
    import torch
    import transformers as t
    from safetensors.torch import save_file

    row: Dict[str, Any] = {"source": "transformers", "name": name}
    folder = tmp / name
    try:
        torch.manual_seed(0)
        model = getattr(t, name)(make())
        row["parameters"] = sum(p.numel() for p in model.parameters())
        model.save_pretrained(str(folder))
        t.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - a config this transformers cannot build
        row["arch"] = {"exit": None, "error": f"not built: {type(exc).__name__}: {exc}"[:200]}
        return row
    probe = tmp / f"{name}-probe.safetensors"
    save_file({"images": torch.rand(6, 3, 32, 32), "labels": torch.arange(6)}, str(probe))
    row["arch"] = _scan([str(folder), "--probe", str(probe)], tmp / f"{name}-scan")
    return row


def _isolated(kind: str, name: str, tmp: Path) -> Dict[str, Any]:
    """One model's row, computed in a child process: a crash of the interpreter (torch has
    segfaulted in a backward pass of one timm model here) becomes a row of its own instead of
    ending the benchmark."""
    import signal
    import subprocess

    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bench.sources_bench", kind, name, str(tmp)],
                          capture_output=True, text=True, env=os.environ.copy())
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    code = proc.returncode
    why = (f"signal {-code} ({signal.Signals(-code).name})" if code < 0
           else f"exit {code}: {(proc.stderr.strip().splitlines() or [''])[-1][:160]}")
    failed = {"exit": None, "crash": why, "error": f"process crashed: {why}",
              "seconds": round(time.perf_counter() - start, 1), "traceback": True}
    return {"source": kind, "name": name, "arch": failed}


def run(args: argparse.Namespace) -> int:
    command = shlex.join(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    commit = common.git_commit()
    rows: List[Dict[str, Any]] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MODEL_AUDIT_CACHE"] = str(Path(tmp) / "cache")  # start from no cache
        for name in _timm_names(args):
            rows.append(_isolated("timm", name, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
        configs = _hf_configs()
        wanted = args.only_hf.split(",") if args.only_hf is not None else list(configs)
        for name in [n for n in wanted if n]:
            if name not in configs:
                raise SystemExit(f"--only-hf: {name} is not one of {', '.join(configs)}")
            rows.append(_isolated("transformers", name, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    total = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 ** 2
    timm_rows = [r for r in rows if r["source"] == "timm"]
    hf_rows = [r for r in rows if r["source"] == "transformers"]
    scanned = sum(r["arch"]["exit"] == 0 for r in rows)
    tracebacks = sum(bool(r["arch"].get("traceback") or r.get("guess", {}).get("traceback"))
                     for r in rows if not r["arch"].get("crash"))
    guessed = [r for r in timm_rows if "guess" in r]
    right = sum(r["guess"].get("arch") == f"timm:{r['name']}" for r in guessed)
    listed = sum(r["guess"]["exit"] == 2 and f"timm:{r['name']}" in r["guess"].get("error", "")
                 for r in guessed)
    lines = common.section_header("timm and Hugging Face checkpoints: load and scan", command,
                                  commit, "cpu")
    crashed = [f"{r['name']} ({r['arch']['crash']})" for r in rows if r["arch"].get("crash")]
    lines += [
        f"- {scanned} of {len(rows)} scanned ({len(timm_rows)} timm with `--arch timm:NAME`, "
        f"{len(hf_rows)} transformers `save_pretrained` directories); tracebacks: {tracebacks}",
        f"- without `--arch`, timm: the guess was the model itself for {right} of "
        f"{len(guessed)}; for {listed} more it was among several listed (exit 2: "
        "architectures with identical keys and shapes); wrong: "
        f"{len(guessed) - right - listed}",
        f"- interpreter crashes (each model runs in a child process): "
        f"{', '.join(crashed) or 'none'}",
        f"- {total:.0f} s in all, guesses from an empty key cache; peak memory of a model's "
        f"process {peak:.1f} GiB",
        "", "| source | model | parameters | scan | groups | guessed without --arch "
        "| scan s | guess s |", "|---|---|---:|---|---|---|---:|---:|"]
    for r in rows:
        scan = r["arch"]
        status = (f"resize {scan['resize']}" if scan["exit"] == 0
                  else f"exit {scan['exit']}: {scan.get('error', '')[:200]}")
        groups = scan.get("groups") or []
        shown = ", ".join(groups if len(groups) <= 6 else groups[:3] + ["..."] + groups[-2:])
        guess = r.get("guess")
        if scan.get("crash"):
            guessed, guess_s = "-", ""
        elif guess is None:
            guessed, guess_s = "(config.json names it)", ""
        else:
            guessed = guess.get("arch") or _listed(guess)
            guess_s = guess["seconds"]
        lines.append(f"| {r['source']} | {r['name']} | {r.get('parameters', 0):,} | {status} | "
                     f"{len(groups)}: {shown} | {guessed} | {scan.get('seconds', '')} | "
                     f"{guess_s} |")
    if not common.write_section(args.out, lines):
        return 2
    return 0 if scanned == len(rows) and not tracebacks and not crashed else 1


if __name__ == "__main__":  # one model in a child process of run(): its row as JSON
    _kind, _name, _tmp = sys.argv[1:4]
    _row = (_timm_one(_name, Path(_tmp)) if _kind == "timm"
            else _hf_one(_name, _hf_configs()[_name], Path(_tmp)))
    print(json.dumps(_row), flush=True)
