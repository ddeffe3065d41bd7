"""``python -m bench localize``: does the flag point at the cause? Ground-truth localization.

Three kinds of cases whose responsible layer group is known:

1. **Planted defects** (``--parts planted``): from a trained checkpoint, ONE group at a time
   is damaged (``model_audit.core.plant``: Gaussian weight noise, interpolation toward a fresh
   initialisation, the group alone fine-tuned on a class-pair label swap, shifted BatchNorm
   statistics), with the severity calibrated on the probe so that every case costs the same
   accuracy drop (``--drop``). Every group x every applicable defect x ``--seeds`` seeds. The
   damaged copy is scanned and every method's rank of the damaged group is recorded: top-1,
   mean reciprocal rank (MRR), and for the own metric's flag rules the flag hit (the damaged
   group is flagged) and the flagged set's size. The case loop is the library's
   (``model_audit.commands.sanity.run_cases``), the one ``model-audit sanity`` runs.
2. **Null**: the unmodified model, scanned the same way: what scores and flags look like when
   nothing was planted.
3. **Shifts with an oracle** (``--parts shifts``), after surgical fine-tuning (Lee et al. 2023):
   input-level shifts (Gaussian noise, blur, low contrast, JPEG at high severity) and an
   output-level one (the labels of three classes permuted) applied to ``--shift-train`` +
   ``--shift-eval`` images of the probe's source. The oracle fine-tunes each group alone on
   the shifted training images with the product's repair (``fix``'s trainer: SGD, cosine
   learning rate, beta momentum, BatchNorm in train mode inside the selection) at a fixed
   budget for each of ``--shift-lrs`` and takes the best held-out accuracy gain. Ground truth:
   the group with the best gain (and the groups within noise of it). Each method scans the
   shifted training images; scored by Spearman with the gains and by regret (best gain minus
   the gain of the group it ranks first). ``fix --layers auto`` (the flagged groups, same
   trainer and budget) is compared against the oracle's group, a random group (the mean gain
   over groups) and the full fine-tune.

Methods: the own metric (``replay_reduction``) and its size-normalised variants, every
baseline asked for (``--baselines``), their per-output-unit forms, Auto-RGN and a seeded
random ranking. Chance levels: top-1 ``1/G``, MRR ``H_G/G``.

``--checkpoint reference-sgd`` / ``reference-adam`` are the fully trained ResNet-18s of
``../shared/models`` (probe: a stratified subset of the CIFAR-10 test split); any other
checkpoint with ``--probe`` works too (e.g. the committed digits samples).
"""
from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import _common as common
from . import cifar

SHIFTS = ("gaussian_noise", "blur", "contrast", "jpeg", "labels")
PARTS = ("planted", "shifts")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_checkpoint_argument(parser)
    parser.add_argument("--probe", type=Path, default=None,
                        help="probe (ImageFolder or .safetensors) [default: the CIFAR-10 test "
                             "split, cut from --data]")
    parser.add_argument("--arch", default=None, help="architecture (reference: resnet18-cifar)")
    parser.add_argument("--normalize", default=None, help="normalisation (reference: cifar10)")
    parser.add_argument("--probe-size", type=int, default=500,
                        help="stratified probe images for the planted cases [default: 500]")
    parser.add_argument("--parts", default="planted,shifts",
                        help="planted, shifts or both [default: both]")
    parser.add_argument("--defects", default="all", help="defects to plant [default: all]")
    parser.add_argument("--groups", default=None, help="groups to plant in [default: all]")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per case [default: 3]")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="the planted cases' first seed (seeds FIRST..FIRST+SEEDS-1), to "
                             "add seeds to an earlier run [default: 0]")
    parser.add_argument("--candidates", choices=("all", "alone", "kl"), default="all",
                        help="candidate formulations computed beside the scan: all, only "
                             "replay_reduction and the group-alone ones (faster), or only the "
                             "trust-region ones (kl_*) [default: all]")
    parser.add_argument("--drop", type=float, default=0.10,
                        help="accuracy drop of every planted defect [default: 0.10]")
    parser.add_argument("--tolerance", type=float, default=0.01,
                        help="accepted distance from the target drop [default: 0.01]")
    parser.add_argument("--baselines", default="grad_x_activation,activation,auto_rgn",
                        help="baselines beside the own metric [default: the cheap three]")
    parser.add_argument("--baseline-steps", type=int, default=50,
                        help="n_steps of the path baselines [default: 50]")
    parser.add_argument("--shifts", default=",".join(SHIFTS),
                        help=f"shift cases [default: {','.join(SHIFTS)}]")
    parser.add_argument("--shift-train", type=int, default=1000,
                        help="shifted images to scan and fine-tune on [default: 1000]")
    parser.add_argument("--shift-eval", type=int, default=1000,
                        help="held-out shifted images for the oracle's gain [default: 1000]")
    parser.add_argument("--shift-steps", type=int, default=40,
                        help="fine-tuning steps of the oracle and of fix [default: 40]")
    parser.add_argument("--shift-batch", type=int, default=64, help="[default: 64]")
    parser.add_argument("--shift-lrs", default="0.003,0.01,0.03",
                        help="learning rates of the oracle (best taken) [default: "
                             "0.003,0.01,0.03]")
    parser.add_argument("--metric", default=None,
                        help="the scan's own metric (the other formulations are computed "
                             "beside it from the same replay) [default: the tool's default]")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write every case as JSON here")
    common.add_common_arguments(parser)


# ------------------------------------------------------------------------------------------
# Inputs


def _resolve_inputs(args: argparse.Namespace) -> Tuple[Path, Path, Optional[str], Optional[str]]:
    path, arch, normalize = common.resolve_checkpoint(args.checkpoint, args.arch, args.normalize)
    probe = args.probe
    if probe is None:  # the CIFAR-10 test split (all 10,000 images; --probe-size subsets it)
        kwargs = {"tarball": args.data} if args.data else {}
        probe = cifar.cifar_subset(args.cache_dir or common.default_cache_dir(), "test", 1000,
                                   **kwargs)
    return path, Path(probe), arch, normalize


def _scan_config(args: argparse.Namespace, arch, normalize, limit, seed=0):
    from model_audit import AuditOptions, ScanConfig

    return ScanConfig(options=AuditOptions(arch=arch, normalize=normalize, limit=limit,
                                           seed=seed, device=common.pick_device(args.device)),
                      baselines=tuple(b for b in args.baselines.split(",") if b),
                      baseline_steps=args.baseline_steps,
                      metric=args.metric or ScanConfig.metric)


# ------------------------------------------------------------------------------------------
# Flag rules (judged here, on the same cases)


def flag_rules(scores: np.ndarray, shares: np.ndarray, null_high: Optional[np.ndarray]
               ) -> Dict[str, np.ndarray]:
    """Candidate flag rules of the own metric, given its scores (shares of the reduction)."""
    from model_audit.core.attribution import flag_rule
    g = len(scores)
    rules = {"share_and_equal": scores > np.maximum(shares, 1.0 / g),   # the rule until 12-03
             "share_or_top": flag_rule(scores, shares),                  # the tool's rule now
             "equal": scores > 1.0 / g,
             "top1": scores >= scores.max() if scores.max() > 0 else np.zeros(g, bool)}
    if null_high is not None:
        rules["above_null"] = scores > null_high
    return rules


def _rule_stats(cases: Sequence[Any], names: Sequence[str], shares: np.ndarray,
                null_high: Optional[np.ndarray], null_scores: Optional[np.ndarray],
                metric: str) -> Dict[str, Dict[str, Any]]:
    out: Dict[str, Dict[str, Any]] = {}
    for case in cases:
        raw = np.array([v if v is not None else 0.0 for v in case.scores[metric]])
        s = raw / raw.sum() if raw.sum() > 0 else raw   # shares, as the scan reports them
        for rule, flags in flag_rules(s, shares, null_high).items():
            row = out.setdefault(rule, {"hit": [], "size": []})
            row["hit"].append(bool(flags[list(names).index(case.plant.group)]))
            row["size"].append(int(flags.sum()))
    for rule, row in out.items():
        row["flag_hit"] = float(np.mean(row["hit"])) if row["hit"] else None
        row["flagged_size"] = float(np.mean(row["size"])) if row["size"] else None
        if null_scores is not None:
            ns = null_scores / null_scores.sum() if null_scores.sum() > 0 else null_scores
            row["null_flags"] = int(flag_rules(ns, shares, null_high)[rule].sum())
    return out


# ------------------------------------------------------------------------------------------
# Candidate metrics, computed from the scan's own replay


def candidate_scores(ckpt: Any, result: Any) -> Dict[str, np.ndarray]:
    """The own metric's other formulations, from the scan's own replay displacement.

    ``replay_reduction``: the errors' loss removed by each group's replay step;
    ``net_reduction``: errors and twice as many correct images, the best displacement scale
    per group; ``net_reduction_scale1``: the same images at the replay's own scale and
    ``replay_reduction_best_scale``: errors only at the best scale (the two ablations, to see
    which change matters). The scan's own metric is left as the scan computed it.
    """
    from model_audit.core.attribution import (NET_SCALES, group_net_reductions, net_positions,
                                              scores_from_reductions)
    from model_audit.core.layers import layer_groups
    from model_audit.io.probe import BatchCache
    if result.replay is None:
        return {}
    opts = result.config.options
    groups = layer_groups(ckpt.model, opts.granularity)
    errors = result.evaluation.misclassified
    err_batches = BatchCache(result.probe, errors, opts.batch_size)
    positions = net_positions(result.evaluation.n, errors, opts.seed)
    batches = BatchCache(result.probe, positions, opts.batch_size)
    _, means = group_net_reductions(ckpt.model, batches, result.replay.displacement, groups,
                                    device=result.device)
    _, err_means = group_net_reductions(ckpt.model, err_batches, result.replay.displacement,
                                        groups, device=result.device)
    clip = lambda v: np.clip(np.nan_to_num(v, nan=0.0), 0.0, None)  # noqa: E731
    out = {"net_reduction": scores_from_reductions(clip(np.nanmax(means, axis=1))),
           "net_reduction_scale1": clip(means[:, list(NET_SCALES).index(1.0)]),
           "replay_reduction_best_scale": clip(np.nanmax(err_means, axis=1))}
    out.update(alone_candidates(ckpt, result))
    out.pop(result.config.metric, None)
    return out


def alone_candidates(ckpt: Any, result: Any) -> Dict[str, np.ndarray]:
    """``--candidates alone``: the group-alone scores and ``replay_reduction`` (when the scan's
    own metric is another), without the net-reduction ablations."""
    from model_audit.core.attribution import group_reductions, scores_from_reductions
    from model_audit.core.layers import layer_groups
    from model_audit.io.probe import BatchCache
    if result.replay is None:
        return {}
    out: Dict[str, np.ndarray] = {}
    if result.config.metric != "replay_reduction":
        opts = result.config.options
        groups = layer_groups(ckpt.model, opts.granularity)
        err = BatchCache(result.probe, result.evaluation.misclassified, opts.batch_size)
        r = group_reductions(ckpt.model, err, result.replay.displacement, groups,
                             device=result.device)
        out["replay_reduction"] = scores_from_reductions(r.matrix.numpy().mean(axis=0))
    out.update(alone_scores(ckpt, result))
    out.pop(result.config.metric, None)
    return out


def alone_scores(ckpt: Any, result: Any) -> Dict[str, np.ndarray]:
    """Candidates ``alone_errors`` and ``alone_net``: the group-alone steps of
    :mod:`model_audit.core.alone` (the tool's ``alone_net`` metric), scored on the errors'
    rows only and on all rows (the errors and twice as many correct images)."""
    from model_audit.core.alone import group_alone_reductions
    from model_audit.core.attribution import error_rows, metric_shares, net_positions
    from model_audit.core.layers import layer_groups
    from model_audit.io.probe import BatchCache
    opts = result.config.options
    errors = result.evaluation.misclassified
    if not errors:
        return {}
    if result.config.metric == "alone_net":  # the scan computed them already
        rows, r = list(result.metric_positions), result.reductions.matrix.numpy()
    else:
        model = ckpt.model.to(result.device).eval()
        rows = net_positions(result.evaluation.n, errors, opts.seed)
        r = group_alone_reductions(model, BatchCache(result.probe, errors, opts.batch_size),
                                   BatchCache(result.probe, rows, opts.batch_size),
                                   layer_groups(model, opts.granularity),
                                   device=result.device).matrix.numpy()
        model.cpu()
    mask = error_rows(rows, errors)
    mask = np.ones(len(rows), dtype=bool) if mask is None else mask
    return {"alone_errors": metric_shares(r[mask]), "alone_net": metric_shares(r, mask)}


#: Budgets of the trust-region candidates: the mean KL divergence (nats) of the correct
#: images' predicted distributions that each group's step along its error gradient may cause.
KL_BUDGETS = (0.01, 0.1)
KL_BRACKET, KL_SEARCH = 12, 8   # bracketing and bisection steps per group and budget


def kl_scores(ckpt: Any, result: Any) -> Dict[str, np.ndarray]:
    """``--candidates kl``: how much of the errors' loss each group alone removes for a fixed
    amount of collateral change.

    Per group ``g``: the direction ``d`` of steepest descent of the errors' mean loss in
    ``g``'s parameters (every other parameter at ``theta_0``); the step ``t`` along it at
    which the mean KL divergence of the correct images' predictions (a seeded sample of twice
    as many as the errors, as ``alone_net`` uses) from ``theta_0``'s reaches the budget; the
    score is the errors' mean loss removed at that step (clipped at 0). Every group is held
    to the same change of what the model gets right, so a large group's capacity to overfit
    the errors buys it nothing: a group scores high when its own gradient removes error loss
    without moving the correct images (the trust-region reading of Fisher normalisation).
    """
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call

    from model_audit.core.attribution import net_positions
    from model_audit.core.layers import layer_groups
    from model_audit.core.replay import detached_params, per_sample_losses, summed_gradients
    from model_audit.io.probe import BatchCache
    opts, device = result.config.options, result.device
    errors = result.evaluation.misclassified
    if not errors:
        return {}
    wrong = set(errors)
    correct = [p for p in net_positions(result.evaluation.n, errors, opts.seed)
               if p not in wrong]
    if not correct:
        return {}
    model = ckpt.model.to(device).eval()
    err = BatchCache(result.probe, errors, opts.batch_size)
    right = BatchCache(result.probe, correct, opts.batch_size)
    theta0 = detached_params(model, device)

    def logits(theta: Dict[str, Any], cache: Any) -> "torch.Tensor":
        with torch.no_grad():
            return torch.cat([functional_call(model, theta, (x.to(device),), strict=False)
                              .float() for _, x, _ in cache])

    def error_loss(theta: Dict[str, Any]) -> float:
        return float(per_sample_losses(model, theta, err, device)[0].mean())

    logp0 = F.log_softmax(logits(theta0, right), 1)
    loss0 = error_loss(theta0)
    cols: Dict[float, list] = {b: [] for b in KL_BUDGETS}
    for group in layer_groups(model, opts.granularity):
        names = [k for k in group.parameter_names if theta0[k].is_floating_point()]
        work = {k: (v.clone().requires_grad_(True) if k in names else v)
                for k, v in theta0.items()}
        with torch.enable_grad():
            grads, _, n = summed_gradients(
                lambda x: functional_call(model, work, (x,), strict=False),
                {k: work[k] for k in names}, err, device) if names else ({}, 0.0, 1)
        norm = float(sum(float(g.double().pow(2).sum()) for g in grads.values())) ** 0.5
        if not names or not norm > 0:
            for b in KL_BUDGETS:
                cols[b].append(0.0)
            continue
        w = float(sum(float(theta0[k].double().pow(2).sum()) for k in names)) ** 0.5 or 1.0

        def moved(t: float) -> Dict[str, Any]:
            return {k: (v - t * grads[k] / norm if k in names else v) for k, v in theta0.items()}

        def kl(t: float) -> float:
            lp = F.log_softmax(logits(moved(t), right), 1)
            return float((logp0.exp() * (logp0 - lp)).sum(1).mean())

        for b in KL_BUDGETS:
            # bracket the budget by factors of 4 from a step of the group's own norm, then
            # bisect in log step length; t is the longest step found within the budget
            lo, hi = (w, 4 * w) if kl(w) < b else (w / 4, w)
            for _ in range(KL_BRACKET):
                if hi > w and kl(hi) < b:
                    lo, hi = hi, 4 * hi
                elif hi <= w and kl(lo) >= b:
                    lo, hi = lo / 4, lo
                else:
                    break
            for _ in range(KL_SEARCH):
                mid = (lo * hi) ** 0.5
                lo, hi = (mid, hi) if kl(mid) < b else (lo, mid)
            t = lo if kl(lo) < b else 0.0
            removed = loss0 - error_loss(moved(t))
            cols[b].append(max(removed, 0.0) if np.isfinite(removed) else 0.0)
    model.cpu()
    out = {}
    for b in KL_BUDGETS:
        v = np.array(cols[b])
        out[f"kl_{b:g}"] = v / v.sum() if v.sum() > 0 else v
    return out


def _null_scores(null: Any, metric: str) -> Optional[np.ndarray]:
    if metric not in null.scores:
        return None
    return np.array([v or 0.0 for v in null.scores[metric]])


# ------------------------------------------------------------------------------------------
# Planted defects


def run_planted(args, ckpt_path, probe_path, arch, normalize) -> Dict[str, Any]:
    from model_audit.core.layers import layer_groups
    from model_audit.options import load_inputs
    from model_audit.core.plant import resolve_defects
    from model_audit.commands.sanity import plan_cases, run_cases, select_groups
    from model_audit.core.scoring import chance_levels, group_output_units
    from model_audit.results.sanity import SanityConfig, summarize

    scan_config = _scan_config(args, arch, normalize, args.probe_size)
    ckpt, probe, _ = load_inputs(ckpt_path, probe_path, scan_config.options)
    groups = layer_groups(ckpt.model)
    config = SanityConfig(defects=resolve_defects(args.defects), drop=args.drop,
                          tolerance=args.tolerance, repeats=args.seeds, scan=scan_config,
                          groups=tuple(args.groups.split(",")) if args.groups else None)
    config.validate(groups)
    chosen, _ = select_groups(groups, config)
    plan, skipped = plan_cases(ckpt.model, chosen, config, args.first_seed)
    units = group_output_units(ckpt.model, groups, probe.load([0]))
    print(f"localize: {len(plan)} planted cases + the null case on {len(probe)} probe images "
          f"({len(groups)} groups; not applicable: {len(skipped)})", flush=True)
    start = time.perf_counter()

    def report(done: int, total: int, case: Any) -> None:
        p = case.plant
        print(f"  [{done}/{total}] {p.group:>8} {p.defect:<9} seed {p.seed}: severity "
              f"{p.severity:.3g}, drop {100 * p.drop:.1f}{'' if p.reached else ' (NOT reached)'}"
              f"; rank " + ", ".join(f"{case.ranks[m]:.1f} ({m})" for m in
                                      ("replay_reduction", "net_reduction", "alone_net")
                                      if m in case.ranks)
              + ", flagged "
              f"{','.join(case.flagged)} "
              f"({case.seconds:.0f} s, {time.perf_counter() - start:.0f} s in all)", flush=True)

    cases, null = run_cases(ckpt, probe, groups, plan, config,
                            device=scan_config.options.device, on_case=report, units=units,
                            extra={"alone": alone_candidates, "kl": kl_scores}.get(
                                args.candidates, candidate_scores))
    methods = list(cases[0].scores) if cases else []
    shares = np.array([g.share for g in groups])
    own = scan_config.metric
    # The null bound: the unmodified model's own-metric bootstrap 97.5th percentiles.
    null_high = np.array(null.score_high)
    summary = summarize(cases, methods, own)
    by_defect = {d: summarize([c for c in cases if c.plant.defect == d], methods, own)
                 for d in resolve_defects(args.defects)}
    by_group = {g.name: summarize([c for c in cases if c.plant.group == g.name], methods, own)
                for g in chosen}
    return {"model": Path(ckpt_path).name, "probe": len(probe), "groups": [g.name for g in groups],
            "metric": own, "shares": shares.tolist(), "accuracy": null.accuracy,
            "cases": cases, "null": null, "summary": summary, "by_defect": by_defect,
            "by_group": by_group, "methods": methods, "skipped": skipped,
            "chance": chance_levels(len(groups)),
            "rules": {m: _rule_stats([c for c in cases if c.plant.reached],
                                     [g.name for g in groups], shares,
                                     null_high if m == own else None,
                                     _null_scores(null, m), m)
                      for m in ("alone_net", "replay_reduction", "net_reduction") if m in methods},
            "seconds": time.perf_counter() - start}


# ------------------------------------------------------------------------------------------
# Shifts with an oracle


def corrupt(x, shift: str, seed: int):
    """A corrupted copy of images ``x`` (float, [0, 1], N x C x H x W) at high severity."""
    import torch
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    if shift == "gaussian_noise":
        return (x + 0.10 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    if shift == "blur":
        from torchvision.transforms.functional import gaussian_blur

        return gaussian_blur(x, kernel_size=[5, 5], sigma=[1.5, 1.5]).clamp(0, 1)
    if shift == "contrast":
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return ((x - mean) * 0.2 + mean).clamp(0, 1)
    if shift == "jpeg":
        out = []
        for img in x:
            arr = (img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            pil = Image.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr)
            buf = io.BytesIO()
            pil.save(buf, format="JPEG", quality=10)
            back = np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.float32) / 255
            back = back[..., None] if back.ndim == 2 else back
            out.append(torch.from_numpy(back).permute(2, 0, 1))
        return torch.stack(out)
    if shift == "labels":
        return x
    raise ValueError(f"unknown shift {shift!r}; valid: {', '.join(SHIFTS)}")


def permuted_labels(y, classes: int, seed: int):
    """Labels with three classes permuted cyclically (a -> b -> c -> a), and the three."""
    rng = np.random.default_rng(seed + 31)
    a, b, c = (int(v) for v in rng.choice(classes, size=3, replace=False))
    out = y.clone()
    out[y == a], out[y == b], out[y == c] = b, c, a
    return out, (a, b, c)


def _write_probe(path: Path, x, y, classes) -> Path:
    import torch
    from safetensors.torch import save_file

    images = (x * 255).round().clamp(0, 255).to(torch.uint8).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"images": images, "labels": y.long().contiguous()}, str(tmp),
              metadata={"classes": json.dumps(list(classes))})
    tmp.replace(path)
    return path


def shift_data(args, ckpt, probe_path, shift: str, seed: int, cache: Path
               ) -> Tuple[Path, Path, Dict[str, Any]]:
    """Shifted training and held-out probes (uint8 tensor files in the cache)."""
    from model_audit.io.probe import open_probe, stratified_positions
    source = open_probe(probe_path, channels=ckpt.in_channels, normalize="none",
                        model_classes=ckpt.classes, num_classes=ckpt.num_classes)
    n = args.shift_train + args.shift_eval
    positions = stratified_positions(source.labels, n, seed)
    rng = np.random.default_rng(seed)
    positions = [positions[i] for i in rng.permutation(len(positions))]
    x = source.load(positions, normalized=False)
    y = source.labels[positions]
    info: Dict[str, Any] = {}
    x = corrupt(x, shift, seed)
    if shift == "labels":
        y, perm = permuted_labels(y, ckpt.num_classes, seed)
        info["permuted"] = list(perm)
    tag = f"{Path(ckpt.path).stem}-{shift}-s{seed}-n{args.shift_train}+{args.shift_eval}"
    train = _write_probe(cache / "shifts" / f"{tag}-train.safetensors", x[:args.shift_train],
                         y[:args.shift_train], source.classes)
    held = _write_probe(cache / "shifts" / f"{tag}-eval.safetensors", x[args.shift_train:],
                        y[args.shift_train:], source.classes)
    return train, held, info


def _finetune_gain(ckpt, groups, selected, train, held_batches, args, lr: float, device: str,
                   base_acc: float, seed: int) -> float:
    from model_audit.commands.fix import RepairDiverged, batch_plan, retrain
    from model_audit.results.fix import FixConfig
    from model_audit.options import AuditOptions
    from model_audit.core.calibrate import accuracy
    config = FixConfig(options=AuditOptions(device=device, seed=seed), lr=lr,
                       steps=args.shift_steps, batch_size=args.shift_batch)
    plan = batch_plan(list(range(len(train))), [], args.shift_steps, args.shift_batch, seed)
    try:
        model, _ = retrain(ckpt.model, groups, selected, train, plan, config, device, False,
                            "oracle")
    except RepairDiverged:  # a diverged fine-tune: counted as losing everything
        return -base_acc
    return accuracy(model.eval(), held_batches, device) - base_acc


def run_shift(args, ckpt_path, probe_path, arch, normalize, shift: str, seed: int
              ) -> Dict[str, Any]:
    from model_audit.models.checkpoint import load_checkpoint
    from model_audit.core.layers import layer_groups
    from model_audit.options import resolve_inputs
    from model_audit.core.calibrate import accuracy
    from model_audit.io.probe import BatchCache
    from model_audit.commands.scan import scan
    from model_audit.core.scoring import group_output_units, rank_stats
    from model_audit.results.sanity import scores_by_method
    from model_audit.core.stats import spearman
    device = common.pick_device(args.device)
    cache = args.cache_dir or common.default_cache_dir()
    scan_config = _scan_config(args, arch, normalize, None, seed)
    opts = scan_config.options
    ckpt = load_checkpoint(ckpt_path, arch=opts.arch, num_classes=opts.num_classes)
    train_path, held_path, info = shift_data(args, ckpt, probe_path, shift, seed, cache)
    _, train, _ = resolve_inputs(ckpt, train_path, opts)
    _, held, _ = resolve_inputs(ckpt, held_path, opts)
    groups = layer_groups(ckpt.model)
    names = [g.name for g in groups]
    held_batches = BatchCache(held, list(range(len(held))), 128)
    base = accuracy(ckpt.model, held_batches, device)
    t0 = time.perf_counter()
    result = scan(ckpt, train, scan_config)
    scan_s = time.perf_counter() - t0
    units = group_output_units(ckpt.model, groups, train.load([0]))
    scores = scores_by_method(result, units=units, random_seed=seed)
    scores.update(candidate_scores(ckpt, result))
    lrs = [float(v) for v in args.shift_lrs.split(",")]
    gains: Dict[str, float] = {}
    best_lr: Dict[str, float] = {}
    selections = {g.name: (g.name,) for g in groups}
    selections["all"] = tuple(names)
    flagged = tuple(result.flagged)
    if flagged and flagged not in selections.values():
        selections["flagged"] = flagged
    for label, selected in selections.items():
        results = [(_finetune_gain(ckpt, groups, selected, train, held_batches, args, lr, device,
                                   base, seed), lr) for lr in lrs]
        gains[label], best_lr[label] = max(results)
        print(f"    {shift} s{seed}: tune {label:<8} gain {100 * gains[label]:+.1f} "
              f"(lr {best_lr[label]})", flush=True)
    if "flagged" not in gains and flagged:
        key = next(k for k, v in selections.items() if v == flagged)
        gains["flagged"], best_lr["flagged"] = gains[key], best_lr[key]
    group_gains = np.array([gains[n] for n in names])
    best = float(group_gains.max())
    # Noise of a gain difference on the held-out set: two accuracies on the same n images.
    acc = min(max(base + best, 1e-3), 1 - 1e-3)
    noise = 2.0 * math.sqrt(2 * acc * (1 - acc) / len(held))
    truth = [n for n, g in zip(names, group_gains) if g >= best - noise]
    per_method = {}
    for m, values in scores.items():
        top = names[int(np.argmax(np.where(np.isfinite(values), values, -np.inf)))]
        _, top1, rr = rank_stats(values, int(np.argmax(group_gains)))
        valid = np.isfinite(values)
        rho = spearman(values[valid], group_gains[valid]) if valid.sum() >= 3 else None
        per_method[m] = {"top": top, "regret": best - gains[top], "spearman": rho,
                         "top_in_truth": top in truth}
    return {"shift": shift, "seed": seed, "info": info, "accuracy_before": base,
            "train_accuracy": result.evaluation.accuracy, "gains": gains, "best_lr": best_lr,
            "truth": truth, "noise": noise, "flagged": list(flagged), "methods": per_method,
            "random_gain": float(group_gains.mean()), "scan_s": scan_s, "groups": names}


# ------------------------------------------------------------------------------------------
# Markdown


def _f(v: Any, fmt: str = "{:.2f}") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else fmt.format(v)


def _method_table(summary: Dict[str, Any], chance: Tuple[float, float], order: Sequence[str]
                  ) -> List[str]:
    lines = ["| method | top-1 | sd (seeds) | MRR | sd (seeds) | cases |",
             "|---|---:|---:|---:|---:|---:|"]
    for m in order:
        s = summary[m]
        lines.append(f"| {m} | {_f(s.top1)} | {_f(s.top1_sd)} | {_f(s.mrr)} | {_f(s.mrr_sd)} | "
                     f"{s.n} |")
    lines.append(f"| chance | {chance[0]:.2f} | | {chance[1]:.2f} | | |")
    return lines


def _write_json(path: Optional[Path], dump: Dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(dump, indent=1, default=str) + "\n")


def markdown_planted(r: Dict[str, Any], command: str, commit: str, device: str,
                     args) -> str:
    own = r.get("metric", "replay_reduction")   # the scan's own metric
    order = sorted(r["methods"], key=lambda m: (-(r["summary"][m].mrr or 0), m))
    reached = [c for c in r["cases"] if c.plant.reached]
    lines = common.section_header(f"localize: planted defects, {r['model']}, {device}", command,
                              commit, device) + [
        f"- probe: {r['probe']} images, accuracy {100 * (r['accuracy'] or 0):.2f}%; every defect "
        f"calibrated to cost {100 * args.drop:.0f} points (tolerance {100 * args.tolerance:.0f}); "
        f"{len(r['cases'])} cases ({len(reached)} reached the target), seeds "
        f"{args.seeds}; {r['seconds'] / 60:.1f} minutes",
        f"- groups ({len(r['groups'])}): " + ", ".join(
            f"{g} {100 * s:.2f}%" for g, s in zip(r["groups"], r["shares"])),
        f"- not applicable: {', '.join(f'{g}/{d}' for g, d in r['skipped']) or 'none'}", "",
        "Every method, all reached cases (sorted by MRR):", ""]
    lines += _method_table(r["summary"], r["chance"], order)
    lines += ["", "By defect (top-1 / MRR):", "",
              "| method | " + " | ".join(r["by_defect"]) + " |",
              "|---|" + "---:|" * len(r["by_defect"])]
    for m in order:
        lines.append(f"| {m} | " + " | ".join(
            f"{_f(s[m].top1)} / {_f(s[m].mrr)} ({s[m].n})" for s in r["by_defect"].values())
            + " |")
    lines += ["", "By planted group (top-1 / MRR):", "",
              "| method | " + " | ".join(r["by_group"]) + " |",
              "|---|" + "---:|" * len(r["by_group"])]
    for m in order:
        lines.append(f"| {m} | " + " | ".join(
            f"{_f(s[m].top1)} / {_f(s[m].mrr)}" for s in r["by_group"].values()) + " |")
    lines += ["", "Flag rules (reached cases; null: flags on the unmodified model). "
              "share_and_equal: score > max(share, 1/G), the rule until 2026-12-03; "
              "share_or_top: that or the top group, the tool's rule since; equal: score > 1/G; "
              "top1: the top group; above_null: score above the unmodified model's bootstrap "
              "97.5th percentile:", "",
              "| metric | rule | flag hit | flagged set size | null flags |",
              "|---|---|---:|---:|---:|"]
    for metric, rules in r["rules"].items():
        for rule, s in rules.items():
            lines.append(f"| {metric} | {rule} | {_f(s['flag_hit'])} | "
                         f"{_f(s['flagged_size'])} | {s.get('null_flags', '-')} |")
    n = r["null"]
    lines += ["", f"Null (unmodified model): flagged {', '.join(n.flagged) or 'nothing'}; "
              f"own scores " + ", ".join(
                  f"{g} {_f(v, '{:.3f}')}" for g, v in zip(r["groups"], n.scores[own]))
              + "; top group per method: " + ", ".join(
                  f"{m} {g}" for m, g in n.top_group.items())]
    lines += ["", "Cases (own metric's rank of the planted group; top group; flagged):", "",
              "| group | defect | seed | severity | drop | own rank | own top | flagged |",
              "|---|---|---:|---:|---:|---:|---|---|"]
    for c in r["cases"]:
        p = c.plant
        lines.append(f"| {p.group} | {p.defect} | {p.seed} | {p.severity:.3g} | "
                     f"{100 * p.drop:.1f}{'' if p.reached else ' (not reached)'} | "
                     f"{c.ranks[own]:.1f} | {c.top_group[own]} | {', '.join(c.flagged)} |")
    return "\n".join(lines) + "\n"


def markdown_shifts(rows: List[Dict[str, Any]], model: str, command: str, commit: str,
                    device: str, args) -> str:
    methods = list(rows[0]["methods"])
    lines = common.section_header(f"localize: shifts with an oracle, {model}, {device}", command,
                              commit, device) + [
        f"- {args.shift_train} shifted images to scan and fine-tune on, {args.shift_eval} "
        f"held-out; oracle: each group alone, {args.shift_steps} steps of batch "
        f"{args.shift_batch} (fix's trainer), best of lr {args.shift_lrs}; truth: the best "
        "group and those within 2 standard errors of it", "",
        "| shift | seed | acc before | best group (gain) | truth | all (gain) | flagged | "
        "fix auto (gain) | random group (mean gain) |",
        "|---|---:|---:|---|---|---:|---|---:|---:|"]
    for r in rows:
        g = r["gains"]
        best = max(r["groups"], key=lambda n: g[n])
        lines.append(f"| {r['shift']} | {r['seed']} | {100 * r['accuracy_before']:.1f} | {best} "
                     f"({100 * g[best]:+.1f}) | {', '.join(r['truth'])} | {100 * g['all']:+.1f}"
                     f" | {', '.join(r['flagged']) or '-'} | "
                     f"{_f(100 * g['flagged'] if 'flagged' in g else None, '{:+.1f}')} | "
                     f"{100 * r['random_gain']:+.1f} |")
    lines += ["", "Per-group gains (points):", "",
              "| shift | " + " | ".join(rows[0]["groups"]) + " |",
              "|---|" + "---:|" * len(rows[0]["groups"])]
    for r in rows:
        lines.append(f"| {r['shift']} | " + " | ".join(
            f"{100 * r['gains'][n]:+.1f}" for n in r["groups"]) + " |")
    lines += ["", "Methods: mean regret (points; the oracle's best gain minus the gain of the "
              "group ranked first), mean Spearman with the gains, top group within the truth:",
              "", "| method | mean regret | max regret | mean Spearman | top in truth |",
              "|---|---:|---:|---:|---:|"]
    stats = []
    for m in methods:
        regrets = [100 * r["methods"][m]["regret"] for r in rows]
        rhos = [r["methods"][m]["spearman"] for r in rows if r["methods"][m]["spearman"]
                is not None]
        hits = [r["methods"][m]["top_in_truth"] for r in rows]
        stats.append((float(np.mean(regrets)), m, max(regrets),
                      float(np.mean(rhos)) if rhos else None, sum(hits)))
    for mean_regret, m, worst, rho, hits in sorted(stats):
        lines.append(f"| {m} | {mean_regret:.2f} | {worst:.2f} | {_f(rho)} | {hits}/{len(rows)} |")
    lines += ["", "Tops per shift: " + "; ".join(
        f"{r['shift']}: " + ", ".join(f"{m} {r['methods'][m]['top']}" for m in methods)
        for r in rows)]
    return "\n".join(lines) + "\n"


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def run(args: argparse.Namespace) -> int:
    from model_audit.errors import ConfigError

    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise ConfigError(f"unknown part {', '.join(bad) or '(none)'}; valid: "
                          f"{', '.join(PARTS)}")
    shifts = [s.strip() for s in args.shifts.split(",") if s.strip()]
    unknown = [s for s in shifts if s not in SHIFTS]
    if unknown:
        raise ConfigError(f"unknown shift {', '.join(unknown)}; valid: {', '.join(SHIFTS)}")
    if not 0 < args.drop < 1:
        raise ConfigError(f"--drop must be in (0, 1), got {args.drop}")
    from model_audit.baselines import resolve_baselines
    from model_audit.core.plant import resolve_defects
    resolve_baselines(args.baselines)
    resolve_defects(args.defects)
    ckpt_path, probe_path, arch, normalize = _resolve_inputs(args)
    device = common.pick_device(args.device)
    command = "python -m bench localize " + " ".join(sys.argv[2:])
    commit = common.git_commit()
    dump: Dict[str, Any] = {}
    if "planted" in parts:
        r = run_planted(args, ckpt_path, probe_path, arch, normalize)
        dump["planted"] = _jsonable({k: v for k, v in r.items()})
        _write_json(args.json, dump)   # before the report: an hour's run is never lost to it
        section = markdown_planted(r, command, commit, device, args)
        print(section)
        common.append_results(args.out, section)
    if "shifts" in parts:
        rows = []
        for seed in range(args.seeds):
            for shift in shifts:
                print(f"  shift {shift}, seed {seed} ...", flush=True)
                rows.append(run_shift(args, ckpt_path, probe_path, arch, normalize, shift,
                                      seed))
        section = markdown_shifts(rows, Path(ckpt_path).name, command, commit, device, args)
        print(section)
        common.append_results(args.out, section)
        dump["shifts"] = _jsonable(rows)
        _write_json(args.json, dump)
    return 0
