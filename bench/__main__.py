"""``python -m bench scan [...]``: the project's benchmarks (see ``bench/scan_bench.py``).

Each benchmark is a module ``bench/<name>_bench.py`` with ``add_arguments(parser)`` and
``run(args) -> exit code``; ``compare`` is registered when ``bench/compare_bench.py`` exists.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

BENCHMARKS = {
    "scan": "time `scan` on the reference ResNet-18 against its floor; baselines' cost",
    "compare": "SGD vs Adam reference flagged sets (whole split, disjoint probes); --train",
    "baselines": "the own metric against each Captum baseline: cost ratio and rank agreement",
    "fix": "repair of the flagged groups vs all/random/Auto-RGN on test halves; --sweep",
    "cuda": "scan, baselines and fix on the CPU and on CUDA: do they agree?",
    "train": "epochs to 90%%/95%% test accuracy: sgd, nesterov, beta, hybrid, adam",
    "torchvision": "every torchvision classifier saved at its defaults: load, scan, guess the arch",
    "sources": "timm models and transformers directories saved by their library: scan, guess",
    "tabular": "a non-image model (MLP on digits rows): scan, compare, sanity, fix, 5 seeds",
    "distributed": "1 process vs torchrun ranks: time, parallel efficiency, same answer, memory",
    "localize": "ground truth: is a planted defect or a shift's best group ranked first?",
    "rescore": "rankings combined from localize runs' scores (ensembles), scored offline",
    "shift": "repair under CIFAR-10-C corruptions and a label shift: flagged vs the per-group oracle",
    "bisect": "exact regression bisection on releases fine-tuned with a known bug in their data",
    "numerics": "the golden runs under emulated CPUs and thread counts: how far answers move",
    "vgg": "a fourth architecture (VGG-style CNN on the digits) to localise planted faults in",
}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench",
                                     description="model-audit benchmarks")
    sub = parser.add_subparsers(dest="bench", metavar="BENCH")
    sub.required = True
    modules = {}
    for name, help_text in BENCHMARKS.items():
        try:
            module = importlib.import_module(f"{__package__ or 'bench'}.{name}_bench")
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.endswith(f"{name}_bench"):
                continue  # that benchmark is not in this checkout
            raise
        modules[name] = module
        doc = (module.__doc__ or "").strip().split("\n\n")[0] or None
        module.add_arguments(sub.add_parser(name, help=help_text, description=doc))
    args = parser.parse_args(argv)
    from model_audit.errors import AuditError
    try:
        return int(modules[args.bench].run(args))
    except AuditError as exc:  # a bad argument or input: the message says what to do
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
