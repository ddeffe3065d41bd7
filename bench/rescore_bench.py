"""``python -m bench rescore``: rankings built from the methods' own scores, scored offline on
the planted cases of ``python -m bench localize --json`` runs (no model is run again).

Every case of a localize run holds each method's per-group scores. This bench ranks the groups
of every case by combinations of them (the candidates for the own metric's small-group blind
spot that need no new measurement: the own metric divided by a power of the group's parameter
share, a mean of ranks, reciprocal rank fusion, the larger of two shares, and the geometric
mean of the own metric's and Auto-RGN's shares, the tool's ``combined`` method) and reports
top-1 and MRR per model and per planted group, beside the methods themselves and chance.
The same cases score every candidate, so the columns compare side by side; candidates chosen on
these cases are chosen in-sample (say so when quoting them).
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Sequence, Tuple

import numpy as np
from scipy.stats import rankdata

from . import _common as common

Scores = Callable[[Dict[str, Any], np.ndarray], np.ndarray]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", required=True,
                        help="comma-separated localize JSON files (python -m bench localize "
                             "--parts planted --json FILE); A+B pools the cases of two runs of "
                             "one model (other seeds)")
    parser.add_argument("--out", type=Path, default=common.DEFAULT_RESULTS,
                        help="Markdown file the section is appended to [default: the day's log]")


def _vec(case: Dict[str, Any], method: str) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in case["scores"][method]], dtype=float)


def _ranks(v: np.ndarray) -> np.ndarray:
    """Rank 1 for the highest score (ties averaged, NaN last)."""
    return rankdata(-np.where(np.isfinite(v), v, -np.inf), method="average")


def _share(v: np.ndarray) -> np.ndarray:
    v = np.clip(np.nan_to_num(v, nan=0.0), 0.0, None)
    return v / v.sum() if v.sum() > 0 else v


def candidates(own: str = "replay_reduction") -> Dict[str, Scores]:
    """Each candidate ranking as a function of a case and the groups' parameter shares."""
    from model_audit.core.attribution import combined_scores
    o = lambda c: _vec(c, own)  # noqa: E731
    r = lambda c: _vec(c, "auto_rgn")  # noqa: E731
    return {
        "own metric": lambda c, sh: o(c),
        "auto_rgn": lambda c, sh: r(c),
        "net_reduction": lambda c, sh: _vec(c, "net_reduction"),
        "own / share^0.5": lambda c, sh: o(c) / np.sqrt(sh),
        "own / share^0.25": lambda c, sh: o(c) / sh ** 0.25,
        "mean rank (own, rgn)": lambda c, sh: -(_ranks(o(c)) + _ranks(r(c))) + 1e-9 * o(c),
        "reciprocal rank fusion (k=1)": lambda c, sh: 1 / (1 + _ranks(o(c))) + 1 / (1 + _ranks(r(c))),
        "max of shares (own, rgn)": lambda c, sh: np.maximum(_share(o(c)), _share(r(c))),
        "combined: geometric mean (own, rgn)": lambda c, sh: combined_scores(o(c), r(c)),
        "alone_net (group-alone steps, net)": lambda c, sh: _vec(c, "alone_net"),
        "alone_errors (group-alone steps)": lambda c, sh: _vec(c, "alone_errors"),
        "geometric mean (alone_net, rgn)": lambda c, sh: combined_scores(_vec(c, "alone_net"),
                                                                         r(c)),
        # The trust-region candidates (localize --candidates kl), alone and with Auto-RGN
        "kl_0.01 (trust region)": lambda c, sh: _vec(c, "kl_0.01"),
        "kl_0.1 (trust region)": lambda c, sh: _vec(c, "kl_0.1"),
        "geometric mean (kl_0.1, rgn)": lambda c, sh: combined_scores(_vec(c, "kl_0.1"), r(c)),
        "geometric mean (kl_0.1, alone_net)": lambda c, sh: combined_scores(
            _vec(c, "kl_0.1"), _vec(c, "alone_net")),
        # References a user does not have: each share over the unmodified model's own share
        # (the run's null scan), an upper bound for any self-normalisation of the scores
        "alone_net / unmodified (oracle)": lambda c, sh: _over_null(c, "alone_net"),
        "auto_rgn / unmodified (oracle)": lambda c, sh: _over_null(c, "auto_rgn"),
        "geometric mean of both / unmodified (oracle)": lambda c, sh: np.sqrt(
            _over_null(c, "alone_net") * _over_null(c, "auto_rgn")),
    }


def _over_null(case: Dict[str, Any], method: str) -> np.ndarray:
    """``method``'s share in ``case`` over its share in the unmodified model's scan."""
    null = _vec({"scores": case["null_scores"]}, method)
    return _share(_vec(case, method)) / np.maximum(_share(null), 1e-9)


def _rank_stats(scores: np.ndarray, true: int) -> Tuple[float, float]:
    from model_audit.core.scoring import rank_stats
    _, top1, rr = rank_stats(scores, true)
    return top1, rr


def _load(spec: str) -> Dict[str, Any]:
    """The planted part of one localize JSON, or of several of the same model joined by ``+``
    (runs of other seeds: their cases are pooled)."""
    parts = [json.loads(gzip.decompress(Path(p).read_bytes()) if p.endswith(".gz")
                        else Path(p).read_text())["planted"] for p in spec.split("+")]
    for part in parts:   # each case keeps its own run's unmodified scan (probes differ)
        null = (part.get("null") or {}).get("scores", {})
        part["cases"] = [{**c, "null_scores": null} for c in part["cases"]]
    data = dict(parts[0])
    for other in parts[1:]:
        if other["groups"] != data["groups"]:
            raise ValueError(f"{spec}: the runs have different groups")
        data["cases"] = list(data["cases"]) + list(other["cases"])
    return data


def score_run(path: str) -> Dict[str, Any]:
    data = _load(str(path))
    groups, shares = data["groups"], np.array(data["shares"])
    cases = [c for c in data["cases"] if c["reached"]]
    table: Dict[str, Dict[str, Any]] = {}
    for name, fn in candidates().items():
        top1, rr, by, seeds = [], [], {}, {}  # type: ignore[var-annotated]
        try:
            [fn(case, shares) for case in cases]
        except KeyError:  # a method one of the runs did not record (an older localize run)
            continue
        for case in cases:
            t, m = _rank_stats(fn(case, shares), groups.index(case["group"]))
            top1.append(t)
            rr.append(m)
            by.setdefault(case["group"], []).append(t)
            seeds.setdefault(case.get("seed", 0), []).append(t)
        per_seed = [float(np.mean(v)) for v in seeds.values()]
        table[name] = {"top1": float(np.mean(top1)), "mrr": float(np.mean(rr)),
                       "top1_sd": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else None,
                       "by_group": {g: float(np.mean(v)) for g, v in by.items()}}
    return {"model": data["model"], "probe": data["probe"], "groups": groups,
            "cases": len(cases), "chance": data["chance"], "table": table}


def _cell(row: Dict[str, Any]) -> str:
    sd = f" (sd {row['top1_sd']:.2f} over seeds)" if row.get("top1_sd") is not None else ""
    return f"{row['top1']:.2f} / {row['mrr']:.2f}{sd}"


def markdown(runs: Sequence[Dict[str, Any]], command: str, commit: str) -> str:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## {when} — rescore: rankings combined from the localize runs' "
             "scores, offline", "", f"- command: `{command}`", f"- commit: `{commit}`",
             "- the planted cases of: " + "; ".join(
                 f"{r['model']} ({r['cases']} cases, probe {r['probe']})" for r in runs), "",
             "| ranking | " + " | ".join(f"{r['model']} top-1 / MRR" for r in runs) + " |",
             "|---|" + "---:|" * len(runs)]
    names = list(dict.fromkeys(n for r in runs for n in r["table"]))
    for name in names:
        lines.append(f"| {name} | " + " | ".join(
            _cell(r["table"][name]) if name in r["table"] else "-" for r in runs) + " |")
    lines.append("| chance | " + " | ".join(
        f"{r['chance'][0]:.2f} / {r['chance'][1]:.2f}" for r in runs) + " |")
    for r in runs:
        lines += ["", f"Top-1 by planted group, {r['model']}:", "",
                  "| ranking | " + " | ".join(r["groups"]) + " |",
                  "|---|" + "---:|" * len(r["groups"])]
        for name, row in r["table"].items():
            lines.append(f"| {name} | " + " | ".join(
                f"{row['by_group'][g]:.2f}" if g in row["by_group"] else "-"
                for g in r["groups"]) + " |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    from model_audit.errors import ConfigError
    paths = [p.strip() for p in args.json.split(",") if p.strip()]
    missing = [f for p in paths for f in p.split("+") if not Path(f).is_file()]
    if missing or not paths:
        raise ConfigError(f"no localize JSON at {', '.join(missing) or '(none given)'}: write "
                          "one with python -m bench localize --parts planted --json FILE")
    runs = [score_run(p) for p in paths]
    section = markdown(runs, "python -m bench rescore " + " ".join(sys.argv[2:]),
                       common.git_commit())
    print(section)
    common.append_results(args.out, section)
    return 0
