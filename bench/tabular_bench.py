"""A non-image classifier end to end: an MLP on scikit-learn's digits as 64-feature rows.

``python -m bench tabular [--seeds N (5)] [--out FILE]``: the digits (1,797 rows, 10 classes,
features / 16) are split once (seed 0) into 900 training rows, 450 repair rows and a probe of
447, saved as tensor probes of ``inputs``. For each seed an MLP (fc1, fc2, fc3, head; the
factory ``bench.tabular_bench:make_mlp``) is trained with SGD (momentum 0.9) and with Adam,
then through the CLI:

* ``scan`` of both (accuracy, flagged groups, seconds);
* ``compare`` of the two (flagged-set Jaccard, Spearman of the scores);
* ``sanity`` of the SGD model: noise and re-initialisation planted in each group in turn,
  calibrated to a 10-point accuracy drop; the planted group's top-1 rate under the own metric
  and the baselines, beside chance (1 / 4 groups): is the answer true on a non-image model?
* ``fix`` of the SGD model's flagged groups on the repair rows against the controls (all
  groups, random, Auto-RGN) with the same budget: fixed, broken, net on the probe.

Appends a Markdown section to the day's log, ``bench/log/DATE.md``.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import torch
from torch import nn

from model_audit.render.text import num

from . import _common as common

FACTORY = "bench.tabular_bench:make_mlp"


class MLP(nn.Module):
    """64 features -> 64 -> 32 -> 32 -> classes, ReLU between."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 64), nn.Linear(64, 32)
        self.fc3, self.head = nn.Linear(32, 32), nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc2(torch.relu(self.fc1(x))))
        return self.head(torch.relu(self.fc3(x)))


def make_mlp(num_classes: int) -> nn.Module:
    return MLP(num_classes)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=int, default=5, help="training seeds [5]")
    parser.add_argument("--out", type=Path, default=common.DEFAULT_RESULTS,
                        help="Markdown file the result section is appended to")


def _data(tmp: Path) -> Dict[str, Any]:
    from safetensors.torch import save_file
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    out: Dict[str, Any] = {"x": x[:900], "y": y[:900]}
    classes = json.dumps([str(i) for i in range(10)])
    for name, rows in (("repair", slice(900, 1350)), ("probe", slice(1350, None))):
        out[name] = tmp / f"{name}.safetensors"
        save_file({"inputs": x[rows].contiguous(), "labels": y[rows].contiguous()},
                  str(out[name]), metadata={"classes": classes})
    return out


def _train(method: str, seed: int, x: torch.Tensor, y: torch.Tensor, path: Path) -> None:
    from model_audit.models.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    model = make_mlp(10)
    opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if method == "sgd"
           else torch.optim.Adam(model.parameters(), lr=3e-3))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(150):  # minibatches of 64: about 10 epochs
        idx = torch.randint(0, len(y), (64,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    save_checkpoint(model.state_dict(), path)


def _cli(*args: Any) -> Dict[str, Any]:
    from click.testing import CliRunner

    from model_audit.cli import cli
    start = time.perf_counter()
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exit_code not in (0, 1, 3):  # fix: 3 = no repair beat the original
        raise RuntimeError(f"{args[0]} failed ({result.exit_code}): {result.output[-800:]}")
    return {"seconds": round(time.perf_counter() - start, 1), "output": result.output}


def _one_seed(seed: int, data: Dict[str, Any], tmp: Path) -> Dict[str, Any]:
    row: Dict[str, Any] = {"seed": seed}
    for method in ("sgd", "adam"):
        ckpt = tmp / f"mlp-{method}-{seed}.safetensors"
        _train(method, seed, data["x"], data["y"], ckpt)
        out = tmp / f"scan-{method}-{seed}"
        run = _cli("scan", ckpt, "--arch", FACTORY, "--probe", data["probe"], "--seed", seed,
                   "--out", out, "--quiet")
        audit = json.loads((out / "audit.json").read_text())
        row[method] = {"accuracy": audit["probe"]["accuracy"],
                       "errors": audit["probe"]["misclassified"],
                       "flagged": [g["name"] for g in audit["layers"] if g["flagged"]],
                       "seconds": run["seconds"]}
    cmp_out = tmp / f"compare-{seed}"
    _cli("compare", tmp / f"scan-sgd-{seed}" / "audit.json",
         tmp / f"scan-adam-{seed}" / "audit.json", "--out", cmp_out, "--quiet")
    cmp = json.loads((cmp_out / "compare.json").read_text())
    row["compare"] = {"jaccard": cmp["jaccard"],
                      "spearman": cmp["correlation"]["score"]["spearman"]}
    sgd = tmp / f"mlp-sgd-{seed}.safetensors"
    san_out = tmp / f"sanity-{seed}"
    run = _cli("sanity", sgd, "--arch", FACTORY, "--probe", data["probe"], "--seed", seed,
               "--out", san_out, "--quiet")
    san = json.loads((san_out / "sanity.json").read_text())
    row["sanity"] = {"methods": {m: {"top1": v.get("top1"), "n": v.get("n")}
                                 for m, v in san["methods"].items()},
                     "chance": (san.get("chance") or {}).get("top1"),
                     "seconds": run["seconds"]}
    fix_out = tmp / f"fix-{seed}"
    run = _cli("fix", sgd, "--arch", FACTORY, "--probe", data["probe"], "--train",
               data["repair"], "--audit", tmp / f"scan-sgd-{seed}" / "audit.json",
               "--seed", seed, "--output", tmp / f"fixed-{seed}.safetensors", "--out", fix_out,
               "--quiet")
    fix = json.loads((fix_out / "fix.json").read_text())
    row["fix"] = [{"name": s["name"], "groups": s["groups"], "fixed": s["fixed"],
                   "broken": s["broken"], "net": s["net"], "kept_step": s["kept_step"]}
                  for s in [fix["selection"]] + list(fix["controls"])]
    row["fix_seconds"] = run["seconds"]
    return row


def run(args: argparse.Namespace) -> int:
    command = shlex.join(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    commit = common.git_commit()
    torch.set_num_threads(2)
    rows: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        data = _data(Path(tmp))
        for seed in range(args.seeds):
            rows.append(_one_seed(seed, data, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    lines = common.section_header("a non-image model: MLP on scikit-learn digits rows", command,
                                  commit, "cpu")
    methods = list(rows[0]["sanity"]["methods"])
    lines += ["- probe: 447 rows of 64 features (tensor probe of `inputs`), repair: 450 "
              "other rows; groups fc1, fc2, fc3, head; chance top-1 of a planted group "
              f"{rows[0]['sanity']['chance']}", "",
              "| seed | SGD acc | Adam acc | SGD flagged | Adam flagged | Jaccard | Spearman |"
              " scan s |", "|---:|---:|---:|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['sgd']['accuracy']:.3f} | {r['adam']['accuracy']:.3f}"
                     f" | {', '.join(r['sgd']['flagged']) or '-'} | "
                     f"{', '.join(r['adam']['flagged']) or '-'} | "
                     f"{num(r['compare']['jaccard'])} | "
                     f"{num(r['compare']['spearman'])} | {r['sgd']['seconds']} |")
    lines += ["", "sanity (planted noise and re-initialisation, 10-point drop, each group):", "",
              "| seed | " + " | ".join(f"{m} top-1 (n)" for m in methods) + " | s |",
              "|---:|" + "---:|" * (len(methods) + 1)]
    for r in rows:
        cells = [f"{num(r['sanity']['methods'][m]['top1'])} "
                 f"({r['sanity']['methods'][m]['n']})" for m in methods]
        lines.append(f"| {r['seed']} | " + " | ".join(cells) + f" | {r['sanity']['seconds']} |")
    lines += ["", "fix of the SGD model's flagged groups vs controls (same budget; probe rows):",
              "", "| seed | selection | groups | fixed | broken | net |",
              "|---:|---|---|---:|---:|---:|"]
    for r in rows:
        for s in r["fix"]:
            groups = s["groups"] if isinstance(s["groups"], list) else [s["groups"]]
            lines.append(f"| {r['seed']} | {s['name']} | {', '.join(map(str, groups))} | "
                         f"{s['fixed']} | {s['broken']} | {s['net']:+d} |")
    if not common.write_section(args.out, lines):
        return 2
    return 0
